"""from_pretrained places params on devices (or keeps them on the host when asked), leaf by leaf."""

import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rectflow_jax import parallel
from rectflow_jax.models.clip_text import CLIPTextModel
from rectflow_jax.models.sd_unet import UNet2DConditionModel
from rectflow_jax.models.vae import AutoencoderKL

MODELS = {  # subfolder -> (class, config); widths divide by 4 so fsdp x tensor = 4 can shard them
    "unet": (UNet2DConditionModel, dict(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
        cross_attention_dim=16, norm_num_groups=8)),
    "vae": (AutoencoderKL, dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1)),
    "text_encoder": (CLIPTextModel, dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, vocab_size=64, max_position_embeddings=8)),
}
needs_8_devices = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest fakes 8 CPUs)")


def boxed_shapes(module):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A pipeline-like folder of the three models with random weights, written by our export."""
    root = tmp_path_factory.mktemp("pretrained")
    rng = np.random.default_rng(0)
    for name, (cls, cfg) in MODELS.items():
        module = cls.from_config(cfg)
        params = jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32),
                              nn.unbox(boxed_shapes(module)))
        module.save_pretrained(params, root / name)
    return root


@pytest.mark.parametrize("name", MODELS)
def test_default_is_jax_arrays_on_the_default_device(folder, name):
    cls, _ = MODELS[name]
    _, params = cls.from_pretrained(folder, name)
    _, host = cls.from_pretrained(folder, name, on_host=True)
    leaves = jax.tree.leaves(params)
    assert leaves and all(isinstance(p, jax.Array) and p.devices() == {jax.devices()[0]} for p in leaves)
    assert all(type(h) is np.ndarray for h in jax.tree.leaves(host))
    jax.tree.map(np.testing.assert_array_equal, params, host)


@needs_8_devices
def test_one_sharding_places_every_leaf(folder):
    replicated = NamedSharding(parallel.make_mesh(), P())
    _, params = UNet2DConditionModel.from_pretrained(folder, shardings=replicated)
    assert all(p.sharding == replicated and p.committed for p in jax.tree.leaves(params))


@needs_8_devices
@pytest.mark.parametrize("name", MODELS)
def test_a_tree_of_shardings_places_each_leaf(folder, name):
    cls, cfg = MODELS[name]
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = parallel.param_shardings(boxed_shapes(cls.from_config(cfg)), mesh, parallel.logical_rules())
    _, params = cls.from_pretrained(folder, name, shardings=shardings)
    _, host = cls.from_pretrained(folder, name, on_host=True)
    placed = jax.tree.leaves(jax.tree.map(lambda p, s: p.sharding == s, params, shardings))
    assert placed and all(placed)
    assert any(not p.sharding.is_fully_replicated for p in jax.tree.leaves(params))
    jax.tree.map(lambda p, h: np.testing.assert_array_equal(np.asarray(p), h), params, host)


def test_bad_placement_is_one_clear_error(folder):
    replicated = NamedSharding(parallel.make_mesh(devices=jax.devices()[:1]), P())
    with pytest.raises(ValueError, match="on_host"):
        AutoencoderKL.from_pretrained(folder, shardings=replicated, on_host=True)
    _, host = AutoencoderKL.from_pretrained(folder, on_host=True)
    partial = jax.tree.map(lambda _: replicated, host)
    del partial["decoder"]["conv_in"]
    with pytest.raises(ValueError, match="decoder/conv_in/kernel"):
        AutoencoderKL.from_pretrained(folder, shardings=partial)


def test_params_do_not_alias_the_file(folder, tmp_path):
    shutil.copytree(folder / "vae", tmp_path / "vae")
    _, params = AutoencoderKL.from_pretrained(tmp_path)
    expected = jax.tree.map(np.array, params)
    # Rewritten in place (as a tool that opens the file for writing would): memory-mapped views change.
    file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"\0" * (size - size // 2))
    jax.tree.map(np.testing.assert_array_equal, params, expected)
