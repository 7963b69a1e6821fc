"""Building blocks shared by every network, each parameter with logical axis names.

Logical axes (mapped to mesh axes by rectflow_jax.parallel rules):
  'embed'  input features of a Dense / input channels of a conv
  'mlp'    output features / output channels
  'heads'  outputs of attention q/k/v projections (and inputs of the output projection)
  'vocab'  rows of an embedding table
  'norm'   scale and bias of normalisation layers
Conv kernels are (H, W, in, out) -> (None, None, 'embed', 'mlp').
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
default_kernel_init = nn.initializers.lecun_normal()


def dense(features: int, *, axes: tuple[str, str] = ("embed", "mlp"), use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None,
          kernel_init=default_kernel_init) -> nn.Dense:
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def conv(features: int, kernel_size: int = 3, *, strides: int = 1, padding: Any = None,
         use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         name: str | None = None, kernel_init=default_kernel_init) -> nn.Conv:
    """A square conv with PyTorch-style symmetric padding (kernel_size // 2 by default)."""
    if padding is None:
        padding = kernel_size // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features, (kernel_size, kernel_size), strides=(strides, strides), padding=padding,
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, "embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)))


def group_norm(num_groups: int, epsilon: float, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.GroupNorm:
    # Two-pass variance: the one-pass E[x^2] - E[x]^2 form loses parity with PyTorch.
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


def layer_norm(epsilon: float = 1e-5, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name, use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


def embed(num_embeddings: int, features: int, *, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Embed:
    return nn.Embed(
        num_embeddings, features, dtype=dtype, param_dtype=param_dtype, name=name,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))


def sinusoidal_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                         freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
    """DDPM / diffusers `get_timestep_embedding`: (B,) -> (B, dim), computed in float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, *,
                         mask: jax.Array | None = None, is_causal: bool = False,
                         upcast: bool = False) -> jax.Array:
    """(B, Lq, H*D), (B, Lk, H*D) -> (B, Lq, H*D) through jax.nn.dot_product_attention.

    On GPUs, half-precision inputs with supported head widths go to the fused cuDNN
    kernel (JAX's default picks the plain XLA path). `upcast` computes in float32 (the
    SD 2.x `upcast_attention` flag) and casts back.
    """
    out_dtype = q.dtype
    if upcast:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    b, lq, width = q.shape
    head_dim = width // num_heads
    split = lambda a: a.reshape(a.shape[0], a.shape[1], num_heads, head_dim)
    fused = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
             and head_dim % 8 == 0 and head_dim <= 128 and mask is None)
    out = jax.nn.dot_product_attention(split(q), split(k), split(v), mask=mask, is_causal=is_causal,
                                       implementation="cudnn" if fused else None)
    return out.reshape(b, lq, width).astype(out_dtype)


def attention(x: jax.Array, context: jax.Array | None = None, *, heads: int = 1, inner: int | None = None,
              qkv_bias: bool = False, upcast: bool = False, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32) -> jax.Array:
    """diffusers' `Attention` projections around `multi_head_attention`.

    to_q (from x), to_k and to_v (from `context`, else x) give `inner` features (default
    x's width); to_out_0 maps back to x's width. Call inside a compact method: the Dense
    layers become submodules of the calling module, under those names.
    """
    inner = inner or x.shape[-1]
    context = x if context is None else context
    kw = {"dtype": dtype, "param_dtype": param_dtype}
    qkv = lambda name, a: dense(inner, axes=("embed", "heads"), use_bias=qkv_bias, name=name, **kw)(a)
    out = multi_head_attention(qkv("to_q", x), qkv("to_k", context), qkv("to_v", context), heads, upcast=upcast)
    return dense(x.shape[-1], axes=("heads", "embed"), name="to_out_0", **kw)(out)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch F.interpolate(mode='nearest', size=size) on NHWC: source index floor(i * in / out)."""
    for axis, out in zip((1, 2), size):
        x = jnp.take(x, (np.arange(out) * x.shape[axis]) // out, axis=axis)
    return x


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` (SiLU, no dropout), shared by the SD UNet and the VAE.

    GroupNorm-SiLU-conv twice, plus the input (through a 1x1 `conv_shortcut` when the
    width changes), divided by `output_scale_factor`. With `temb` its projection
    `time_emb_proj` is added after conv1; without (the VAE) that parameter does not exist.
    """
    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv(self.out_channels, name="conv1", **kw)(h)
        if temb is not None:
            h = h + dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", **kw)(h))
        h = conv(self.out_channels, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """diffusers `Downsample2D` with its conv: a width-keeping 3x3 conv of stride 2.

    `padding` 0 means diffusers' pad of one row and column, bottom/right only.
    """
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = self.padding or ((0, 1), (0, 1))
        return conv(x.shape[-1], strides=2, padding=pad, name="conv", dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """diffusers `Upsample2D` with its conv: nearest upsampling, then a width-keeping 3x3 conv."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        # `size` (H, W) defaults to 2x; the SD UNet passes the next skip's, not 2x when its
        # input was not a multiple of 2**levels.
        if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
            x = upsample_nearest_2x(x)
        else:
            x = resize_nearest(x, size)
        return conv(x.shape[-1], name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


def count_params(params: Any) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


__all__: Sequence[str] = [
    "dense", "conv", "group_norm", "layer_norm", "embed", "sinusoidal_embedding",
    "multi_head_attention", "attention", "upsample_nearest_2x", "resize_nearest", "count_params",
    "ResnetBlock2D", "Downsample2D", "Upsample2D",
]
