"""The SD ports' logical axis names against parallel's rules, and their shardings on an 8-device mesh."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from rectflow_jax import parallel
from rectflow_jax.models.clip_text import CLIPTextModel
from rectflow_jax.models.sd_unet import UNet2DConditionModel
from rectflow_jax.models.vae import AutoencoderKL

MODELS = {  # widths divide by 4, so fsdp x tensor = 4 can shard every weight
    "unet_sd1": (UNet2DConditionModel, dict(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
        cross_attention_dim=16, norm_num_groups=8)),
    "unet_sd2_remat": (UNet2DConditionModel, dict(  # linear projections; remat must keep the boxes
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=1, attention_head_dim=(2, 4),
        cross_attention_dim=24, norm_num_groups=8, use_linear_projection=True, upcast_attention=True), True),
    "vae": (AutoencoderKL, dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1)),
    "clip": (CLIPTextModel, dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, vocab_size=64, max_position_embeddings=8)),
}
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def boxed_params(name):
    cls, cfg, *remat = MODELS[name]
    module = cls.from_config(cfg, **({"remat": True} if remat else {}))
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]


@pytest.mark.parametrize("name", MODELS)
def test_every_param_has_axis_names_the_rules_know(name):
    boxed = boxed_params(name)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    known = {axis for axis, _ in parallel.logical_rules()}
    shapes = traverse_util.flatten_dict(nn.unbox(boxed))
    for path, spec in traverse_util.flatten_dict(nn.get_partition_spec(boxed)).items():
        assert len(spec) == len(shapes[path].shape), path
        assert {axis for axis in spec if axis is not None} <= known, (path, spec)
        if path[-1] in ("kernel", "embedding"):
            assert any(axis is not None for axis in spec), path


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest fakes 8 CPUs)")
@pytest.mark.parametrize("name", MODELS)
def test_param_shardings_on_8_devices_shard_the_kernels(name):
    boxed = boxed_params(name)
    shardings = traverse_util.flatten_dict(
        parallel.param_shardings(boxed, parallel.make_mesh(MESH), parallel.logical_rules()))
    logical = traverse_util.flatten_dict(nn.get_partition_spec(boxed))
    for path, shape in traverse_util.flatten_dict(nn.unbox(boxed)).items():
        shard = shardings[path].shard_shape(shape.shape)  # raises if a mesh axis does not divide its dim
        ways = int(np.prod(shape.shape) // np.prod(shard))
        if path[-1] == "embedding":
            assert ways == 2, path  # rows over fsdp
        elif path[-1] == "kernel" and np.prod(shape.shape) >= 1024:  # all but tiny output convs
            # Attention heads and feed-forward widths over fsdp x tensor (tensor parallelism);
            # convolutions and the other projections over fsdp only.
            expected = 4 if {"heads", "ff"} & set(logical[path]) else 2
            assert ways == expected, (path, shape.shape, shardings[path].spec)
