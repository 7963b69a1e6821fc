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


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def count_params(params: Any) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


__all__: Sequence[str] = [
    "dense", "conv", "group_norm", "layer_norm", "embed", "sinusoidal_embedding",
    "multi_head_attention", "upsample_nearest_2x", "count_params",
]
