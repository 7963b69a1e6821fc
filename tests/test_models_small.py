"""Our small velocity networks: shapes, conditioning, dropout, logical axes, config building."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rectflow_jax.models import MLPVelocity, UNet, build_velocity_model, init_params, param_partition_specs

IMAGE_SHAPE = (8, 8, 1)
# XLA:CPU compiles threefry slowly (about 1 s per random draw under load); init through an
# RBG key compiles several times faster and exercises the same code.
KEY = functools.partial(jax.random.key, impl="unsafe_rbg")
TINY_UNET = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.5)


def _all_named(specs) -> bool:
    leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    return bool(leaves) and all(any(axis is not None for axis in spec) for spec in leaves)


@pytest.fixture(scope="module")
def unet():
    """A tiny UNet with random params drawn in numpy from the eval_shape tree.

    Two reasons not to use `init_params` here: a fresh DDPM init makes every residual
    branch zero, so time, labels and dropout would not reach the output, and compiling
    the init of even a tiny UNet costs many seconds on a shared CPU.
    """
    model = UNet(num_classes=10, **TINY_UNET)
    shapes = jax.eval_shape(model.init, KEY(0), jnp.zeros((1, *IMAGE_SHAPE)), jnp.zeros(1),
                            {"label": jnp.zeros(1, jnp.int32)})["params"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype),
                                    nn.unbox(shapes))
    forward = jax.jit(lambda x, t, labels, key, train: model.apply(
        {"params": params}, x, t, None if labels is None else {"label": labels}, train=train,
        rngs={"dropout": key}), static_argnums=4)
    return model, params, forward


@pytest.fixture(scope="module")
def image_inputs():
    x = jax.random.normal(KEY(1), (2, *IMAGE_SHAPE))
    return x, jnp.array([0.1, 0.9]), jnp.array([3, 7])


def test_mlp_shapes_conditioning_and_axes():
    model = MLPVelocity(hidden=32, depth=2, time_embed_dim=16, num_classes=3)
    params = init_params(model, KEY(0), (2,), 3)
    apply = jax.jit(lambda x, t, labels: model.apply({"params": params}, x, t, {"label": labels}))
    x, t = jax.random.normal(KEY(1), (5, 2)), jnp.linspace(0.0, 1.0, 5)
    zeros, ones = jnp.zeros(5, jnp.int32), jnp.ones(5, jnp.int32)
    v = apply(x, t, zeros)
    assert v.shape == (5, 2) and v.dtype == jnp.float32
    assert float(jnp.abs(v).mean()) > 1e-3  # the output layer is not zero-initialised
    assert not jnp.allclose(v, apply(x, t, ones)) and not jnp.allclose(v, apply(x, 1.0 - t, zeros))
    # labels=None is the extra "no label" row, index num_classes.
    unlabelled = model.apply({"params": params}, x, t)
    assert jnp.allclose(unlabelled, apply(x, t, 3 * ones)) and not jnp.allclose(v, unlabelled)
    assert _all_named(param_partition_specs(model, (2,), 3))


def test_unet_fresh_init_gives_nonzero_output():
    model = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    params = init_params(model, KEY(0), (4, 4, 1), 0)
    assert not any(isinstance(p, nn.Partitioned) for p in
                   jax.tree_util.tree_leaves(params, is_leaf=lambda p: isinstance(p, nn.Partitioned)))
    x = jax.random.normal(KEY(1), (2, 4, 4, 1))
    v = jax.jit(model.apply)({"params": params}, x, jnp.array([0.2, 0.7]))
    assert v.shape == x.shape and float(jnp.abs(v).mean()) > 1e-4


def test_unet_output_shape(unet, image_inputs):
    _, _, forward = unet
    v = forward(*image_inputs, KEY(0), False)
    assert v.shape == image_inputs[0].shape and v.dtype == jnp.float32 and bool(jnp.isfinite(v).all())


def test_unet_class_and_time_conditioning(unet, image_inputs):
    _, _, forward = unet
    x, t, labels = image_inputs
    key = KEY(0)
    v = forward(x, t, labels, key, False)
    assert not jnp.allclose(v, forward(x, t, labels + 1, key, False))
    assert not jnp.allclose(v, forward(x, 1.0 - t, labels, key, False))
    # labels=None is the extra "no label" row, index num_classes.
    assert jnp.array_equal(forward(x, t, None, key, False), forward(x, t, jnp.full(2, 10), key, False))


def test_unet_dropout_only_in_train_mode(unet, image_inputs):
    model, params, forward = unet
    eval_out = forward(*image_inputs, KEY(0), False)
    assert jnp.array_equal(eval_out, forward(*image_inputs, KEY(1), False))
    # Tracing is enough to show which mode asks for the 'dropout' rng.
    x, t, labels = image_inputs
    jax.eval_shape(lambda: model.apply({"params": params}, x, t, {"label": labels}))
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda: model.apply({"params": params}, x, t, {"label": labels}, train=True))
    train_0, train_1 = (forward(*image_inputs, KEY(s), True) for s in (0, 1))
    assert not jnp.allclose(train_0, train_1) and not jnp.allclose(train_0, eval_out)
    assert jnp.array_equal(train_0, forward(*image_inputs, KEY(0), True))


def test_unet_params_have_logical_axes(unet):
    model, params, _ = unet
    specs = param_partition_specs(model, IMAGE_SHAPE, 10)
    assert jax.tree_util.tree_structure(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)) \
        == jax.tree_util.tree_structure(params)
    assert _all_named(specs)
    assert specs["conv_in"]["kernel"] == jax.sharding.PartitionSpec(None, None, "embed", "mlp")


def test_unet_time_embeddings():
    t = jnp.array([0.0, 0.5, 1.0])
    for embedding_type in ("positional", "fourier"):
        features = UNet(ch=16, embedding_type=embedding_type).apply({}, t, method=UNet._time_features)
        assert features.shape == (3, 16) and bool(jnp.isfinite(features).all())
        assert not jnp.allclose(features[0], features[2])
    with pytest.raises(ValueError, match="divisible by 2"):
        jax.eval_shape(UNet(**TINY_UNET).init, KEY(0), jnp.zeros((1, 5, 5, 1)), jnp.zeros(1))
    with pytest.raises(ValueError, match="embedding_type"):
        UNet(ch=16, embedding_type="learned").apply({}, t, method=UNet._time_features)


def test_build_velocity_model_from_config():
    config = ml_collections.ConfigDict(dict(name="unet", dtype="bfloat16", **TINY_UNET))
    config.ch_mult = [1, 2]  # lists become tuples: module fields must be hashable
    model = build_velocity_model(config, IMAGE_SHAPE, 10)
    assert isinstance(model, UNet) and model.ch_mult == (1, 2) and model.num_classes == 10
    assert model.dtype == jnp.bfloat16
    x = jnp.zeros((2, *IMAGE_SHAPE))
    v, variables = jax.eval_shape(lambda: model.init_with_output(KEY(0), x, jnp.zeros(2), {"label": jnp.zeros(2, int)}))
    assert v.dtype == jnp.float32 and v.shape == x.shape  # bf16 compute, float32 params and output
    assert {p.dtype for p in jax.tree_util.tree_leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}
    mlp = build_velocity_model(ml_collections.ConfigDict(dict(name="mlp", hidden=8)), (2,), 0)
    assert isinstance(mlp, MLPVelocity) and mlp.hidden == 8 and mlp.depth == 3


@pytest.mark.parametrize("config, shape, num_classes, message", [
    (dict(name="mlp", hidden=8, widht=3), (2,), 0, "widht"),
    (dict(name="unet", ch=8, hidden=8), IMAGE_SHAPE, 0, "hidden"),
    (dict(name="transformer"), (2,), 0, "valid names"),
    (dict(name="mlp", num_classes=5), (2,), 10, "num_classes"),
    (dict(name="unet"), (2,), 0, "rank"),
])
def test_build_velocity_model_rejects_bad_configs(config, shape, num_classes, message):
    with pytest.raises(ValueError, match=message):
        build_velocity_model(ml_collections.ConfigDict(config), shape, num_classes)


def test_init_params_is_deterministic_in_rng():
    model = MLPVelocity(hidden=8, depth=1)
    a, b = (init_params(model, KEY(s), (3,), 0) for s in (0, 0))
    c = init_params(model, KEY(1), (3,), 0)
    same = lambda p, q: all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)))
    assert same(a, b) and not same(a, c)
