"""Teachers: anything with a velocity field to integrate, loaded from a stage directory.

A stage directory written by the train loop carries its model and data configs in
the checkpoint metadata, so a later stage, the pair generator, the sampler and the
evaluator rebuild the network from the checkpoint alone and read only its EMA params.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import ml_collections

from rectflow_jax import checkpoint, models, train


class IncompatibleTeacher(ValueError):
    """A checkpoint's data shape or classes differ from what the caller works with."""


@dataclasses.dataclass
class VelocityTeacher:
    stage_dir: Path
    model: nn.Module
    params: Any
    shape: tuple[int, ...]
    num_classes: int
    meta: dict

    @property
    def apply_velocity(self) -> Callable:
        return train.velocity_apply(self.model)

    @property
    def data_config(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(self.meta["data"])


def load_velocity_teacher(stage_dir: str | Path, *, expected_shape: tuple[int, ...] | None = None,
                          expected_num_classes: int | None = None) -> VelocityTeacher:
    """Model and EMA params of a stage's latest checkpoint, after checking it fits the caller."""
    meta, _ = checkpoint.read_meta(stage_dir)
    shape, num_classes = tuple(meta["shape"]), int(meta["num_classes"])
    if expected_shape is not None and tuple(expected_shape) != shape:
        raise IncompatibleTeacher(f"teacher {str(stage_dir)!r} models data of shape {shape}, "
                                  f"but this config's data has shape {tuple(expected_shape)}")
    if expected_num_classes is not None and expected_num_classes != num_classes:
        raise IncompatibleTeacher(f"teacher {str(stage_dir)!r} has {num_classes} classes, "
                                  f"but this config's data has {expected_num_classes}")
    model = models.build_velocity_model(meta["model"], shape, num_classes)
    params = checkpoint.restore_params(stage_dir, train.abstract_params(model, shape, num_classes))
    return VelocityTeacher(Path(stage_dir), model, params, shape, num_classes, meta)
