"""Teachers: anything with a velocity field to integrate, loaded from a stage directory.

A stage directory written by the train loop carries its model and data configs in
the checkpoint metadata, so a later stage, the pair generator, the sampler and the
evaluator rebuild the network from the checkpoint alone and read only its EMA params.
A teacher whose output becomes another stage's input (pairs, a student's init) must
be finished and carry a run hash: that checkpoint is then named by (run hash, step).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import ml_collections

from rectflow_jax import checkpoint, models, train
from rectflow_jax.data import datasets


class IncompatibleTeacher(ValueError):
    """A checkpoint's data, source or state does not fit what the caller does with it."""


@dataclasses.dataclass
class VelocityTeacher:
    stage_dir: Path
    model: nn.Module
    params: Any
    shape: tuple[int, ...]
    num_classes: int
    meta: dict
    step: int

    @property
    def apply_velocity(self) -> Callable:
        return train.velocity_apply(self.model)

    @property
    def data_config(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(self.meta["data"])

    @property
    def dataset(self) -> datasets.Dataset:
        """The data (and so the source pi0) the teacher was trained on."""
        return datasets.get_dataset(self.data_config)


def source_spec_of(meta: dict) -> str:
    """The source distribution a stage was trained from, read from its stored data config."""
    return datasets.get_dataset(ml_collections.ConfigDict(meta["data"])).source_spec


def finished_provenance(stage_dir: str | Path, meta: dict | None = None, step: int | None = None) -> dict:
    """{'run_hash', 'step'} naming a finished stage's checkpoint, its identity as a teacher.

    Refuses a stage still training (or stopped early) and one written before run hashes.
    """
    if meta is None:
        meta, step = checkpoint.read_meta(stage_dir)
    if "run_hash" not in meta:
        raise IncompatibleTeacher(f"teacher {str(stage_dir)!r} was written by an older rectflow_jax (no run_hash "
                                  "in its metadata), so its pairs or students could not be traced; retrain it")
    if step < int(meta["num_steps"]):
        raise IncompatibleTeacher(f"teacher {str(stage_dir)!r} is at step {step} of {meta['num_steps']} (still "
                                  "training, or stopped): finish it before using it as a teacher")
    return {"run_hash": str(meta["run_hash"]), "step": int(step)}


def load_velocity_teacher(stage_dir: str | Path, *, expected_shape: tuple[int, ...] | None = None,
                          expected_num_classes: int | None = None, expected_source: str | None = None,
                          finished: bool = False) -> VelocityTeacher:
    """Model and EMA params of a stage's latest checkpoint, after checking it fits the caller.

    `expected_source`: the caller's `Dataset.source_spec`; the teacher's flow starts from
    the source it was trained on, so another one is refused. `finished`: refuse a stage that
    is still training (see `finished_provenance`), as every stage reading a teacher must.
    """
    meta, step = checkpoint.read_meta(stage_dir)
    shape, num_classes = tuple(meta["shape"]), int(meta["num_classes"])
    if expected_shape is not None and tuple(expected_shape) != shape:
        raise IncompatibleTeacher(f"teacher {str(stage_dir)!r} models data of shape {shape}, "
                                  f"but this config's data has shape {tuple(expected_shape)}")
    if expected_num_classes is not None and expected_num_classes != num_classes:
        raise IncompatibleTeacher(f"teacher {str(stage_dir)!r} has {num_classes} classes, "
                                  f"but this config's data has {expected_num_classes}")
    if expected_source is not None and (source := source_spec_of(meta)) != expected_source:
        raise IncompatibleTeacher(f"teacher {str(stage_dir)!r} flows from the source {source!r} "
                                  f"(data {meta['data'].get('name')!r}), but this config's source is "
                                  f"{expected_source!r}; use the teacher's data config")
    if finished:
        finished_provenance(stage_dir, meta, step)
    model = models.build_velocity_model(meta["model"], shape, num_classes)
    params = checkpoint.restore_params(stage_dir, train.abstract_params(model, shape, num_classes))
    return VelocityTeacher(Path(stage_dir), model, params, shape, num_classes, meta, step)
