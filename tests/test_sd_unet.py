"""Parity of the Flax SD UNet with diffusers' PyTorch UNet2DConditionModel on random weights."""

import functools
import gc
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from rectflow_jax import weights  # noqa: E402
from rectflow_jax.models.sd_unet import UNet2DConditionModel  # noqa: E402

from storage_dtype import assert_storage_follows_param_dtype  # noqa: E402

TINY = {
    # SD 1.x layout: conv proj_in/out, attention_head_dim = number of heads.
    "sd1": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
                cross_attention_dim=32, sample_size=16, norm_num_groups=8),
    # SD 2.x layout: linear projections, upcast attention, per-block heads, other time embedding.
    "sd2": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=2, attention_head_dim=(2, 4),
                transformer_layers_per_block=2, cross_attention_dim=48, sample_size=16, norm_num_groups=16,
                use_linear_projection=True, upcast_attention=True, flip_sin_to_cos=False, freq_shift=1),
    # Odd widths: 24 channels / 5 heads floors to 20 inner features; per-block layers; padding-0
    # downsampling and an 18x20 input, so upsampling must resize to the skips' odd sizes.
    "odd": dict(block_out_channels=(24, 48, 48), down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, layers_per_block=(1, 2, 1),
                attention_head_dim=(5, 3, 3), cross_attention_dim=20, norm_num_groups=8, downsample_padding=0,
                mid_block_scale_factor=1.5, sample_size=(18, 20)),
}
SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # the rest are diffusers defaults


def _inputs(cfg, batch=2, tokens=7, seed=0):
    rng = np.random.default_rng(seed)
    size = cfg["sample_size"]
    h, w = size if isinstance(size, tuple) else (size, size)
    sample = rng.standard_normal((batch, h, w, 4), dtype=np.float32)
    timesteps = np.array([999.0, 10.5, 500.0, 0.0][:batch], np.float32)
    context = rng.standard_normal((batch, tokens, cfg["cross_attention_dim"]), dtype=np.float32)
    return sample, timesteps, context


def _torch_unet(cfg, seed=0):
    """A diffusers UNet with every parameter perturbed, so zero-initialised tensors hide nothing."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _torch_forward(model, sample, timesteps, context):
    with torch.no_grad():
        out = model(torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
                    torch.from_numpy(context)).sample
    return out.permute(0, 2, 3, 1).numpy()


@functools.cache  # modules hash by config: one compile per configuration across tests
def _jitted_apply(module):
    return jax.jit(module.apply)


def _flax_forward(module, params, *inputs):
    return np.asarray(_jitted_apply(module)({"params": params}, *inputs))


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> (diffusers folder, inputs, torch output), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg = TINY[name]
            folder = tmp_path_factory.mktemp(name)
            model = _torch_unet(cfg)
            model.save_pretrained(folder / "unet", safe_serialization=True)
            inputs = _inputs(cfg)
            cache[name] = folder, inputs, _torch_forward(model, *inputs)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(TINY))
def test_matches_diffusers(reference, name):
    folder, inputs, expected = reference(name)
    module, params = UNet2DConditionModel.from_pretrained(folder)
    out = _flax_forward(module, params, *inputs)
    assert out.shape == expected.shape and out.dtype == np.float32
    rel = _rel(out, expected)
    print(f"\n[sd_unet] {name}: max|torch| {np.max(np.abs(expected)):.3f}  max rel |diff| {rel:.2e}")
    assert rel <= 1e-4


@pytest.mark.parametrize("name", ["sd1", "sd2"])  # 1x1-conv and linear projection layouts
def test_export_loads_in_diffusers(tmp_path, name):
    cfg = TINY[name]
    module = UNet2DConditionModel.from_config({"_class_name": "UNet2DConditionModel", **cfg})
    # Random values in the init shapes, without running init.
    abstract = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs())))["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.2, s.shape).astype(np.float32), abstract)

    module.save_pretrained(params, tmp_path / "unet")
    saved = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert saved["sample_size"] == cfg["sample_size"] and saved["_class_name"] == "UNet2DConditionModel"
    model = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    inputs = _inputs(cfg)
    rel = _rel(_flax_forward(module, params, *inputs), _torch_forward(model, *inputs))
    print(f"\n[sd_unet] export {name}: max rel |diff| {rel:.2e}")
    assert rel <= 1e-4


def test_bf16_compute(reference):
    folder, inputs, _ = reference("sd1")
    module, params = UNet2DConditionModel.from_pretrained(folder)
    full = _flax_forward(module, params, *inputs)
    half = _flax_forward(module.clone(dtype=jnp.bfloat16), params, *inputs)
    rel = _rel(half, full)
    print(f"\n[sd_unet] bf16 compute vs float32: max rel |diff| {rel:.2e}")
    assert half.dtype == np.float32 and rel <= 5e-2


# The smallest UNet with remat-wrapped resnets and transformer blocks: its backward pass compiles in ~30 s.
REMAT_TINY = dict(block_out_channels=(8,), down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, attention_head_dim=2,
                  cross_attention_dim=8, norm_num_groups=4, mid_block_type=None)


def _remat_gradients():
    """(plain module, remat module, params, jitted gradient function of a module)."""
    module = UNet2DConditionModel.from_config(REMAT_TINY)
    remat = module.clone(remat=True)
    shapes = lambda m: nn.unbox(jax.eval_shape(lambda: m.init(jax.random.key(0), *m.dummy_inputs())))
    assert jax.tree.structure(shapes(remat)) == jax.tree.structure(shapes(module))  # same names
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32), shapes(module)["params"])
    sample, _, context = _inputs({**REMAT_TINY, "sample_size": 4}, batch=1, tokens=3)
    grad = lambda m: jax.jit(jax.grad(lambda p: jnp.mean(m.apply({"params": p}, sample, 500.0, context) ** 2)))
    return module, remat, params, grad


def test_remat_recomputes_the_forward_pass():
    module, remat, params, grad = _remat_gradients()
    # Lowered, not compiled (compiling both backward passes costs a minute of CPU): remat puts
    # optimisation barriers around the saved inputs and runs the blocks' matmuls again.
    plain, rematted = (grad(m).lower(params).as_text() for m in (module, remat))
    assert "optimization_barrier" in rematted and "optimization_barrier" not in plain
    assert rematted.count("dot_general") > plain.count("dot_general")


@pytest.mark.slow
def test_remat_same_gradients_other_program():
    module, remat, params, grad = _remat_gradients()
    compiled = {m.remat: grad(m).lower(params).compile() for m in (module, remat)}
    expected, got = (jax.tree.leaves(compiled[r](params)) for r in (False, True))
    scale = max(float(np.max(np.abs(g))) for g in expected)
    assert scale > 0 and max(float(np.max(np.abs(a - b))) for a, b in zip(got, expected)) <= 1e-5 * scale
    dots = {r: len(re.findall(r"\bdot\(", c.as_text())) for r, c in compiled.items()}
    assert dots[True] > dots[False]  # XLA kept the recomputation


@pytest.mark.parametrize("name, dtype, inner", [
    ("sd2", jnp.float16, jnp.float32),    # upcast_attention=True where it matters
    ("sd2", jnp.bfloat16, jnp.bfloat16),  # bf16 has float32's range: no cast, fused attention stays possible
    ("sd1", jnp.float16, jnp.float16),    # no upcast_attention
])
def test_upcast_attention_follows_dtype(monkeypatch, name, dtype, inner):
    seen, kernel = [], jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda q, k, v, **kw: seen.append({a.dtype for a in (q, k, v)}) or kernel(q, k, v, **kw))
    module = UNet2DConditionModel.from_config(TINY[name], dtype=dtype)
    jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))  # traces every attention
    assert seen and all(kinds == {jnp.dtype(inner)} for kinds in seen)


def test_storage_dtype_is_param_dtype(reference):
    folder, _, _ = reference("sd1")
    assert_storage_follows_param_dtype(UNet2DConditionModel, folder, TINY["sd1"])


def test_scalar_timestep_broadcasts(reference):
    folder, (sample, _, context), _ = reference("sd1")
    module, params = UNet2DConditionModel.from_pretrained(folder)
    vector = _flax_forward(module, params, sample, np.full((2,), 321.0, np.float32), context)
    np.testing.assert_array_equal(_flax_forward(module, params, sample, 321.0, context), vector)


def test_misshaped_tensor_is_named(reference, tmp_path):
    folder, _, _ = reference("sd1")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text())
    state = weights.read_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")
    state[name] = state[name][:, :-1]
    weights.write_safetensors(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", state)
    with pytest.raises(weights.WeightLoadError, match=name.replace(".", r"\.")):
        UNet2DConditionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value", [("class_embed_type", "timestep"), ("only_cross_attention", True),
                                        ("down_block_types", ("AttnDownBlock2D", "DownBlock2D")),
                                        ("resnet_time_scale_shift", "scale_shift")])
def test_unsupported_config_is_named(key, value):
    with pytest.raises(NotImplementedError, match=key):
        UNet2DConditionModel.from_config({**TINY["sd1"], key: value})


@pytest.mark.slow
def test_sd15_size_matches_diffusers(tmp_path):
    model = _torch_unet(SD15)
    inputs = _inputs(SD15, batch=1, tokens=77)
    expected = _torch_forward(model, *inputs)
    model.save_pretrained(tmp_path / "unet", safe_serialization=True)
    del model
    gc.collect()
    module, params = UNet2DConditionModel.from_pretrained(tmp_path)
    rel = _rel(_flax_forward(module, params, *inputs), expected)
    print(f"\n[sd_unet] SD 1.5 size: max|torch| {np.max(np.abs(expected)):.3f}  max rel |diff| {rel:.2e}")
    assert rel <= 1e-4
