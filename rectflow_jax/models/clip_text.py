"""Flax port of transformers' `CLIPTextModel`, the Stable Diffusion text encoder.

Submodules carry the PyTorch attribute names of transformers >= 5 (`embeddings`,
`encoder/layers_N`, `final_layer_norm`). Released checkpoints (and transformers 4)
prefix every tensor with `text_model.`; loading accepts both, export writes the prefix
so every transformers version reads the folder.

    clip, params = CLIPTextModel.from_pretrained(folder, "text_encoder")
    hidden = clip.apply({"params": params}, input_ids)   # (B, 77, D) last_hidden_state
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rectflow_jax import weights
from rectflow_jax.models.layers import Dtype, dense, embed, layer_norm, multi_head_attention

WEIGHTS_NAME = "model.safetensors"
PREFIX = "text_model."
# PyTorch's GELU is exact (erf); flax's nn.gelu defaults to the tanh approximation.
ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: nn.gelu(x, approximate=False)}


class CLIPAttention(nn.Module):
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        q, k, v = (dense(width, axes=("embed", "heads"), name=n, **kw)(x) for n in ("q_proj", "k_proj", "v_proj"))
        # Causal even over padding: SD feeds no attention mask, so pads see the prompt.
        y = multi_head_attention(q, k, v, self.num_heads, is_causal=True)
        return dense(width, axes=("heads", "embed"), name="out_proj", **kw)(y)


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ACTIVATIONS[self.hidden_act](dense(self.intermediate_size, name="fc1", **kw)(x))
        return dense(x.shape[-1], axes=("mlp", "embed"), name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + CLIPAttention(self.num_heads, name="self_attn", **kw)(
            layer_norm(self.layer_norm_eps, name="layer_norm1", **kw)(x))
        return x + CLIPMLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)(
            layer_norm(self.layer_norm_eps, name="layer_norm2", **kw)(x))


class CLIPEmbeddings(nn.Module):
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = embed(self.vocab_size, self.hidden_size, name="token_embedding", **kw)(input_ids)
        positions = embed(self.max_position_embeddings, self.hidden_size, name="position_embedding", **kw)(
            jnp.arange(input_ids.shape[-1]))
        return tokens + positions


class CLIPEncoder(nn.Module):
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, num_layers: int):
        for i in range(num_layers):
            x = CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                                 name=f"layers_{i}", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x


# Config keys that become module fields; anything else is kept verbatim in `config_json`.
_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "max_position_embeddings", "hidden_act", "layer_norm_eps")


class CLIPTextModel(nn.Module):
    """transformers `CLIPTextModel` (defaults as in `CLIPTextConfig`), without the pooled output.

    `config_json` holds the JSON text of the config the module was built from (linen
    fields must be hashable); `config` overlays the fields on it and is what
    `save_pretrained` writes. `dtype` is the compute dtype, `param_dtype` the storage
    dtype; the output is float32 whatever the compute dtype.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    config_json: str = "{}"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, clip_skip: int = 0) -> jax.Array:
        """(B, L) token ids -> (B, L, hidden_size) last_hidden_state.

        `clip_skip` = k stops k layers early and applies final_layer_norm to that
        hidden state, like diffusers pipelines' `clip_skip` (k = 1: the penultimate layer).
        """
        if not 0 <= clip_skip < self.num_hidden_layers:
            raise ValueError(f"clip_skip must be in [0, {self.num_hidden_layers}), got {clip_skip}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPEmbeddings(self.vocab_size, self.max_position_embeddings, self.hidden_size, name="embeddings", **kw)(
            input_ids)
        x = CLIPEncoder(self.num_attention_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                        name="encoder", **kw)(x, self.num_hidden_layers - clip_skip)
        return layer_norm(self.layer_norm_eps, name="final_layer_norm", **kw)(x).astype(jnp.float32)

    @property
    def config(self) -> dict[str, Any]:
        """The transformers config.json of this module."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                **json.loads(self.config_json), **{k: getattr(self, k) for k in _FIELDS}}

    @classmethod
    def from_config(cls, config: dict[str, Any], **kwargs) -> "CLIPTextModel":
        """Module from a transformers CLIPTextConfig dict; kwargs set dtype / param_dtype."""
        if config.get("hidden_act", cls.hidden_act) not in ACTIVATIONS:
            raise NotImplementedError(f"CLIP config hidden_act={config['hidden_act']!r} is not supported "
                                      f"(only {sorted(ACTIVATIONS)})")
        fields = {k: config[k] for k in _FIELDS if k in config}
        return cls(**fields, config_json=json.dumps(config, sort_keys=True), **kwargs)

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        return (jnp.zeros((batch, self.max_position_embeddings), jnp.int32),)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, subfolder: str | None = "text_encoder", *,
                        dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                        allow_pickle: bool = False) -> tuple["CLIPTextModel", dict]:
        """(module, params) from a transformers folder, tensors with or without the text_model. prefix."""
        build = lambda config: cls.from_config(config, dtype=dtype, param_dtype=param_dtype)
        return weights.load_pretrained(folder, subfolder, build, lambda module: module.dummy_inputs(),
                                       ignore=[r"position_ids$"], rename=strip_prefix, allow_pickle=allow_pickle,
                                       dtype=param_dtype)

    def save_pretrained(self, params: dict, folder: str | os.PathLike) -> Path:
        """Writes config.json and model.safetensors (prefixed names) that transformers loads."""
        return weights.save_pretrained(folder, self.config, {PREFIX[:-1]: nn.unbox(params)}, WEIGHTS_NAME)


def strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name.removeprefix(PREFIX): value for name, value in state.items()}
