"""Our velocity networks, built by name from a config."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from rectflow_jax.configlib import ConfigError
from rectflow_jax.models.mlp import MLPVelocity
from rectflow_jax.models.sd_velocity import SDVelocity
from rectflow_jax.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"mlp": MLPVelocity, "unet": UNet, "sd_unet": SDVelocity}
_DATA_RANK = {"mlp": 1, "unet": 3, "sd_unet": 3}  # (D,) vectors, (H, W, C) images or latents
# The keys of a batch's (and a pair shard's) condition: class labels or CLIP token ids.
COND_KEYS = ("label", "input_ids")


def _module_fields(cls: type[nn.Module]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}


def _field_value(value: Any, key: str) -> Any:
    if key in ("dtype", "param_dtype"):
        return jnp.dtype(value)  # configs may write 'bfloat16'
    return tuple(value) if isinstance(value, list) else value  # module fields must be hashable


def build_velocity_model(model_config: Mapping[str, Any], data_shape: tuple[int, ...],
                         num_classes: int) -> nn.Module:
    """The network named by `model_config.name`, its other keys being the module's fields.

    `num_classes` comes from the dataset; a config that also sets it must agree.
    """
    config = dict(model_config)
    name = config.pop("name", None)
    if name not in MODELS:
        raise ConfigError(f"unknown model name {name!r}; valid names: {sorted(MODELS)}")
    cls = MODELS[name]
    if len(data_shape) != _DATA_RANK[name]:
        raise ConfigError(f"model {name!r} needs data of rank {_DATA_RANK[name]}, got shape {data_shape}")
    if hasattr(cls, "from_model_config"):  # built from a pretrained folder's configs
        return cls.from_model_config(config)
    unknown = sorted(set(config) - _module_fields(cls))
    if unknown:
        raise ConfigError(f"unknown keys for model {name!r}: {unknown}; valid: {sorted(_module_fields(cls))}")
    if config.setdefault("num_classes", num_classes) != num_classes:
        raise ConfigError(f"model num_classes={config['num_classes']} but the data has {num_classes}")
    return cls(**{k: _field_value(v, k) for k, v in config.items()})


def example_inputs(model: nn.Module, data_shape: tuple[int, ...], num_classes: int) -> tuple:
    """(x, t, cond) of batch 1: what init needs to trace a velocity model."""
    if hasattr(model, "example_cond"):
        cond = model.example_cond(1)
    else:
        cond = {"label": jnp.zeros((1,), jnp.int32)} if num_classes else None
    return jnp.zeros((1, *data_shape), jnp.float32), jnp.zeros((1,), jnp.float32), cond


def frozen_keys(model: nn.Module) -> tuple[str, ...]:
    """Top-level param names that never train (a text encoder read from a pretrained folder)."""
    return tuple(getattr(model, "frozen", ()))


def trainable(model: nn.Module, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` without the model's frozen parts: what the optimiser, the EMA and checkpoints hold."""
    return {k: v for k, v in params.items() if k not in frozen_keys(model)}


def condition(batch: Mapping[str, Any]) -> dict[str, Any] | None:
    """The condition pytree of a flat batch or pair shard ({'label': ...} / {'input_ids': ...}), or None."""
    cond = {k: batch[k] for k in COND_KEYS if k in batch}
    return cond or None


# Static model and shapes: jit reuses the compiled init across calls with equal modules.
@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init(model: nn.Module, rng: jax.Array, data_shape: tuple[int, ...], num_classes: int) -> Any:
    return trainable(model, nn.unbox(model.init(rng, *example_inputs(model, data_shape, num_classes))["params"]))


def init_params(model: nn.Module, rng: jax.Array, data_shape: tuple[int, ...], num_classes: int) -> Any:
    """Freshly initialised, unboxed trainable params (the 'params' collection, frozen parts left out)."""
    return _init(model, rng, tuple(data_shape), int(num_classes))


def abstract_params_boxed(model: nn.Module, data_shape: tuple[int, ...], num_classes: int) -> Any:
    """Shapes of the trainable params, still boxed with their logical axis names; nothing allocated."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model, data_shape, num_classes))["params"]
    return trainable(model, boxed)


def abstract_frozen_boxed(model: nn.Module, data_shape: tuple[int, ...], num_classes: int) -> Any:
    """Shapes (boxed) of the frozen params alone, e.g. to shard a text encoder by the same rules."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model, data_shape, num_classes))["params"]
    return {k: v for k, v in boxed.items() if k in frozen_keys(model)}


def param_partition_specs(model: nn.Module, data_shape: tuple[int, ...], num_classes: int) -> Any:
    """PartitionSpecs of logical axis names, one per param, without allocating any."""
    return nn.get_partition_spec(abstract_params_boxed(model, data_shape, num_classes))


__all__ = ["MLPVelocity", "UNet", "SDVelocity", "MODELS", "COND_KEYS", "condition", "frozen_keys", "trainable", "build_velocity_model", "example_inputs", "init_params",
           "abstract_params_boxed", "param_partition_specs"]
