"""Building blocks shared by every network, each parameter with logical axis names.

Logical axes (mapped to mesh axes by rectflow_jax.parallel rules):
  'embed'  input features of a Dense / input channels of a conv
  'mlp'    output features / output channels
  'heads'  outputs of attention q/k/v projections (and inputs of the output projection)
  'ff'     the hidden width of a transformer feed-forward
  'vocab'  rows of an embedding table
  'norm'   scale and bias of normalisation layers
Conv kernels are (H, W, in, out) -> (None, None, 'embed', 'mlp').
Activations between tensor-parallel projections are pinned by `constrain` with
'act_batch', 'act_heads' and 'act_ff' (no-ops unless parallel.activation_sharding is on).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

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


# Rematerialisation policies (model.remat): what a block keeps from its forward pass for
# the backward one. 'full' keeps only its inputs; 'dots_saveable' also the matmul and conv
# outputs, so only the cheap elementwise work (norms, activations) is recomputed.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_policy_name(remat: bool | str) -> str:
    """A model.remat value (a policy name; True and False for 'full' and 'none') as a policy name."""
    name = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else str(remat)
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat={remat!r} is not one of {sorted(REMAT_POLICIES)} (or true / false)")
    return name


@functools.cache
def rematerialised(cls: type, remat: bool | str, static_argnums: tuple[int, ...] = ()) -> type:
    """`cls` recomputed in the backward pass by policy `remat` (no wrapper for 'none').

    `static_argnums` (self is 0): Python-valued call arguments, such as a train flag.
    Cached, so every block of a model shares one wrapped class.
    """
    name = remat_policy_name(remat)
    return cls if name == "none" else nn.remat(cls, policy=REMAT_POLICIES[name], static_argnums=static_argnums)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's layout by logical axis names; a no-op outside parallel.activation_sharding."""
    return nn.with_logical_constraint(x, logical_axes)


# (batch, tokens, features) activations split by heads / feed-forward width under 'tensor'.
HEADS_LAYOUT = ("act_batch", None, "act_heads")
FF_LAYOUT = ("act_batch", None, "act_ff")


def conv(features: int, kernel_size: int = 3, *, strides: int = 1, padding: Any = None,
         use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         name: str | None = None, kernel_init=default_kernel_init) -> "Conv2D":
    """A square conv with PyTorch-style symmetric padding (kernel_size // 2 by default)."""
    if padding is None:
        padding = kernel_size // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return Conv2D(
        features, kernel_size, strides=strides, padding=tuple(map(tuple, padding)),
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, "embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)))


# On CPU, convolutions with at most this many output pixels per image run as one matmul over
# gathered patches: at SD's 16x16 and 8x8 levels (1280-2560 channels) XLA's CPU convolution
# takes 1.5-1.8x as long as that; from 32x32 up the convolution is faster.
CPU_PATCH_MATMUL_MAX_PIXELS = 256


class Conv2D(nn.Module):
    """NHWC 2-D convolution with flax.linen.Conv's parameters: `kernel` (kh, kw, in, out), `bias`."""
    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, self.strides, self.padding)
        return y if bias is None else y + bias


def conv2d(x: jax.Array, kernel: jax.Array, strides: int, padding: Sequence[tuple[int, int]]) -> jax.Array:
    """(B, H, W, C) * (kh, kw, C, O) -> (B, H', W', O); patch matmul for small outputs on CPU."""
    kh, kw, _, features = kernel.shape
    out_h = (x.shape[1] + sum(padding[0]) - kh) // strides + 1
    out_w = (x.shape[2] + sum(padding[1]) - kw) // strides + 1
    if jax.default_backend() != "cpu" or out_h * out_w > CPU_PATCH_MATMUL_MAX_PIXELS:
        return jax.lax.conv_general_dilated(x, kernel, (strides, strides), tuple(padding),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    span_h, span_w = strides * (out_h - 1) + 1, strides * (out_w - 1) + 1
    # Patch features ordered (dy, dx, channel), as the kernel's reshape orders its rows.
    patches = jnp.concatenate([x[:, dy:dy + span_h:strides, dx:dx + span_w:strides]
                               for dy in range(kh) for dx in range(kw)], axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(-1, features))


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


def class_labels(cond: Mapping[str, jax.Array] | None, batch: int, num_classes: int) -> jax.Array:
    """cond['label'], or the null class `num_classes` (the extra embedding row) when absent."""
    if cond is None or "label" not in cond:
        return jnp.full((batch,), num_classes, jnp.int32)
    return cond["label"]


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


# Key tiles of the CPU path. XLA's CPU attention materialises every (query, key) logit
# (512 MB per SD 1.5 self-attention at 512px) and streams it through softmax several
# times; tiles of this size stay in cache.
CPU_QUERY_BLOCK, CPU_KEY_BLOCK = 256, 512


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, *,
                         mask: jax.Array | None = None, is_causal: bool = False,
                         upcast: bool = False) -> jax.Array:
    """(B, Lq, H*D), (B, Lk, H*D) -> (B, Lq, H*D) softmax attention.

    On GPUs it goes through jax.nn.dot_product_attention, and half-precision inputs with
    supported head widths use the fused cuDNN kernel (JAX's default picks the plain XLA
    path). On CPU, unmasked attention over more than one key tile is computed tile by
    tile (`tiled_attention`). `upcast` (the SD 2.x `upcast_attention` flag) computes
    float16 attention in float32 and casts back. Other dtypes are left alone: both paths
    already take logits and softmax in float32, and in bfloat16 (float32's range) casting
    q, k, v would only turn off the fused kernel.
    """
    out_dtype = q.dtype
    if upcast and q.dtype == jnp.float16:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    b, lq, width = q.shape
    head_dim = width // num_heads
    split = lambda a: a.reshape(a.shape[0], a.shape[1], num_heads, head_dim)
    backend = jax.default_backend()
    if backend == "cpu" and mask is None and not is_causal and k.shape[1] > CPU_KEY_BLOCK:
        out = tiled_attention(split(q), split(k), split(v))
    else:
        fused = (backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
                 and head_dim % 8 == 0 and head_dim <= 128 and mask is None)
        out = jax.nn.dot_product_attention(split(q), split(k), split(v), mask=mask, is_causal=is_causal,
                                           implementation="cudnn" if fused else None)
    return out.reshape(b, lq, width).astype(out_dtype)


def tiled_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, query_block: int = CPU_QUERY_BLOCK,
                    key_block: int = CPU_KEY_BLOCK) -> jax.Array:
    """Unmasked softmax attention (B, L, heads, D) -> (B, Lq, heads, D) over (query x key) tiles.

    Each query tile scans the key tiles keeping a running max and sum of its logits
    (Rabe & Staats 2021; the online softmax of flash attention), so no tile of logits
    outlives its step. Ragged lengths are padded: padded keys get a logit bias of -inf,
    padded queries are cut off. Logits and sums are float32 whatever the input dtype.
    """
    b, lq, heads, d = q.shape
    lk = k.shape[1]
    query_block, key_block = min(query_block, lq), min(key_block, lk)
    q_tiles, k_tiles = -(-lq // query_block), -(-lk // key_block)
    # (tiles, B, heads, tile, D): head-major tiles. In the SD UNet this layout is 5% faster
    # on CPU than tiles along L alone, though not in an attention layer measured by itself.
    tile = lambda a, n, size: jnp.pad(a, ((0, 0), (0, n * size - a.shape[1]), (0, 0), (0, 0))).reshape(
        b, n, size, heads, d).transpose(1, 0, 3, 2, 4)
    qt = tile(q * jnp.asarray(d ** -0.5, q.dtype), q_tiles, query_block)
    kt, vt = tile(k, k_tiles, key_block), tile(v, k_tiles, key_block)
    key_bias = jnp.where(jnp.arange(k_tiles * key_block) < lk, 0.0, -jnp.inf).reshape(k_tiles, key_block)

    def one_query_tile(qi):
        def step(carry, kv):
            running_max, running_sum, acc = carry
            ki, vi, bias = kv
            logits = jnp.einsum("bhqd,bhkd->bhqk", qi, ki, preferred_element_type=jnp.float32) + bias
            new_max = jnp.maximum(running_max, logits.max(-1, keepdims=True))
            p = jnp.exp(logits - new_max)
            rescale = jnp.exp(running_max - new_max)
            acc = acc * rescale + jnp.einsum("bhqk,bhkd->bhqd", p.astype(vi.dtype), vi,
                                             preferred_element_type=jnp.float32)
            return (new_max, running_sum * rescale + p.sum(-1, keepdims=True), acc), None

        stats = qi.shape[:-1] + (1,)
        init = (jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        (_, total, acc), _ = jax.lax.scan(step, init, (kt, vt, key_bias))
        return (acc / total).astype(q.dtype)

    out = jax.lax.map(one_query_tile, qt)  # (q_tiles, B, heads, query_block, D)
    return out.transpose(1, 0, 3, 2, 4).reshape(b, q_tiles * query_block, heads, d)[:, :lq]


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
    qkv = lambda name, a: constrain(dense(inner, axes=("embed", "heads"), use_bias=qkv_bias, name=name, **kw)(a),
                                    HEADS_LAYOUT)
    out = multi_head_attention(qkv("to_q", x), qkv("to_k", context), qkv("to_v", context), heads, upcast=upcast)
    return dense(x.shape[-1], axes=("heads", "embed"), name="to_out_0", **kw)(constrain(out, HEADS_LAYOUT))


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
    "dense", "conv", "conv2d", "Conv2D", "group_norm", "layer_norm", "embed", "sinusoidal_embedding",
    "multi_head_attention", "tiled_attention", "attention", "upsample_nearest_2x", "resize_nearest", "count_params",
    "ResnetBlock2D", "Downsample2D", "Upsample2D",
]
