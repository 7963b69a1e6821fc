"""Orbax CheckpointManager wrapper: periodic saves, automatic resume, params-only restore.

A stage directory holds `checkpoints/<step>/{state,meta}`: the whole train state and a
JSON description (stage kind, data shape, model and data configs) that a later stage
or the sampler reads to rebuild the model without the original config, plus `run` (what
defines the run), its hash `run_hash` and the full stage `config`, for humans.
The readers here may run while the stage is still training (an evaluator watching it).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import jax
import orbax.checkpoint as ocp

from rectflow_jax import storage


T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, empty or does not fit what is asked of it."""


def _manager(directory: Path, *, save_every: int = 1, keep: int | None = None, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else save_every, max_to_keep=keep, create=not read_only,
        read_only=read_only)
    # Orbax wants an absolute directory; a gs:// URL is one already (and resolving it would make it local).
    where = directory if storage.is_remote(directory) else Path(directory).resolve()
    return ocp.CheckpointManager(where, options=options, item_names=("state", "meta"))


def _read(directory: Path, read: Callable[[Any], T]) -> T:
    """`read(manager)` on a read-only manager of `directory`.

    A run that is still training deletes its oldest step (max_to_keep) while a reader
    lists or restores it. That shows up as a missing file or directory, so the reader
    looks again and finds the newer steps.
    """
    for backoff in (0.02, 0.04, 0.08, 0.16, 0.32):
        try:
            return _read_once(directory, read)
        except (FileNotFoundError, NotADirectoryError):
            time.sleep(backoff)
    return _read_once(directory, read)


def _read_once(directory: Path, read: Callable[[Any], T]) -> T:
    manager = _manager(directory, read_only=True)  # lists the steps: can race too
    try:
        return read(manager)
    finally:
        manager.close()


class Checkpointer:
    """Saves train states of one stage; `restore_latest` resumes a killed run."""

    def __init__(self, stage_dir: str | Path, *, save_every: int, keep: int):
        self.directory = storage.path(stage_dir) / "checkpoints"
        self.manager = _manager(self.directory, save_every=save_every, keep=keep)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
            force=force)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
        """Latest (state, step), laid out like `abstract_state` (shardings included), or None."""
        step = self.manager.latest_step()
        if step is None:
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored.state, step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _checkpoint_dir(stage_dir: str | Path) -> Path:
    stage = storage.path(stage_dir)
    if not stage.exists():
        raise CheckpointError(f"checkpoint {str(stage)!r} does not exist")
    directory = stage / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"{str(stage)!r} is not a rectflow stage directory (no checkpoints/ inside)")
    return directory


def latest_step(stage_dir: str | Path) -> int | None:
    directory = storage.path(stage_dir) / "checkpoints"
    if not directory.is_dir():
        return None
    return _read(directory, lambda manager: manager.latest_step())


def read_meta(stage_dir: str | Path) -> tuple[dict[str, Any], int]:
    """(meta, step) of the latest checkpoint of a stage."""
    def read(manager):
        step = _latest_finished(manager, stage_dir)
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta, step

    return _read(_checkpoint_dir(stage_dir), read)


def _latest_finished(manager, stage_dir) -> int:
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"{str(stage_dir)!r} holds no finished checkpoint")
    return step


def restore_params(stage_dir: str | Path, abstract_params: Any, *, which: str = "ema_params") -> Any:
    """Only the (EMA) parameters of the latest checkpoint: no optimizer state is read.

    `abstract_params` gives shapes, dtypes and, optionally, shardings
    (jax.ShapeDtypeStruct leaves); a shape mismatch is a CheckpointError.
    """
    directory = _checkpoint_dir(stage_dir)
    target = {which: abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)

    def read(manager):
        step = _latest_finished(manager, stage_dir)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True)))
        except (ValueError, KeyError) as err:
            if not (directory / str(step)).exists():  # deleted by the running job mid-read
                raise FileNotFoundError(directory / str(step)) from err
            raise CheckpointError(f"checkpoint {str(stage_dir)!r} (step {step}) does not fit this model: "
                                  f"{str(err).splitlines()[0][:300]}") from err
        return restored.state[which]

    params = _read(directory, read)
    _check_shapes(params, abstract_params, stage_dir)
    return params


def _check_shapes(params: Any, abstract: Any, stage_dir) -> None:
    got = jax.tree_util.tree_map(lambda a: tuple(a.shape), params)
    want = jax.tree_util.tree_map(lambda a: tuple(a.shape), abstract)
    if got != want:
        bad = [f"{jax.tree_util.keystr(p)}: {g} != {w}" for (p, g), w in zip(
            jax.tree_util.tree_leaves_with_path(got, is_leaf=lambda x: isinstance(x, tuple)),
            jax.tree_util.tree_leaves(want, is_leaf=lambda x: isinstance(x, tuple))) if g != w]
        raise CheckpointError(f"checkpoint {str(stage_dir)!r} does not fit this model: {'; '.join(bad[:5])}")


def jsonable(value: Any) -> Any:
    """`value` as it reads back from checkpoint metadata (tuples become lists)."""
    return json.loads(json.dumps(value))


def json_hash(value: Any) -> str:
    """Hex SHA-256 of a JSON value, independent of dict order (and of tuple vs list)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    storage.write_json(path, payload)  # path.tmp, then renamed: local or gs://
