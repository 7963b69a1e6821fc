"""Parity of the Flax AutoencoderKL with diffusers' PyTorch one, and its weight I/O."""

import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rectflow_jax import weights
from rectflow_jax.models.vae import AutoencoderKL

from storage_dtype import assert_storage_follows_param_dtype

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4)
# Widths not powers of two, three levels, two resnets per level, no quant_conv.
ODD = dict(block_out_channels=(24, 48, 48), norm_num_groups=8, layers_per_block=2, latent_channels=3,
           use_quant_conv=False)
SD15 = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2, latent_channels=4,
            sample_size=512)


def torch_vae(cfg, seed=0):
    n = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                    up_block_types=("UpDecoderBlock2D",) * n, **cfg).eval()
    with torch.no_grad():  # so that zero-initialised tensors cannot hide a wrong mapping
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)  # NHWC


def to_torch(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def rel_err(ours, ref):
    err = float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
    print(f"\n[vae] {test}: max rel |diff| {err:.2e}")  # the parity figures, with pytest -s
    return err


@functools.cache  # equal modules share one compilation across tests
def jitted(vae, method):
    return jax.jit(lambda p, x: vae.apply({"params": p}, x, method=method))


def encode(vae, params, x):
    return jitted(vae, "encode")(params, x)


def decode(vae, params, z):
    return jitted(vae, "decode")(params, z)


def torch_reference(model, x):
    """Posterior mean, logvar (NHWC) and the decoded mean, from diffusers."""
    with torch.no_grad():
        posterior = model.encode(to_torch(x)).latent_dist
        recon = model.decode(posterior.mean).sample
    return to_nhwc(posterior.mean), to_nhwc(posterior.logvar), to_nhwc(recon)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers model, folder holding its `vae` subfolder)."""
    model = torch_vae(TINY)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder / "vae", safe_serialization=True)
    return model, folder


@pytest.mark.parametrize("cfg, shape", [(TINY, (2, 32, 32, 3)), (ODD, (1, 20, 36, 3))], ids=["tiny", "odd"])
def test_matches_diffusers(cfg, shape, tmp_path):
    model = torch_vae(cfg)
    model.save_pretrained(tmp_path / "vae", safe_serialization=True)
    vae, params = AutoencoderKL.from_pretrained(tmp_path)
    x = images(shape)
    mean, logvar, recon = torch_reference(model, x)
    posterior = encode(vae, params, x)
    assert posterior.mean.shape == mean.shape
    assert rel_err(posterior.mean, mean) <= 1e-4
    assert rel_err(posterior.logvar, logvar) <= 1e-4
    assert rel_err(decode(vae, params, mean), recon) <= 1e-4
    assert vae.scaling_factor == model.config.scaling_factor


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    model = torch_vae(SD15)
    folder = tmp_path_factory.mktemp("sd15")
    model.save_pretrained(folder / "vae", safe_serialization=True)
    return model, AutoencoderKL.from_pretrained(folder)


def test_sd15_encode_matches_diffusers(sd15):
    model, (vae, params) = sd15
    x = images((1, 64, 64, 3))
    with torch.no_grad():
        posterior = model.encode(to_torch(x)).latent_dist
    ours = encode(vae, params, x)
    assert rel_err(ours.mean, to_nhwc(posterior.mean)) <= 1e-4
    assert rel_err(ours.logvar, to_nhwc(posterior.logvar)) <= 1e-4


@pytest.mark.slow
def test_sd15_decode_512_matches_diffusers(sd15):
    model, (vae, params) = sd15
    z = np.random.default_rng(1).standard_normal((1, 64, 64, 4)).astype(np.float32)
    with torch.no_grad():
        ref = to_nhwc(model.decode(to_torch(z)).sample)
    ours = decode(vae, params, z)
    assert ours.shape == (1, 512, 512, 3)
    assert rel_err(ours, ref) <= 1e-4


def test_export_loads_in_diffusers(tiny, tmp_path):
    _, folder = tiny
    vae, params = AutoencoderKL.from_pretrained(folder)
    rng = np.random.default_rng(1)  # new values, so diffusers can only match through our export
    params = jax.tree.map(lambda p: p + 0.02 * rng.standard_normal(p.shape, np.float32), params)
    vae.save_pretrained(params, tmp_path / "vae")

    exported = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert exported == json.loads((folder / "vae" / "config.json").read_text())
    model = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    x = images((2, 32, 32, 3))
    mean, logvar, recon = torch_reference(model, x)
    posterior = encode(vae, params, x)
    assert rel_err(posterior.mean, mean) <= 1e-4
    assert rel_err(posterior.logvar, logvar) <= 1e-4
    assert rel_err(decode(vae, params, mean), recon) <= 1e-4


def test_legacy_attention_names_load(tiny, tmp_path):
    model, folder = tiny
    legacy = {}
    for name, tensor in model.state_dict().items():
        array = tensor.numpy()
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in name:
                name = name.replace(f".{new}.", f".{old}.")
                if old in ("value", "proj_attn") and array.ndim == 2:
                    array = array[:, :, None, None]  # some checkpoints store them as 1x1 convs
        legacy[name] = array
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    (tmp_path / "vae").mkdir()
    shutil.copy(folder / "vae" / "config.json", tmp_path / "vae")
    weights.write_safetensors(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", legacy)

    _, expected = AutoencoderKL.from_pretrained(folder)
    _, params = AutoencoderKL.from_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_bf16_compute_close(tiny):
    model, folder = tiny
    vae, params = AutoencoderKL.from_pretrained(folder, dtype=jnp.bfloat16)
    x = images((2, 32, 32, 3))
    mean, logvar, recon = torch_reference(model, x)
    posterior = encode(vae, params, x)
    assert posterior.mean.dtype == jnp.float32
    assert rel_err(posterior.mean, mean) <= 5e-2
    assert rel_err(posterior.logvar, logvar) <= 5e-2
    assert rel_err(decode(vae, params, mean), recon) <= 5e-2


def test_storage_dtype_is_param_dtype(tiny):
    _, folder = tiny
    assert_storage_follows_param_dtype(AutoencoderKL, folder, TINY)


def test_scaling_factor_is_read_and_exported(tmp_path):
    cfg = {**TINY, "scaling_factor": 0.13025}  # SDXL's: anything but the 0.18215 default
    torch_vae(cfg).save_pretrained(tmp_path / "vae", safe_serialization=True)
    vae, params = AutoencoderKL.from_pretrained(tmp_path)
    assert vae.scaling_factor == 0.13025
    vae.clone(scaling_factor=0.5).save_pretrained(params, tmp_path / "export")
    assert diffusers.AutoencoderKL.from_pretrained(tmp_path / "export").config.scaling_factor == 0.5


@pytest.mark.parametrize("force_upcast", [True, False])
def test_force_upcast_computes_float16_in_float32(force_upcast):
    # One level and no attention block (XLA:CPU rejects jax.nn.dot_product_attention's float16 matmul).
    cfg = dict(block_out_channels=(16,), norm_num_groups=4, mid_block_add_attention=False)
    full = AutoencoderKL.from_config(cfg)
    half = AutoencoderKL.from_config({**cfg, "force_upcast": force_upcast}, dtype=jnp.float16)
    rng = np.random.default_rng(2)
    shapes = jax.eval_shape(lambda: full.init(jax.random.key(0), *full.dummy_inputs()))["params"]
    params = jax.tree.map(lambda a: rng.normal(0.0, 0.1, a.shape).astype(np.float32), nn.unbox(shapes))
    z = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    if force_upcast:  # diffusers' default: float32 whatever the float16 request
        np.testing.assert_array_equal(decode(half, params, z), decode(full, params, z))
    else:
        assert 0 < rel_err(decode(half, params, z), decode(full, params, z)) <= 5e-2


def test_sample_and_reconstruction(tiny):
    _, folder = tiny
    vae, params = AutoencoderKL.from_pretrained(folder)
    x = images((2, 32, 32, 3))
    posterior = encode(vae, params, x)
    z = posterior.sample(jax.random.key(0))
    assert z.shape == (2, 16, 16, 4) and not np.allclose(z, posterior.mean)
    np.testing.assert_allclose(jitted(vae, "__call__")(params, x), decode(vae, params, posterior.mean), atol=1e-5)


def test_misshaped_tensor_names_it(tiny, tmp_path):
    model, folder = tiny
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["decoder.conv_in.weight"] = state["decoder.conv_in.weight"][:-1]
    (tmp_path / "vae").mkdir()
    shutil.copy(folder / "vae" / "config.json", tmp_path / "vae")
    weights.write_safetensors(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", state)
    with pytest.raises(weights.WeightLoadError, match=r"decoder\.conv_in\.weight"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_unsupported_config_raises():
    with pytest.raises(NotImplementedError, match="act_fn"):
        AutoencoderKL.from_config({**TINY, "act_fn": "gelu"})
