"""A tiny Stable Diffusion pipeline folder with random weights, written without torch.

What it is for: tests (parity with diffusers / transformers, loaders, the text-to-image
sampler) and the tiny CPU text-to-image pipeline `configs/tiny_text_to_image.py`, which
reads such a folder as its teacher with `--config.teacher.pretrained=DIR`. The folder is
laid out as diffusers writes one and loads in `diffusers.StableDiffusionPipeline`,
transformers' `CLIPTokenizer` / `CLIPTextModel` and our own loaders:

    DIR/model_index.json                StableDiffusionPipeline or RectifiedFlowPipeline
    DIR/unet/        config.json, diffusion_pytorch_model.safetensors
    DIR/vae/         config.json, diffusion_pytorch_model.safetensors
    DIR/text_encoder/config.json, model.safetensors
    DIR/tokenizer/   vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    DIR/scheduler/   scheduler_config.json  (SD 1.5's PNDMScheduler settings)

Command:

    python -m rectflow_jax.random_folder --out DIR [--prediction_type epsilon|v_prediction]
        [--kind stable_diffusion|rectified_flow] [--seed N]

The models are our Flax ports built from small diffusers-style configs (a UNet at 8x8x4
latents, a VAE mapping them to 16x16 RGB images, a 2-layer CLIP text encoder of width 32)
and initialised with jax.random from `seed` as flax's default initialisers would (see
`random_params`), except that the tensors those leave constant (biases at 0, norm scales
at 1) get small noise, so that no wrong name or layout mapping hides behind a trivial
tensor. The same seed gives byte-identical files.

The tokenizer is a real CLIP byte-level BPE: the 256 byte symbols, each also with the
end-of-word mark `</w>`, one whole-word token `word</w>` per word of the word list (the
module's CAPTION_WORDS by default) with the merges that lead to it, then <|startoftext|> and
<|endoftext|> (last two ids; <|endoftext|> also pads, as in SD). Any text tokenises;
words of the list are one id each, others fall back to shorter pieces down to bytes. It is
built by rectflow_jax/tokenizer.py (`build_bpe`, `write_tokenizer`).

`kind` only names the pipeline in model_index.json: "stable_diffusion" (a noise or
v-prediction SD model, `prediction_type` in the scheduler config) or "rectified_flow"
(InstaFlow's RectifiedFlowPipeline, which our text-to-image sampler takes as a velocity
model; the weights here are random either way).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rectflow_jax.models.clip_text import CLIPTextModel
from rectflow_jax.models.sd_unet import UNet2DConditionModel
from rectflow_jax.models.vae import AutoencoderKL
from rectflow_jax.tokenizer import BOS, EOS, build_bpe, write_tokenizer

PREDICTION_TYPES = ("epsilon", "v_prediction")
KINDS = ("stable_diffusion", "rectified_flow")
PIPELINE_CLASSES = {"stable_diffusion": "StableDiffusionPipeline", "rectified_flow": "RectifiedFlowPipeline"}
DIFFUSERS_VERSION = "0.21.4"  # written as the version that saved the folder (that of the released InstaFlow)
PERTURBATION = 0.02  # std of the noise added to the tensors init leaves constant

UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
    "act_fn": "silu", "attention_head_dim": 2, "block_out_channels": [32, 64], "center_input_sample": False,
    "cross_attention_dim": 32, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 1,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 8, "out_channels": 4, "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
    "act_fn": "silu", "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8, "out_channels": 3,
    "sample_size": 16, "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 2,
}
# vocab_size and the bos / eos / pad ids are set from the tokenizer.
CLIP_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0, "dropout": 0.0,
    "hidden_act": "quick_gelu", "hidden_size": 32, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 37, "layer_norm_eps": 1e-5, "max_position_embeddings": 77, "num_attention_heads": 4,
    "num_hidden_layers": 2, "projection_dim": 32,
}
# SD 1.5's scheduler_config.json; prediction_type is set as asked.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}

# Common caption words: each becomes one token (`word</w>`).
CAPTION_WORDS: tuple[str, ...] = tuple("""
a an the of in on at with and or to from by for under over near behind next above below
is are sitting standing walking running flying lying holding eating playing looking
photo photograph picture painting drawing illustration portrait image sketch render
cat cats dog dogs bird birds horse horses cow sheep fish bear elephant giraffe zebra lion tiger
man woman men women person people child children boy girl baby family friends
car cars bus truck train bicycle motorcycle boat plane airplane road street
house building city town tower bridge castle church room kitchen table chair bed window door
tree trees flower flowers grass forest garden field park mountain mountains hill river lake
sea ocean beach sand water snow rain sky cloud clouds sun moon star stars night day sunset
red blue green yellow white black brown orange purple pink gray golden colorful dark bright
big small large little tall old new young beautiful happy cute
wooden stone glass metal plate bowl cup food pizza cake fruit apple banana bread
hat shirt dress ball book phone computer clock light lamp fire smoke
style art digital oil watercolor detailed high quality realistic abstract
one two three many some very group top front side view close up
""".split())


# ---------------------------------------------------------------------------- weights


def random_params(module: nn.Module, key: jax.Array) -> dict[str, Any]:
    """Random params of `module`, shaped as its init gives them (traced only, nothing compiled).

    As flax's default initialisers, without their cost of compiling the module's forward
    pass: kernels (dense and conv) normal with std 1/sqrt(fan_in), embeddings normal with
    std 0.02. Biases and norm scales, which those leave at 0 and 1, get normal noise of std
    PERTURBATION. All of it comes from one jax.random.normal draw of `key`, split over the
    leaves in sorted path order.
    """
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())["params"])
    flat = sorted(traverse_util.flatten_dict(abstract).items())
    total = sum(int(np.prod(leaf.shape)) for _, leaf in flat)
    draws = np.asarray(jax.random.normal(key, (total,), jnp.float32))
    out, offset = {}, 0
    for path, leaf in flat:
        size = int(np.prod(leaf.shape))
        z = draws[offset:offset + size].reshape(leaf.shape)
        offset += size
        kind = path[-1]
        if kind == "kernel":
            value = z / np.float32(np.sqrt(np.prod(leaf.shape[:-1])))
        elif kind == "embedding":
            value = np.float32(0.02) * z
        elif kind == "scale":
            value = np.float32(1.0) + np.float32(PERTURBATION) * z
        elif kind == "bias":
            value = np.float32(PERTURBATION) * z
        else:
            raise ValueError(f"no initialiser for parameter {'/'.join(path)} of {type(module).__name__}")
        out[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def _merged(defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**defaults, **dict(overrides or {})}


def write_random_folder(out: str | Path, *, prediction_type: str = "epsilon", kind: str = "stable_diffusion",
                        seed: int = 0, unet: Mapping[str, Any] | None = None, vae: Mapping[str, Any] | None = None,
                        text_encoder: Mapping[str, Any] | None = None, vocab_words: Sequence[str] | None = None,
                        scheduler: Mapping[str, Any] | None = None) -> Path:
    """Writes a complete diffusers pipeline folder with random weights to `out`; returns its path.

    `unet`, `vae`, `text_encoder` and `scheduler` are config keys laid over the tiny defaults
    (UNET_CONFIG, VAE_CONFIG, CLIP_CONFIG, SCHEDULER_CONFIG); `vocab_words` replaces
    CAPTION_WORDS as the tokenizer's whole words. The CLIP config's vocab_size and token
    ids always follow the tokenizer. Files already in `out` are overwritten.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)

    vocab = write_tokenizer(root / "tokenizer", *build_bpe(CAPTION_WORDS if vocab_words is None else vocab_words))
    clip_config = _merged(CLIP_CONFIG, text_encoder)
    clip_config.update(vocab_size=len(vocab), bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                       pad_token_id=vocab[EOS])
    unet_config, vae_config = _merged(UNET_CONFIG, unet), _merged(VAE_CONFIG, vae)
    if unet_config["cross_attention_dim"] != clip_config["hidden_size"]:
        raise ValueError(f"the UNet's cross_attention_dim ({unet_config['cross_attention_dim']}) must equal the "
                         f"text encoder's hidden_size ({clip_config['hidden_size']})")

    keys = jax.random.split(jax.random.key(seed), 3)
    for name, module, key in (("unet", UNet2DConditionModel.from_config(unet_config), keys[0]),
                              ("vae", AutoencoderKL.from_config(vae_config), keys[1]),
                              ("text_encoder", CLIPTextModel.from_config(clip_config), keys[2])):
        module.save_pretrained(random_params(module, key), root / name)

    scheduler_config = {**_merged(SCHEDULER_CONFIG, scheduler), "prediction_type": prediction_type}
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2, sort_keys=True))

    index = {"_class_name": PIPELINE_CLASSES[kind], "_diffusers_version": DIFFUSERS_VERSION,
             "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", scheduler_config["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def write_random_controlnet(out: str | Path, unet_config_or_folder: Mapping[str, Any] | str | Path, *, seed: int = 0,
                            conditioning_embedding_out_channels: Sequence[int] | None = None,
                            conditioning_channels: int = 3) -> Path:
    """Writes a diffusers ControlNet folder (config.json, diffusion_pytorch_model.safetensors) with
    random weights for a UNet to `out`; returns its path.

    `unet_config_or_folder`: a UNet config dict, a UNet folder, or a pipeline folder (its unet/).
    The config is the one diffusers' ControlNetModel.from_unet builds. Weights come from
    `random_params`, so the zero-initialised convs of a fresh ControlNet are random here too and
    the residuals change the UNet's output. `conditioning_embedding_out_channels` None: the first
    len(vae.block_out_channels) of SD's (16, 32, 96, 256) for a pipeline folder with a VAE (the
    control image is then at the VAE's output size), SD's four otherwise.
    """
    from rectflow_jax.models.controlnet import (
        DEFAULT_CONDITIONING_EMBEDDING_OUT_CHANNELS, ControlNetModel, config_from_unet)

    vae_levels = None
    if isinstance(unet_config_or_folder, Mapping):
        unet_config = dict(unet_config_or_folder)
    else:
        folder = Path(unet_config_or_folder)
        unet_folder = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
        if not (unet_folder / "config.json").is_file():
            raise ValueError(f"{str(folder)!r} is neither a UNet folder nor a pipeline folder with unet/config.json")
        unet_config = json.loads((unet_folder / "config.json").read_text())
        if unet_folder != folder and (folder / "vae" / "config.json").is_file():
            vae_levels = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
    if conditioning_embedding_out_channels is None:
        conditioning_embedding_out_channels = DEFAULT_CONDITIONING_EMBEDDING_OUT_CHANNELS[:vae_levels]
    config = config_from_unet(UNet2DConditionModel.from_config(unet_config).config,
                              conditioning_channels=conditioning_channels,
                              conditioning_embedding_out_channels=conditioning_embedding_out_channels)
    config["_diffusers_version"] = DIFFUSERS_VERSION
    module = ControlNetModel.from_config(config)
    return module.save_pretrained(random_params(module, jax.random.key(seed)), out)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m rectflow_jax.random_folder",
                                     description="Write a tiny diffusers pipeline folder with random weights.")
    parser.add_argument("--out", required=True, help="folder to write (created if missing)")
    parser.add_argument("--prediction_type", default="epsilon", choices=PREDICTION_TYPES,
                        help="the scheduler config's prediction_type (default: epsilon)")
    parser.add_argument("--kind", default="stable_diffusion", choices=KINDS,
                        help="pipeline class in model_index.json: StableDiffusionPipeline or RectifiedFlowPipeline")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = parser.parse_args(argv)
    folder = write_random_folder(args.out, prediction_type=args.prediction_type, kind=args.kind, seed=args.seed)
    print(folder)
    return folder


if __name__ == "__main__":
    main()
