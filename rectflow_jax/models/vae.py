"""Flax port of diffusers' `AutoencoderKL`, the Stable Diffusion VAE (NHWC).

Submodules carry the PyTorch attribute names (see rectflow_jax.weights), so a diffusers
`vae` folder loads strictly and exports back. Images are NHWC in [-1, 1]; latents NHWC.

    vae, params = AutoencoderKL.from_pretrained(folder, "vae")
    posterior = vae.apply({"params": params}, images, method=vae.encode)
    images = vae.apply({"params": params}, latents / vae.scaling_factor, method=vae.decode)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rectflow_jax import weights
from rectflow_jax.models.layers import Downsample2D, Dtype, ResnetBlock2D, Upsample2D, attention, conv, group_norm

EPS = 1e-6  # every VAE GroupNorm (the SD UNet uses 1e-5)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Attention tensors of checkpoints saved before diffusers renamed them.
_LEGACY_ATTENTION = re.compile(r"\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_TO_CURRENT = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), per latent element."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = group_norm(self.groups, EPS, name="group_norm", **kw)(x).reshape(b, h * w, c)
        y = attention(y, heads=1, qkv_bias=True, **kw)
        return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(x.shape[-1], self.groups, EPS, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = AttentionBlock(self.groups, name="attentions_0", **kw)(x)
        return ResnetBlock2D(x.shape[-1], self.groups, EPS, name="resnets_1", **kw)(x)


class ResnetStack(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional 'down' or 'up' resample."""

    out_channels: int
    num_layers: int
    groups: int
    resample: str | None  # None | 'down' | 'up'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, name=f"resnets_{i}", **kw)(x)
        if self.resample == "down":
            x = Downsample2D(0, name="downsamplers_0", **kw)(x)  # diffusers: padding 0, pad bottom/right
        elif self.resample == "up":
            x = Upsample2D(name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.block_out_channels[0], name="conv_in", **kw)(x)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            x = ResnetStack(channels, self.layers_per_block, self.groups, "down" if i < last else None,
                            name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(self.groups, self.mid_block_add_attention, name="mid_block", **kw)(x)
        x = nn.silu(group_norm(self.groups, EPS, name="conv_norm_out", **kw)(x))
        return conv(self.out_channels, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.block_out_channels[-1], name="conv_in", **kw)(z)
        x = MidBlock(self.groups, self.mid_block_add_attention, name="mid_block", **kw)(x)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(reversed(self.block_out_channels)):
            # One resnet more than the encoder per level, as in diffusers.
            x = ResnetStack(channels, self.layers_per_block + 1, self.groups, "up" if i < last else None,
                            name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(group_norm(self.groups, EPS, name="conv_norm_out", **kw)(x))
        return conv(self.out_channels, name="conv_out", **kw)(x)


# Config keys that become module fields; the whole config is kept verbatim in `config_json`.
_FIELDS = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "in_channels",
           "out_channels", "scaling_factor", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
           "force_upcast")
# sample_size only sizes diffusers' tiled decoding, which is off unless asked for; block
# types are checked per level in from_config.
_ACCEPTED = _FIELDS + ("sample_size", "down_block_types", "up_block_types")
# The latent normalisation of SD3 / Flux / SDXL-style pipelines (latents * std / scaling + mean,
# or / scaling + shift): SD 1.x / 2.x have none, and our pipelines apply only scaling_factor.
_ONLY = {"act_fn": ("silu", "swish"), "shift_factor": (None, 0), "latents_mean": (None,), "latents_std": (None,)}


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL` (defaults as in diffusers).

    `config_json` holds the JSON text of the config the module was built from (linen
    fields must be hashable); `config` overlays the fields on it and is what
    `save_pretrained` writes, so metadata keys (sample_size...) survive an export.
    `dtype` is the compute dtype, `param_dtype` the storage dtype; outputs are float32
    whatever the compute dtype. `force_upcast` (diffusers' default True) computes in
    float32 when `dtype` is float16, as diffusers pipelines do before decoding: float16
    activations overflow in some VAEs (SDXL's). Unsupported configs raise
    weights.UnsupportedConfigError (a NotImplementedError too) naming the key.
    """

    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    config_json: str = "{}"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def compute_dtype(self) -> Dtype:
        """`dtype`, or float32 where force_upcast refuses float16."""
        return jnp.float32 if self.force_upcast and jnp.dtype(self.dtype) == jnp.float16 else self.dtype

    def setup(self):
        kw = dict(dtype=self.compute_dtype, param_dtype=self.param_dtype)
        arch = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                    groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention, **kw)
        self.encoder = Encoder(out_channels=2 * self.latent_channels, **arch)
        self.decoder = Decoder(out_channels=self.out_channels, **arch)
        self.quant_conv = conv(2 * self.latent_channels, 1, **kw) if self.use_quant_conv else None
        self.post_quant_conv = conv(self.latent_channels, 1, **kw) if self.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """(B, H, W, in_channels) in [-1, 1] -> posterior over (B, H/f, W/f, latent_channels)."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents (divide sampler latents by `scaling_factor` first) -> images."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents).astype(jnp.float32)

    def __call__(self, images: jax.Array, sample_key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: the posterior mean, or a sample when `sample_key` is given."""
        posterior = self.encode(images)
        return self.decode(posterior.mean if sample_key is None else posterior.sample(sample_key))

    @property
    def config(self) -> dict[str, Any]:
        """The diffusers config.json of this module."""
        n = len(self.block_out_channels)
        fields = {k: getattr(self, k) for k in _FIELDS}
        fields["block_out_channels"] = list(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", **json.loads(self.config_json), **fields, "act_fn": "silu",
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}

    @classmethod
    def from_config(cls, config: dict[str, Any], **kwargs) -> "AutoencoderKL":
        """Module from a diffusers config dict; kwargs set dtype / param_dtype."""
        n = len(config.get("block_out_channels", cls.block_out_channels))
        weights.check_config("VAE", config, _ACCEPTED, _ONLY)
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if list(config.get(key, [kind] * n)) != [kind] * n:
                raise weights.UnsupportedConfigError(f"VAE config {key}={config[key]!r} is not supported (only "
                                                     f"{kind} at each of the {n} levels)")
        fields = {k: config[k] for k in _FIELDS if k in config}
        if "block_out_channels" in fields:
            fields["block_out_channels"] = tuple(fields["block_out_channels"])
        return cls(**fields, config_json=json.dumps(config, sort_keys=True), **kwargs)

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """Smallest valid images (for init / eval_shape; param shapes do not depend on H, W)."""
        size = 2 ** (len(self.block_out_channels) - 1)
        return (jnp.zeros((batch, size, size, self.in_channels), self.dtype),)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, subfolder: str | None = "vae", *, dtype: Dtype = jnp.float32,
                        param_dtype: Dtype = jnp.float32, allow_pickle: bool = False, shardings: Any = None,
                        on_host: bool = False) -> tuple["AutoencoderKL", dict]:
        """(module, params) from a diffusers folder; legacy attention tensor names are accepted.

        Params are jax.Arrays in `param_dtype` on the default device, or placed by
        `shardings` (one Sharding, or a tree of them like the params); numpy if `on_host`.
        """
        build = lambda config: cls.from_config(config, dtype=dtype, param_dtype=param_dtype)
        return weights.load_pretrained(folder, subfolder, build, lambda module: module.dummy_inputs(),
                                       rename=rename_legacy_attention, allow_pickle=allow_pickle, dtype=param_dtype,
                                       shardings=shardings, on_host=on_host)

    def save_pretrained(self, params: dict, folder: str | os.PathLike) -> Path:
        """Writes config.json and diffusion_pytorch_model.safetensors that diffusers loads."""
        return weights.save_pretrained(folder, self.config, nn.unbox(params), WEIGHTS_NAME)


def rename_legacy_attention(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """query/key/value/proj_attn (old diffusers attention blocks) -> to_q/to_k/to_v/to_out.0."""
    return {_LEGACY_ATTENTION.sub(lambda m: f".{_LEGACY_TO_CURRENT[m[1]]}.{m[2]}", name): value
            for name, value in state.items()}
