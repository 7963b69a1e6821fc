"""Flax port of transformers' `CLIPTextModel`, the Stable Diffusion text encoder.

Submodules carry the PyTorch attribute names of transformers >= 5 (`embeddings`,
`encoder/layers_N`, `final_layer_norm`). Released checkpoints (and transformers 4)
prefix every tensor with `text_model.`; loading accepts both, export writes the prefix
so every transformers version reads the folder.

    clip, params = CLIPTextModel.from_pretrained(folder, "text_encoder")
    hidden = clip.apply({"params": params}, input_ids)   # (B, 77, D) last_hidden_state
    pooled = clip.apply({"params": params}, input_ids, method=CLIPTextModel.pooled_output)  # (B, D)

The attention, encoder-layer and encoder modules take `causal` (default True, the text
model's); CLIP's vision tower (clip_vision.py) reuses them with causal=False.
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
from rectflow_jax.models.layers import (
    FF_LAYOUT, HEADS_LAYOUT, Dtype, constrain, dense, embed, layer_norm, multi_head_attention)

WEIGHTS_NAME = "model.safetensors"
PREFIX = "text_model."
# PyTorch's GELU is exact (erf); flax's nn.gelu defaults to the tanh approximation.
ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: nn.gelu(x, approximate=False)}


class CLIPAttention(nn.Module):
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True  # the text model's; CLIP's vision tower attends over all patches

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        q, k, v = (constrain(dense(width, axes=("embed", "heads"), name=n, **kw)(x), HEADS_LAYOUT)
                   for n in ("q_proj", "k_proj", "v_proj"))
        # Causal even over padding: SD feeds no attention mask, so pads see the prompt.
        y = multi_head_attention(q, k, v, self.num_heads, is_causal=self.causal)
        return dense(width, axes=("heads", "embed"), name="out_proj", **kw)(constrain(y, HEADS_LAYOUT))


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ACTIVATIONS[self.hidden_act](dense(self.intermediate_size, axes=("embed", "ff"), name="fc1", **kw)(x))
        return dense(x.shape[-1], axes=("ff", "embed"), name="fc2", **kw)(constrain(h, FF_LAYOUT))


class CLIPEncoderLayer(nn.Module):
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + CLIPAttention(self.num_heads, name="self_attn", causal=self.causal, **kw)(
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
    causal: bool = True

    @nn.compact
    def __call__(self, x, num_layers: int):
        for i in range(num_layers):
            x = CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                                 name=f"layers_{i}", dtype=self.dtype, param_dtype=self.param_dtype,
                                 causal=self.causal)(x)
        return x


# Configs written before transformers PR #24773 carry eos_token_id 2, the wrong id; for
# them transformers pools at the largest token id (CLIP's EOS is the last of the vocabulary).
LEGACY_EOS_TOKEN_ID = 2


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(B, L) ids -> (B,) position that transformers' CLIPTextModel pools (its pooler_output).

    eos_token_id == 2 (legacy configs): the argmax of the ids; otherwise the first position
    holding eos_token_id (0 where a row has none, as torch's argmax of an all-false row).
    """
    if not isinstance(eos_token_id, (int, np.integer)) or isinstance(eos_token_id, bool):
        raise ValueError(f"the pooled output needs one integer eos_token_id, the config has {eos_token_id!r}")
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


# Config keys that become module fields; the whole config is kept verbatim in `config_json`.
_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")
# Keys transformers' CLIPTextModel never reads (eos_token_id, a field, only picks the pooled
# token): the other token ids (tokenizer), projection_dim (CLIPTextModelWithProjection), torch
# init scales, and the generic PretrainedConfig keys of transformers 5 and 4 (output
# flags, storage dtype, chunking, which does not change the maths, generation settings).
_METADATA = (
    "projection_dim", "initializer_range", "initializer_factor", "bos_token_id", "pad_token_id",
    "transformers_version", "architectures", "output_hidden_states", "output_attentions", "return_dict", "dtype",
    "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "num_labels",
    "problem_type", "name_or_path", "torchscript", "use_bfloat16", "tf_legacy_loss", "tie_word_embeddings",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "gradient_checkpointing", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "task_specific_params", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id",
)
# Supported only at these values: the port has no dropout and no pruned heads, and reads a
# text encoder's config, not a whole CLIP model's (model_type 'clip' nests it in text_config).
_ONLY = {"hidden_act": tuple(ACTIVATIONS), "attention_dropout": (0,), "dropout": (0,), "pruned_heads": ({},),
         "model_type": ("clip_text_model",)}


class CLIPTextModel(nn.Module):
    """transformers `CLIPTextModel` (defaults as in `CLIPTextConfig`).

    `__call__` gives last_hidden_state; the method `pooled_output` gives transformers'
    pooler_output, the hidden state at the EOS token (`eos_positions`).

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
    eos_token_id: int = 49407
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

    def pooled_output(self, input_ids: jax.Array) -> jax.Array:
        """(B, L) token ids -> (B, hidden_size): transformers' pooler_output, float32.

        Use as `clip.apply({"params": params}, input_ids, method=CLIPTextModel.pooled_output)`.
        """
        hidden = self(input_ids)
        return hidden[jnp.arange(hidden.shape[0]), eos_positions(input_ids, self.eos_token_id)]

    @property
    def config(self) -> dict[str, Any]:
        """The transformers config.json of this module."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                **json.loads(self.config_json), **{k: getattr(self, k) for k in _FIELDS}}

    @classmethod
    def from_config(cls, config: dict[str, Any], **kwargs) -> "CLIPTextModel":
        """Module from a transformers CLIPTextConfig dict; kwargs set dtype / param_dtype.

        A key the port does not implement raises weights.UnsupportedConfigError naming it.
        """
        weights.check_config("CLIP text", config, _FIELDS + _METADATA, _ONLY)
        fields = {k: config[k] for k in _FIELDS if k in config}
        if isinstance(fields.get("eos_token_id"), list):  # transformers allows several; linen fields hash
            fields["eos_token_id"] = tuple(fields["eos_token_id"])
        return cls(**fields, config_json=json.dumps(config, sort_keys=True), **kwargs)

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        return (jnp.zeros((batch, self.max_position_embeddings), jnp.int32),)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, subfolder: str | None = "text_encoder", *,
                        dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, allow_pickle: bool = False,
                        shardings: Any = None, on_host: bool = False) -> tuple["CLIPTextModel", dict]:
        """(module, params) from a transformers folder, tensors with or without the text_model. prefix.

        Params are jax.Arrays in `param_dtype` on the default device, or placed by
        `shardings` (one Sharding, or a tree of them like the params); numpy if `on_host`.
        """
        build = lambda config: cls.from_config(config, dtype=dtype, param_dtype=param_dtype)
        return weights.load_pretrained(folder, subfolder, build, lambda module: module.dummy_inputs(),
                                       ignore=[r"position_ids$"], rename=strip_prefix, allow_pickle=allow_pickle,
                                       dtype=param_dtype, shardings=shardings, on_host=on_host)

    def save_pretrained(self, params: dict, folder: str | os.PathLike) -> Path:
        """Writes config.json and model.safetensors (prefixed names) that transformers loads."""
        return weights.save_pretrained(folder, self.config, {PREFIX[:-1]: nn.unbox(params)}, WEIGHTS_NAME)


def strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name.removeprefix(PREFIX): value for name, value in state.items()}
