"""The attention paths of models/layers.py agree with XLA's reference attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rectflow_jax.models import layers


def reference(q, k, v, heads):
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, -1)
    out = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation="xla")
    return out.reshape(q.shape)


def qkv(lq, lk, width, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    # Spread logits: a softmax near one-hot catches a wrong running max.
    q = 3 * rng.standard_normal((2, lq, width))
    k, v = rng.standard_normal((2, lk, width)), rng.standard_normal((2, lk, width))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


@pytest.mark.parametrize("lq,lk,query_block,key_block", [
    (64, 128, 16, 32),     # whole tiles
    (50, 77, 16, 32),      # ragged queries and keys: padding must not leak into the softmax
    (33, 1, 8, 8),         # a single key
    (8, 300, 128, 256),    # blocks larger than the queries
])
def test_tiled_attention_matches_reference(lq, lk, query_block, key_block):
    heads, width = 3, 24
    q, k, v = qkv(lq, lk, width)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, -1)
    tiled = layers.tiled_attention(split(q), split(k), split(v), query_block=query_block, key_block=key_block)
    np.testing.assert_allclose(np.asarray(tiled.reshape(q.shape)), np.asarray(reference(q, k, v, heads)),
                               rtol=0, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the tiled path is the CPU's")
def test_multi_head_attention_tiles_long_sequences_on_cpu():
    # More keys than one tile: the tiled path, which must agree with the reference.
    q, k, v = qkv(600, layers.CPU_KEY_BLOCK + 88, 16)
    attend = jax.jit(lambda *a: layers.multi_head_attention(*a, 2))
    out, hlo = attend(q, k, v), attend.lower(q, k, v).as_text()
    assert "while" in hlo  # the scan over key tiles
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference(q, k, v, 2)), rtol=0, atol=1e-5)


def test_tiled_attention_bf16_and_gradients():
    q, k, v = qkv(40, 70, 8, dtype=jnp.bfloat16)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], 2, -1)
    tiled = layers.tiled_attention(split(q), split(k), split(v), query_block=16, key_block=32)
    assert tiled.dtype == jnp.bfloat16
    ref = reference(*(a.astype(jnp.float32) for a in (q, k, v)), 2)
    np.testing.assert_allclose(np.asarray(tiled.reshape(q.shape), np.float32), np.asarray(ref), atol=3e-2)

    q32, k32, v32 = qkv(40, 70, 8)
    loss = lambda fn: (lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))))
    tiled_fn = lambda q, k, v: layers.tiled_attention(split(q), split(k), split(v), query_block=16,
                                                      key_block=32).reshape(q.shape)
    grads = jax.grad(loss(tiled_fn), argnums=(0, 1, 2))(q32, k32, v32)
    grads_ref = jax.grad(loss(lambda q, k, v: reference(q, k, v, 2)), argnums=(0, 1, 2))(q32, k32, v32)
    for g, r in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size,kernel,strides,padding", [
    (8, 3, 1, ((1, 1), (1, 1))),     # the patch matmul: 64 output pixels
    (9, 3, 2, ((0, 1), (0, 1))),     # diffusers' asymmetric downsampling pad, odd input
    (7, 1, 1, ((0, 0), (0, 0))),     # 1x1
    (20, 3, 1, ((1, 1), (1, 1))),    # 400 pixels: XLA's convolution
    (6, 5, 1, ((2, 2), (2, 2))),
])
def test_conv2d_matches_xla_convolution(size, kernel, strides, padding):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, size, size + 1, 12)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 12, 5)), jnp.float32)
    ours = layers.conv2d(x, w, strides, padding)
    ref = jax.lax.conv_general_dilated(x, w, (strides, strides), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision="highest")
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-4)


def test_conv_module_keeps_flax_conv_parameters():
    x = jnp.ones((1, 6, 6, 3))
    ours = layers.conv(4, 3, strides=2, padding=((0, 1), (0, 1)), use_bias=True)
    params = ours.init(jax.random.key(0), x)["params"]
    assert {k: v.value.shape for k, v in params.items()} == {"kernel": (3, 3, 3, 4), "bias": (4,)}
    assert params["kernel"].names == (None, None, "embed", "mlp")
    flax_conv = nn.Conv(4, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)))
    unboxed = nn.meta.unbox(params)
    np.testing.assert_allclose(np.asarray(ours.apply({"params": params}, x)),
                               np.asarray(flax_conv.apply({"params": unboxed}, x)), atol=1e-5)


def attention_dtypes_seen(monkeypatch, dtype, upcast):
    """The dtypes of q, k, v that reach the attention kernel, and of the output."""
    seen = []
    kernel = jax.nn.dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append({a.dtype for a in (q, k, v)})
        return kernel(q, k, v, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v = qkv(8, 16, 12, dtype=dtype)
    out = jax.eval_shape(lambda *a: layers.multi_head_attention(*a, 3, upcast=upcast), q, k, v)
    return seen, out.dtype


@pytest.mark.parametrize("dtype, upcast, inner", [
    (jnp.float16, True, jnp.float32),    # the only case where upcasting buys range
    (jnp.float16, False, jnp.float16),
    (jnp.bfloat16, True, jnp.bfloat16),  # float32's range already: stays eligible for fused kernels
    (jnp.float32, True, jnp.float32),
])
def test_upcast_attention_only_upcasts_float16(monkeypatch, dtype, upcast, inner):
    seen, out_dtype = attention_dtypes_seen(monkeypatch, dtype, upcast)
    assert seen == [{jnp.dtype(inner)}] and out_dtype == dtype


def test_upcast_attention_float32_unchanged():
    q, k, v = qkv(8, 16, 12)
    attend = jax.jit(layers.multi_head_attention, static_argnums=3, static_argnames="upcast")
    np.testing.assert_array_equal(np.asarray(attend(q, k, v, 3, upcast=True)), np.asarray(attend(q, k, v, 3)))
