"""The random-weight pipeline folder (rectflow_jax.random_folder) and the diffusers reference (sd_reference).

The folder is written by our Flax ports alone; here diffusers, transformers and our loaders
read it back, our UNet is compared with diffusers' on it, and diffusers' own
StableDiffusionPipeline samples it with DDIM and DPM-Solver++ through sd_reference.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from rectflow_jax import random_folder, text_to_image, weights  # noqa: E402
from rectflow_jax import tokenizer as clip_bpe  # noqa: E402
from rectflow_jax.models.clip_text import CLIPTextModel  # noqa: E402
from rectflow_jax.models.sd_unet import UNet2DConditionModel  # noqa: E402
from rectflow_jax.models.vae import AutoencoderKL  # noqa: E402

import sd_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = [(kind, prediction) for kind in random_folder.KINDS for prediction in random_folder.PREDICTION_TYPES]
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}
PROMPTS = ["a photo of a cat sitting on a wooden table", "two dogs running on the beach at sunset"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(kind, prediction_type) -> the folder written with seed 0, each written once."""
    root, written = tmp_path_factory.mktemp("random_folders"), {}

    def get(kind="stable_diffusion", prediction_type="epsilon"):
        if (kind, prediction_type) not in written:
            written[kind, prediction_type] = random_folder.write_random_folder(
                root / f"{kind}_{prediction_type}", kind=kind, prediction_type=prediction_type, seed=0)
        return written[kind, prediction_type]

    return get


def rel_err(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def assert_same_tensors(torch_model, file, prefix=""):
    """Every tensor diffusers / transformers hold is the file's, and the file has none left over."""
    stored = weights.read_safetensors(file)
    state = {k: v for k, v in torch_model.state_dict().items() if not k.endswith("position_ids")}
    assert {prefix + k for k in state} == set(stored)
    for name, value in state.items():
        np.testing.assert_array_equal(value.numpy(), stored[prefix + name], err_msg=name)


# ---------------------------------------------------------------------------- the folder


@pytest.mark.parametrize("kind, prediction_type", KINDS)
def test_folder_loads_in_diffusers_and_transformers(folders, kind, prediction_type):
    folder = folders(kind, prediction_type)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == random_folder.PIPELINE_CLASSES[kind]
    assert index["safety_checker"] == index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False and index["scheduler"] == ["diffusers", "PNDMScheduler"]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == {**random_folder.SCHEDULER_CONFIG, "prediction_type": prediction_type}
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["beta_schedule"]) == (0.00085, 0.012,
                                                                                            "scaled_linear")

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae")
    clip = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    assert_same_tensors(unet, folder / "unet" / WEIGHT_FILES["unet"])
    assert_same_tensors(vae, folder / "vae" / WEIGHT_FILES["vae"])
    assert_same_tensors(clip, folder / "text_encoder" / WEIGHT_FILES["text_encoder"], prefix="text_model.")
    assert (unet.config.sample_size, unet.config.cross_attention_dim, list(unet.config.block_out_channels)) == (
        8, 32, [32, 64])
    assert (vae.config.latent_channels, vae.config.scaling_factor) == (4, 0.18215)
    assert (clip.config.hidden_size, clip.config.num_hidden_layers, clip.config.intermediate_size) == (32, 2, 37)

    if kind == "stable_diffusion":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
        assert pipe.safety_checker is None and pipe.feature_extractor is None
        assert type(pipe.scheduler).__name__ == "PNDMScheduler"
        assert pipe.scheduler.config.prediction_type == prediction_type and pipe.scheduler.config.steps_offset == 1
        assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 8  # 16x16 images


def test_no_tensor_is_trivial(folders):
    folder = folders()
    for name, file in WEIGHT_FILES.items():
        for tensor_name, value in weights.read_safetensors(folder / name / file).items():
            assert value.dtype == np.float32 and np.isfinite(value).all(), tensor_name
            assert np.ptp(value) > 1e-3, f"{name}: {tensor_name} is constant"
    unet = weights.read_safetensors(folder / "unet" / WEIGHT_FILES["unet"])
    assert abs(float(np.mean(unet["conv_norm_out.weight"])) - 1.0) < 0.02  # norm scales around 1
    assert float(np.std(unet["conv_in.weight"])) == pytest.approx(1 / np.sqrt(4 * 3 * 3), rel=0.1)  # lecun


def test_tokenizer_gives_whole_words(folders):
    folder = folders()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    ids = tokenizer(PROMPTS[0]).input_ids
    assert ids == [vocab["<|startoftext|>"], *(vocab[w + "</w>"] for w in PROMPTS[0].split()), vocab["<|endoftext|>"]]
    # Every word of the list, in one text: one id each.
    words = list(random_folder.CAPTION_WORDS)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(" ".join(words), truncation=False).input_ids)
    assert tokens[1:-1] == [w + "</w>" for w in words] and len(words) >= 190
    # Text off the list still tokenises, in pieces; upper case is folded.
    assert len(tokenizer("xylophone").input_ids) > 3
    assert tokenizer("A CAT").input_ids == tokenizer("a cat").input_ids
    # The text encoder's ids follow the tokenizer, and SD's padding is <|endoftext|>.
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) == len(vocab)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (len(vocab) - 2, len(vocab) - 1,
                                                                                     len(vocab) - 1)
    padded = tokenizer(["a cat"], padding="max_length", max_length=tokenizer.model_max_length).input_ids[0]
    assert len(padded) == 77 and padded[-1] == tokenizer.eos_token_id


def test_vocab_words_override(tmp_path):
    words = ["zebra", "zebras", "zero", "aardvark", "a", "Zeal"]
    vocab = clip_bpe.write_tokenizer(tmp_path / "tok", *clip_bpe.build_bpe(words))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tok")
    for word in ("zebra", "zebras", "zero", "aardvark", "a", "zeal"):
        assert tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids) == ["<|startoftext|>", word + "</w>",
                                                                               "<|endoftext|>"]
    assert "cat</w>" not in vocab and len(tokenizer("cat").input_ids) > 3  # in pieces
    for bad in (["two words"], ["x2"], [""]):
        with pytest.raises(ValueError, match="letters only"):
            clip_bpe.build_bpe(bad)


def test_bpe_keeps_earlier_words_whole():
    """Words sharing prefixes and suffixes in awkward orders all come out whole."""
    words = ["at", "cat", "cats", "scat", "tacos", "taco", "a", "aaa", "aa", "aaaa"]
    vocab, merges = clip_bpe.build_bpe(words)
    ranks = {pair: i for i, pair in enumerate(merges)}
    byte_map = clip_bpe.bytes_to_unicode()
    for word in words:
        assert clip_bpe._bpe(clip_bpe._word_symbols(word, byte_map), ranks) == [word + "</w>"]
    assert len(vocab) == 512 + len({a + b for a, b in merges}) + 2


# ---------------------------------------------------------------------------- our loaders and parity


def test_our_loaders_read_it(folders):
    folder = folders("rectified_flow")
    unet, unet_params = UNet2DConditionModel.from_pretrained(folder, "unet")
    vae, _ = AutoencoderKL.from_pretrained(folder, "vae")
    clip, _ = CLIPTextModel.from_pretrained(folder, "text_encoder")
    assert (unet.block_out_channels, unet.attention_head_dim, unet.cross_attention_dim) == ((32, 64), 2, 32)
    assert (vae.latent_channels, vae.block_out_channels, clip.hidden_size) == (4, (32, 64), 32)
    stored = weights.read_safetensors(folder / "unet" / WEIGHT_FILES["unet"])
    np.testing.assert_array_equal(np.asarray(unet_params["conv_in"]["bias"]), stored["conv_in.bias"])
    pipe = text_to_image.TextToImage.from_pretrained(folder)  # a RectifiedFlowPipeline: sampled as velocity
    assert pipe.latent_shape() == (8, 8, 4)
    diffusion = text_to_image.TextToImage.from_pretrained(folders("stable_diffusion"))  # epsilon: a diffusion model
    assert pipe.teacher.is_velocity and diffusion.teacher.parametrisation == "epsilon"


def test_unet_and_text_encoder_match_diffusers(folders):
    folder = folders()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    timesteps = np.array([961.0, 1.0], np.float32)
    ids = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")(
        PROMPTS, padding="max_length", max_length=77, return_tensors="np").input_ids

    clip, clip_params = CLIPTextModel.from_pretrained(folder, "text_encoder")
    ours_text = np.asarray(jax.jit(clip.apply)({"params": clip_params}, ids))
    torch_clip = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    with torch.no_grad():
        ref_text = torch_clip(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert rel_err(ours_text, ref_text) <= 1e-4

    unet, params = UNet2DConditionModel.from_pretrained(folder, "unet")
    ours = np.asarray(jax.jit(unet.apply)({"params": params}, sample, timesteps, ref_text))
    torch_unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
                         torch.from_numpy(ref_text)).sample.permute(0, 2, 3, 1).numpy()
    rel = rel_err(ours, ref)
    print(f"\n[random_folder] UNet max rel |diff| vs diffusers: {rel:.2e}")
    assert rel <= 1e-4
    assert rel_err(ref[0], ref[1]) > 1e-2  # the inputs matter: not a trivially constant network


# ---------------------------------------------------------------------------- the diffusers reference


def test_diffusers_timesteps(folders):
    folder = folders()
    ddim = sd_reference.diffusers_timesteps(folder, "ddim", 25)
    dpm = sd_reference.diffusers_timesteps(folder, "dpm_solver++", 25)
    print(f"\n[sd_reference] DDIM 25 steps: {ddim}\n[sd_reference] DPM-Solver++ 25 steps: {dpm}")
    assert ddim == list(range(961, 0, -40))  # 'leading' spacing + steps_offset 1, from the PNDM config
    assert len(dpm) == 25 and dpm[0] == 999 and dpm[-1] == 40 and dpm == sorted(dpm, reverse=True)  # 'linspace'
    with pytest.raises(ValueError, match="scheduler must be one of"):
        sd_reference.diffusers_timesteps(folder, "euler", 25)


@pytest.mark.parametrize("scheduler", sd_reference.SCHEDULERS)
def test_diffusers_latents_run(folders, scheduler):
    x0 = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    out = {kind: sd_reference.diffusers_latents(folders(*kind), PROMPTS, x0, scheduler=scheduler, num_steps=3,
                                                guidance_scale=7.5)
           for kind in [("stable_diffusion", "epsilon"), ("stable_diffusion", "v_prediction"),
                        ("rectified_flow", "epsilon")]}
    latents = out["stable_diffusion", "epsilon"]
    assert latents.shape == x0.shape and latents.dtype == np.float32 and np.isfinite(latents).all()
    assert rel_err(latents, x0) > 1e-2 and rel_err(latents[0], latents[1]) > 1e-2
    # Same weights (seed 0): only the scheduler config's prediction_type differs, and it is honoured.
    assert rel_err(out["stable_diffusion", "v_prediction"], latents) > 1e-2
    # The RectifiedFlowPipeline folder, same weights and scheduler config: the same pipeline runs.
    np.testing.assert_allclose(out["rectified_flow", "epsilon"], latents, rtol=0, atol=1e-5 * np.abs(latents).max())
    pipe = sd_reference.load_pipeline(folders())
    assert type(pipe.scheduler).__name__ == {"ddim": "DDIMScheduler", "dpm_solver++": "DPMSolverMultistepScheduler"}[
        scheduler]
    assert sd_reference.load_pipeline(folders()) is pipe  # cached
    again = sd_reference.diffusers_latents(folders(), PROMPTS, x0, scheduler=scheduler, num_steps=3,
                                           guidance_scale=7.5, negative_prompt="a cat")
    assert rel_err(again, latents) > 1e-3  # the negative prompt reaches the unconditional half


def test_diffusers_latents_one_ddim_step_by_hand(folders):
    """One unguided DDIM step, written out from the folder's own models: the noise given is the noise used."""
    folder = folders()
    x0 = np.random.default_rng(2).standard_normal((1, 8, 8, 4)).astype(np.float32)
    latents = sd_reference.diffusers_latents(folder, PROMPTS[:1], x0, scheduler="ddim", num_steps=1,
                                             guidance_scale=1.0)
    pipe = sd_reference.load_pipeline(folder)
    ids = pipe.tokenizer(PROMPTS[:1], padding="max_length", max_length=77, return_tensors="pt").input_ids
    alphas = pipe.scheduler.alphas_cumprod.double()
    a_t, a_prev = alphas[1], alphas[0]  # timestep 1 ('leading', offset 1); then set_alpha_to_one=False
    x = torch.from_numpy(x0).permute(0, 3, 1, 2)
    with torch.no_grad():
        eps = pipe.unet(x, torch.tensor([1]), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample.double()
    pred = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    expected = (a_prev.sqrt() * pred + (1 - a_prev).sqrt() * eps).permute(0, 2, 3, 1).numpy()
    assert rel_err(latents, expected) <= 1e-5


# ---------------------------------------------------------------------------- the command


def test_cli_writes_the_same_folder(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run([sys.executable, "-m", "rectflow_jax.random_folder", "--out", str(tmp_path / "cli"),
                             "--kind", "rectified_flow", "--prediction_type", "v_prediction", "--seed", "3"],
                            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    same = random_folder.write_random_folder(tmp_path / "fn", kind="rectified_flow", prediction_type="v_prediction",
                                             seed=3)
    files = sorted(p.relative_to(same) for p in same.rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*") if p.is_file()) == files
    assert len(files) == 12  # model_index, scheduler 1, text_encoder 2, tokenizer 4, unet 2, vae 2
    for file in files:
        assert (tmp_path / "cli" / file).read_bytes() == (same / file).read_bytes(), file
    other = random_folder.write_random_folder(tmp_path / "seed4", kind="rectified_flow", seed=4)
    for name, file in WEIGHT_FILES.items():
        assert (other / name / file).read_bytes() != (same / name / file).read_bytes(), name
    assert json.loads((same / "model_index.json").read_text())["_class_name"] == "RectifiedFlowPipeline"
    assert json.loads((same / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        random_folder.write_random_folder(tmp_path / "a", kind="instaflow")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        random_folder.write_random_folder(tmp_path / "b", prediction_type="sample")
    with pytest.raises(ValueError, match="cross_attention_dim"):
        random_folder.write_random_folder(tmp_path / "c", unet={"cross_attention_dim": 48})
    with pytest.raises(SystemExit) as exit_info:
        random_folder.main(["--out", str(tmp_path / "d"), "--kind", "sdxl"])
    assert exit_info.value.code == 2 and not (tmp_path / "d").exists()


def test_config_overrides(tmp_path):
    folder = random_folder.write_random_folder(tmp_path / "wide", unet={"block_out_channels": [16, 32]},
                                               text_encoder={"num_hidden_layers": 1},
                                               scheduler={"_class_name": "DPMSolverMultistepScheduler"})
    assert json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"] == [16, 32]
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 1
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers",
                                                                                  "DPMSolverMultistepScheduler"]
    unet, params = UNet2DConditionModel.from_pretrained(folder, "unet")
    assert params["conv_in"]["kernel"].shape == (3, 3, 4, 16)
