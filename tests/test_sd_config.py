"""Strict SD configs: every diffusers/transformers key is implemented, metadata, or refused by name."""

import inspect

import numpy as np
import pytest

from rectflow_jax import weights
from rectflow_jax.models.clip_text import CLIPTextModel
from rectflow_jax.models.sd_unet import UNet2DConditionModel
from rectflow_jax.models.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

UNET = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
            cross_attention_dim=32, sample_size=8, norm_num_groups=8)
VAE = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
CLIP = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=1000)
MODELS = {"unet": (UNet2DConditionModel, UNET), "vae": (AutoencoderKL, VAE), "clip": (CLIPTextModel, CLIP)}

# The files of the Stable Diffusion 1.5 folder as released (diffusers 0.6, transformers 4.22).
SD15 = {
    "unet": {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
             "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
             "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
             "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
    "vae": {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
            "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4},
    "clip": {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
             "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
             "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02,
             "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
             "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
             "projection_dim": 768, "torch_dtype": "float32", "transformers_version": "4.22.0.dev0",
             "vocab_size": 49408},
}


def _diffusers_defaults(cls) -> dict:
    """Every config key of the installed diffusers class, at its default, as config.json writes it."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: list(p.default) if isinstance(p.default, tuple) else p.default
            for p in params if p.name != "self" and p.default is not inspect.Parameter.empty}


def test_every_key_of_the_installed_libraries_is_classified():
    # A key the port does not know is refused, so a new diffusers/transformers key shows up here.
    UNet2DConditionModel.from_config({**_diffusers_defaults(diffusers.UNet2DConditionModel), **UNET})
    AutoencoderKL.from_config({**_diffusers_defaults(diffusers.AutoencoderKL), **VAE})
    CLIPTextModel.from_config(transformers.CLIPTextConfig(**CLIP).to_dict())


@pytest.mark.parametrize("name", SD15)
def test_released_configs_load(name):
    cls, _ = MODELS[name]
    module = cls.from_config(SD15[name])
    for key in ("cross_attention_dim", "block_out_channels", "hidden_size"):
        if key in SD15[name]:
            assert np.array_equal(getattr(module, key), SD15[name][key])


@pytest.mark.parametrize("name, key, value", [
    ("vae", "shift_factor", 0.0609),          # SD3 / Flux latent shift
    ("vae", "latents_mean", [0.1, 0.2, 0.3, 0.4]),
    ("vae", "latents_std", [1.0, 1.1, 1.2, 1.3]),
    ("vae", "act_fn", "gelu"),
    ("vae", "up_block_types", ["AttnUpDecoderBlock2D"] * 2),
    ("unet", "dropout", 0.1),                 # training would silently lose its dropout
    ("unet", "time_cond_proj_dim", 256),      # LCM guidance embedding
    ("unet", "addition_embed_type", "text_time"),
    ("unet", "encoder_hid_dim", 64),
    ("unet", "resnet_time_scale_shift", "scale_shift"),
    ("unet", "only_cross_attention", [True, False]),
    ("clip", "attention_dropout", 0.1),
    ("clip", "pruned_heads", {"0": [1]}),
    ("clip", "model_type", "clip"),            # a whole CLIP model's config, text_config nested
    ("clip", "hidden_act", "gelu_new"),
    ("unet", "a_future_key", 1),              # unknown to the port: it cannot tell what it does
    ("vae", "a_future_key", 1),
    ("clip", "a_future_key", 1),
])
def test_unsupported_key_is_named(name, key, value):
    cls, cfg = MODELS[name]
    with pytest.raises(NotImplementedError, match=key) as err:
        cls.from_config({**cfg, key: value})
    assert isinstance(err.value, weights.WeightLoadError)  # one line in the CLI


@pytest.mark.parametrize("name, key, value", [
    ("unet", "act_fn", "swish"), ("unet", "dropout", 0.0), ("vae", "shift_factor", 0.0), ("vae", "act_fn", "swish"),
    ("clip", "chunk_size_feed_forward", 4), ("clip", "use_bfloat16", True),  # same maths / transformers 4 metadata
])
def test_equivalent_values_pass(name, key, value):
    cls, cfg = MODELS[name]
    cls.from_config({**cfg, key: value})


# Keys diffusers hands only to blocks this port refuses: any value must leave a supported UNet alone.
INERT = {"resnet_skip_time_act": True, "resnet_out_scale_factor": 2.0, "cross_attention_norm": "group_norm",
         "mid_block_only_cross_attention": True, "addition_embed_type_num_heads": 3, "addition_time_embed_dim": 7,
         "projection_class_embeddings_input_dim": 5}


def test_inert_unet_keys_change_nothing_in_diffusers():
    torch = pytest.importorskip("torch")
    UNet2DConditionModel.from_config({**UNET, **INERT})
    rng = np.random.default_rng(0)
    inputs = (torch.from_numpy(rng.standard_normal((1, 4, 8, 8), dtype=np.float32)), torch.tensor([500.0]),
              torch.from_numpy(rng.standard_normal((1, 3, 32), dtype=np.float32)))
    reference = diffusers.UNet2DConditionModel(**UNET).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
        expected = reference(*inputs).sample
        for key, value in INERT.items():
            model = diffusers.UNet2DConditionModel(**UNET, **{key: value}).eval()
            model.load_state_dict(reference.state_dict())  # strict: the same parameters
            assert torch.equal(model(*inputs).sample, expected), key
