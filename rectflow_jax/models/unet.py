"""Small DDPM++-style image UNet velocity field v(x, t)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rectflow_jax.models.layers import (class_labels, conv, dense, embed, group_norm, multi_head_attention,
                                        rematerialised, sinusoidal_embedding, upsample_nearest_2x)

# Residual branches start at zero so each block begins as the identity (DDPM init).
_zeros = nn.initializers.zeros_init()
# The output conv is small but not zero: a fresh model already has an input-dependent output.
_small_normal = nn.initializers.variance_scaling(1e-2, "fan_in", "normal")


def _num_groups(channels: int) -> int:
    """min(32, C // 4) groups, lowered until it divides C."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def _merge(skip: jax.Array, residual: jax.Array, rescale: bool) -> jax.Array:
    out = skip + residual
    return out / math.sqrt(2.0) if rescale else out


class _ResBlock(nn.Module):
    out_ch: int
    dropout: float
    skip_rescale: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
        layer = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(_num_groups(x.shape[-1]), 1e-6, name="norm_0", **layer)(x))
        h = conv(self.out_ch, name="conv_0", **layer)(h)
        h = h + dense(self.out_ch, name="temb_proj", **layer)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(_num_groups(self.out_ch), 1e-6, name="norm_1", **layer)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_ch, name="conv_1", kernel_init=_zeros, **layer)(h)
        if x.shape[-1] != self.out_ch:
            x = conv(self.out_ch, 1, name="skip", **layer)(x)
        return _merge(x, h, self.skip_rescale)


class _AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, as in DDPM++."""

    skip_rescale: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layer = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, c = x.shape
        h = group_norm(_num_groups(c), 1e-6, name="norm", **layer)(x).reshape(b, height * width, c)
        q, k, v = (dense(c, axes=("embed", "heads"), name=n, **layer)(h) for n in ("q", "k", "v"))
        h = multi_head_attention(q, k, v, num_heads=1)
        h = dense(c, axes=("heads", "mlp"), name="out", kernel_init=_zeros, **layer)(h)
        return _merge(x, h.reshape(x.shape), self.skip_rescale)


class UNet(nn.Module):
    """x (B, H, W, C) in [-1, 1], t (B,) in [0, 1] -> v (B, H, W, C).

    Defaults are the official Rectified Flow CIFAR-10 DDPM++ recipe. `attn_resolutions`
    lists the spatial sizes (H) at which attention follows each res block. With
    `num_classes` > 0 a class embedding is added to the time embedding; the table has one
    extra row, index `num_classes`, meaning "no label" (used when `cond` has no 'label', and
    for label dropout in classifier-free guidance training).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.15
    num_classes: int = 0
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    resblock_skip_rescale: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False   # layers.REMAT_POLICIES, per res / attention block

    def _time_features(self, t: jax.Array) -> jax.Array:
        if self.embedding_type == "positional":
            return sinusoidal_embedding(t * 999.0, self.ch)
        if self.embedding_type == "fourier":
            # Fixed random frequencies (NCSN++ Gaussian Fourier features); a constant of the
            # code, not a parameter, so they never train and every checkpoint agrees on them.
            freqs = np.random.default_rng(0).standard_normal(self.ch // 2).astype(np.float32)
            args = 2 * np.pi * t.astype(jnp.float32)[:, None] * (self.fourier_scale * freqs)
            return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
        raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {self.embedding_type!r}")

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array] | None = None,
                 train: bool = False) -> jax.Array:
        factor = 2 ** (len(self.ch_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"UNet with {len(self.ch_mult)} levels needs H and W divisible by {factor}, "
                             f"got {x.shape[1:3]}")
        layer = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(dropout=self.dropout, skip_rescale=self.resblock_skip_rescale, **layer)
        attn = dict(skip_rescale=self.resblock_skip_rescale, **layer)
        temb_dim = 4 * self.ch
        # `train` (dropout on or off) is a Python bool: static for the rematerialised call.
        ResBlock, AttnBlock = rematerialised(_ResBlock, self.remat, (3,)), rematerialised(_AttnBlock, self.remat)

        temb = dense(temb_dim, name="temb_0", **layer)(self._time_features(t))
        temb = dense(temb_dim, name="temb_1", **layer)(nn.silu(temb))
        if self.num_classes:
            temb = temb + embed(self.num_classes + 1, temb_dim, name="label_embed", **layer)(
                class_labels(cond, x.shape[0], self.num_classes))

        h = conv(self.ch, name="conv_in", **layer)(x.astype(self.dtype))
        skips = [h]
        last = len(self.ch_mult) - 1
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = ResBlock(self.ch * mult, name=f"down_{level}_res_{i}", **block)(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(name=f"down_{level}_attn_{i}", **attn)(h)
                skips.append(h)
            if level != last:
                h = conv(h.shape[-1], strides=2, name=f"down_{level}_downsample", **layer)(h)
                skips.append(h)

        h = ResBlock(h.shape[-1], name="mid_res_0", **block)(h, temb, train)
        h = AttnBlock(name="mid_attn", **attn)(h)
        h = ResBlock(h.shape[-1], name="mid_res_1", **block)(h, temb, train)

        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResBlock(self.ch * mult, name=f"up_{level}_res_{i}", **block)(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(name=f"up_{level}_attn_{i}", **attn)(h)
            if level:
                h = conv(h.shape[-1], name=f"up_{level}_upsample", **layer)(upsample_nearest_2x(h))

        h = nn.silu(group_norm(_num_groups(h.shape[-1]), 1e-6, name="norm_out", **layer)(h))
        v = conv(x.shape[-1], name="conv_out", kernel_init=_small_normal, **layer)(h)
        return v.astype(x.dtype)
