"""Flax port of transformers' `CLIPVisionModel`, the image tower of CLIP (for CLIP score).

Submodules carry the PyTorch attribute names of transformers >= 5 (`embeddings`,
`pre_layrnorm` (sic), `encoder/layers_N`, `post_layernorm`); the encoder is clip_text's
CLIPEncoder with causal=False. Two tensors are bare nn.Parameters in PyTorch, named
without a `.weight` suffix: `embeddings.class_embedding` here and CLIPModel's
`logit_scale`; `torch_name` below names those (leaves in BARE_LEAVES) by their path alone
and every other one by rectflow_jax.weights' mechanical rule.

    vision, params = CLIPVisionModel.from_pretrained(folder)
    hidden, pooled = vision.apply({"params": params}, pixel_values)  # NHWC, already normalised

`pixel_values` are (B, image_size, image_size, num_channels), channels last (transformers
takes NCHW); `hidden` is last_hidden_state (B, 1 + patches, D), `pooled` transformers'
pooler_output (post_layernorm of the class token), both float32.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rectflow_jax import weights
from rectflow_jax.models import clip_text
from rectflow_jax.models.clip_text import CLIPEncoder
from rectflow_jax.models.layers import Dtype, conv, embed, layer_norm

PREFIX = "vision_model."
# Leaves whose PyTorch name is their Flax path joined by dots (bare nn.Parameters).
BARE_LEAVES = frozenset({"class_embedding", "logit_scale"})
IGNORE = (r"position_ids$",)  # buffers that old transformers versions saved


class CLIPVisionEmbeddings(nn.Module):
    hidden_size: int
    image_size: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # transformers' bias-free patch conv (kernel = stride = patch): whole patches, row-major.
        patches = conv(self.hidden_size, self.patch_size, strides=self.patch_size, padding=0, use_bias=False,
                       name="patch_embedding", **kw)(pixel_values)
        patches = patches.reshape(patches.shape[0], -1, self.hidden_size)
        cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                         (self.hidden_size,), self.param_dtype)
        num_positions = (self.image_size // self.patch_size) ** 2 + 1
        positions = embed(num_positions, self.hidden_size, name="position_embedding", **kw)(jnp.arange(num_positions))
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, self.hidden_size))
        return jnp.concatenate([cls, patches], axis=1) + positions


# Config keys that become module fields; the whole config is kept verbatim in `config_json`.
_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
           "image_size", "patch_size", "hidden_act", "layer_norm_eps")
# The text config's metadata (generic PretrainedConfig keys, init scales, projection_dim:
# CLIPModel reads its own), and eos_token_id, which transformers 4 wrote into every config.
_METADATA = clip_text._METADATA + ("eos_token_id",)
_ONLY = {**clip_text._ONLY, "model_type": ("clip_vision_model",)}


class CLIPVisionModel(nn.Module):
    """transformers `CLIPVisionModel` (defaults as in `CLIPVisionConfig`), at its own image size.

    No `interpolate_pos_encoding`: pixel_values must be image_size square, as transformers
    requires by default. `dtype` is the compute dtype, `param_dtype` the storage dtype.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    config_json: str = "{}"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, S, S, C) normalised pixels -> (last_hidden_state (B, 1 + (S // p)**2, D), pooled (B, D))."""
        want = (self.image_size, self.image_size, self.num_channels)
        if tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"CLIP vision takes pixel_values of shape (B, {', '.join(map(str, want))}) "
                             f"(NHWC), got {tuple(pixel_values.shape)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, name="embeddings", **kw)(
            pixel_values)
        x = layer_norm(self.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        x = CLIPEncoder(self.num_attention_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                        name="encoder", causal=False, **kw)(x, self.num_hidden_layers)
        pooled = layer_norm(self.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        return x.astype(jnp.float32), pooled.astype(jnp.float32)

    @property
    def config(self) -> dict[str, Any]:
        """The transformers config.json of this module."""
        return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
                **json.loads(self.config_json), **{k: getattr(self, k) for k in _FIELDS}}

    @classmethod
    def from_config(cls, config: dict[str, Any], **kwargs) -> "CLIPVisionModel":
        """Module from a transformers CLIPVisionConfig dict; kwargs set dtype / param_dtype.

        A key the port does not implement raises weights.UnsupportedConfigError naming it.
        """
        weights.check_config("CLIP vision", config, _FIELDS + _METADATA, _ONLY)
        for key in ("image_size", "patch_size"):
            if key in config and (not isinstance(config[key], int) or isinstance(config[key], bool)):
                raise weights.UnsupportedConfigError(
                    f"CLIP vision config {key}={config[key]!r} is not supported (only one integer: square images "
                    "and patches, as transformers' CLIP vision embeddings compute)")
        fields = {k: config[k] for k in _FIELDS if k in config}
        return cls(**fields, config_json=json.dumps(config, sort_keys=True), **kwargs)

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        return (jnp.zeros((batch, self.image_size, self.image_size, self.num_channels), jnp.float32),)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, subfolder: str | None = None, *,
                        dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                        allow_pickle: bool = False) -> tuple["CLIPVisionModel", dict]:
        """(module, params) from a transformers CLIPVisionModel folder, tensors with or without
        the vision_model. prefix (transformers 4 wrote it, 5 does not). Params are jax.Arrays."""
        build = lambda config: cls.from_config(config, dtype=dtype, param_dtype=param_dtype)
        strip = lambda state: {name.removeprefix(PREFIX): value for name, value in state.items()}
        return weights.load_pretrained(folder, subfolder, build, lambda module: module.dummy_inputs(), ignore=IGNORE,
                                       rename=strip, allow_pickle=allow_pickle, dtype=param_dtype, name_of=torch_name)


def torch_name(flax_path: tuple[str, ...]) -> str:
    """The PyTorch name of a CLIP leaf: bare parameters by their joined path, the rest as weights.torch_name."""
    return ".".join(flax_path) if flax_path[-1] in BARE_LEAVES else weights.torch_name(flax_path)
