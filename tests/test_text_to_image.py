"""Text-to-image from a tiny random-weight folder laid out like the released InstaFlow checkpoint.

The folder is built with diffusers/transformers (weights perturbed so no zero-initialised
tensor hides a wrong mapping) and a hand-made CLIP BPE vocabulary. The PyTorch reference
sampler below is InstaFlow's published RectifiedFlowPipeline re-stated from its code, not
from ours, so that a convention error on our side (time direction, timestep, guidance rule,
latent scaling) shows as a mismatch.
"""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from rectflow_jax import parallel, sampling, text_to_image, weights  # noqa: E402
from rectflow_jax.text_to_image import TextToImage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UNET = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
            cross_attention_dim=32, sample_size=8, norm_num_groups=8)
VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, layers_per_block=1, latent_channels=4)
MERGES = ["a s", "p h", "o t", "ph ot", "phot o</w>", "c a", "ca t</w>", "o f</w>"]
# As in the released InstaFlow / 2-RF folders (the components we do not load are null here).
MODEL_INDEX = {"_class_name": "RectifiedFlowPipeline", "_diffusers_version": "0.21.4",
               "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
               "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
PROMPTS = ["a photo of a cat", "a cat", "photos of cats as a photo"]


def write_tokenizer(folder: Path) -> int:
    """A CLIP BPE tokenizer folder as released (vocab.json, merges.txt): bytes, a few merges, 2 specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                   pad_token="<|endoftext|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return len(vocab)


def perturbed(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The folder and the PyTorch models and tokenizer it holds."""
    folder = tmp_path_factory.mktemp("instaflow_tiny")
    vocab_size = write_tokenizer(folder / "tokenizer")
    clip_config = transformers.CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=37, vocab_size=vocab_size,
                                              max_position_embeddings=77, bos_token_id=vocab_size - 2,
                                              eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    torch.manual_seed(0)
    models = types.SimpleNamespace(
        unet=perturbed(diffusers.UNet2DConditionModel(**UNET), 1),
        vae=perturbed(diffusers.AutoencoderKL(**VAE), 2),
        clip=perturbed(transformers.CLIPTextModel(clip_config), 3),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        scheduler=diffusers.DPMSolverMultistepScheduler(),  # SD's, epsilon: only its init_noise_sigma is read
        folder=folder)
    models.unet.save_pretrained(folder / "unet", safe_serialization=True)
    models.vae.save_pretrained(folder / "vae", safe_serialization=True)
    models.clip.save_pretrained(folder / "text_encoder", safe_serialization=True)
    models.scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return models


@pytest.fixture(scope="module")
def pipe(ref):
    return TextToImage.from_pretrained(ref.folder)


def instaflow_reference(models, prompts, x0, num_inference_steps, guidance_scale=0.0, negative_prompt=None,
                        heun=False):
    """RectifiedFlowPipeline.__call__ of gnobitab/InstaFlow (code/pipeline_rf.py), re-stated in torch.

    What it does, read from that file: classifier-free guidance only when guidance_scale > 1,
    on the embeddings [negative; text] with v = v_neg + g (v_text - v_neg) (negative "" when
    none is given); latents = x0 * scheduler.init_noise_sigma; timesteps (1 - i / N) * 1000 for
    i = 0..N-1, dt = 1 / N, latents = latents + dt * v (noise at timestep 1000 toward the image);
    images = vae.decode(latents / scaling_factor), then (image / 2 + 0.5).clamp(0, 1) * 255,
    rounded. `x0` is NHWC as we draw it. heun=True is our extension, not in that pipeline: the
    mean of v at both ends of each step, the end at timestep (1 - (i + 1) / N) * 1000.
    """
    def encode(texts):
        ids = models.tokenizer(texts, padding="max_length", max_length=models.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
        return models.clip(ids)[0]

    guided = guidance_scale > 1.0
    with torch.no_grad():
        embeds = encode(list(prompts))
        if guided:
            negatives = [negative_prompt if negative_prompt is not None else ""] * len(prompts)
            embeds = torch.cat([encode(negatives), embeds])

        def velocity(latents, timestep):
            model_input = torch.cat([latents] * 2) if guided else latents
            v = models.unet(model_input, torch.full((len(model_input),), timestep), encoder_hidden_states=embeds).sample
            if guided:
                v_neg, v_text = v.chunk(2)
                v = v_neg + guidance_scale * (v_text - v_neg)
            return v

        latents = torch.from_numpy(np.array(x0, np.float32)).permute(0, 3, 1, 2) * models.scheduler.init_noise_sigma
        dt = 1.0 / num_inference_steps
        timesteps = [(1.0 - i / num_inference_steps) * 1000.0 for i in range(num_inference_steps)]
        for t in timesteps:
            v = velocity(latents, t)
            if heun:
                v = 0.5 * (v + velocity(latents + dt * v, t - dt * 1000.0))
            latents = latents + dt * v
        images = models.vae.decode(latents / models.vae.config.scaling_factor).sample
        images = (images / 2 + 0.5).clamp(0, 1)
    uint8 = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return latents.permute(0, 2, 3, 1).numpy(), uint8


def rel_err(ours, ref):
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


def noise(pipe, seeds):
    return text_to_image.initial_noise(seeds, [0] * len(seeds), pipe.latent_shape())


def rectflow(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", RECTFLOW_TRACEBACK="")
    return subprocess.run([sys.executable, "-m", "rectflow_jax.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)


def error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("rectflow: error:")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def sd_folder(ref, tmp_path):
    """The same components as a plain SD pipeline: StableDiffusionPipeline with an epsilon scheduler."""
    folder = tmp_path / "sd"
    folder.mkdir()
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / name).symlink_to(ref.folder / name)
    (folder / "model_index.json").write_text(json.dumps({**MODEL_INDEX, "_class_name": "StableDiffusionPipeline"}))
    return folder


# ---------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_cli_one_step(ref, tmp_path):
    result = rectflow("sample", f"--pretrained={ref.folder}", "--prompt", "a photo of a cat", f"--out={tmp_path}",
                      "--config.sample.num_steps=1", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    image = np.asarray(Image.open(tmp_path / "00000.png"))
    latents = np.load(tmp_path / "latents.npz")
    assert latents["x0"].shape == latents["x1"].shape == (1, 8, 8, 4) and latents["x1"].dtype == np.float32
    assert list(latents["seed"]) == [0] and list(latents["prompt_index"]) == [0]
    _, (expected,) = instaflow_reference(ref, ["a photo of a cat"], latents["x0"], 1)
    assert image.shape == expected.shape == (16, 16, 3) and np.abs(image.astype(int) - expected).max() <= 1
    record = json.loads((tmp_path / "prompts.json").read_text())
    assert record["num_steps"] == 1 and record["images"][0]["prompt"] == "a photo of a cat"


@pytest.mark.slow
def test_cli_heun_guided_prompts_file(ref, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    result = rectflow("sample", f"--pretrained={ref.folder}", f"--prompts-file={prompts}", f"--out={tmp_path}/o",
                      "--config.sample.num_steps=3", "--config.sample.method=heun",
                      "--config.sample.guidance_scale=1.5", "--config.sample.negative_prompt=cats",
                      "--config.sample.batch_size=2", "--config.seed=5", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["00000.png", "00001.png"]
    record = json.loads((tmp_path / "o" / "prompts.json").read_text())
    assert (record["guidance_scale"], record["negative_prompt"], record["num_steps"]) == (1.5, "cats", 3)
    assert [r["seed"] for r in record["images"]] == [5, 6]
    latents = np.load(tmp_path / "o" / "latents.npz")
    expected, _ = instaflow_reference(ref, PROMPTS[:2], latents["x0"], 3, 1.5, "cats", heun=True)
    assert rel_err(latents["x1"], expected) <= 1e-4  # Heun, not the Euler it used to run whatever was asked


def test_cli_refuses_an_unknown_method(ref, tmp_path):
    result = rectflow("sample", f"--pretrained={ref.folder}", "--prompt=a cat", f"--out={tmp_path}",
                      "--config.sample.method=rk4")
    assert "rk4" in error_line(result) and "euler" in error_line(result)
    assert not list(tmp_path.glob("*.png"))


def test_cli_samples_a_noise_prediction_folder_with_its_scheduler(ref, tmp_path):
    folder = sd_folder(ref, tmp_path)
    result = rectflow("sample", f"--pretrained={folder}", "--prompt=a cat", f"--out={tmp_path}/o",
                      "--config.sample.num_steps=3", "--config.sample.method=dpm_solver++",
                      "--config.sample.guidance_scale=3.0")
    assert result.returncode == 0, result.stderr[-3000:]
    written = np.load(tmp_path / "o" / "latents.npz")
    settings = json.loads((tmp_path / "o" / "prompts.json").read_text())
    assert settings["parametrisation"] == "epsilon" and settings["method"] == "dpm_solver++"
    expected, _ = TextToImage.from_pretrained(folder).generate(["a cat"], written["x0"], num_steps=3, guidance_scale=3.0,
                                                               method="dpm_solver++", decode=False)
    np.testing.assert_allclose(written["x1"], expected, rtol=0, atol=1e-5)
    # A kind of folder we do not know is one line.
    odd = tmp_path / "odd"
    odd.mkdir()
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (odd / name).symlink_to(ref.folder / name)
    (odd / "model_index.json").write_text(json.dumps({**MODEL_INDEX, "_class_name": "KandinskyPipeline"}))
    line = error_line(rectflow("sample", f"--pretrained={odd}", "--prompt=a cat", f"--out={tmp_path}/p"))
    assert "KandinskyPipeline" in line and "prediction_type=velocity" in line


def test_cli_bad_folder_is_one_line(ref, tmp_path):
    result = rectflow("sample", f"--pretrained={ref.folder / 'unet'}", "--prompt=a cat", f"--out={tmp_path}")
    assert "no model_index.json" in error_line(result)


# ---------------------------------------------------------------------------- parity with PyTorch


# Heun against the reference: test_cli_heun_guided_prompts_file.
@pytest.mark.parametrize("num_steps, guidance_scale, method", [(1, 0.0, "euler"), (4, 1.5, "euler")])
def test_matches_instaflow_reference(ref, pipe, num_steps, guidance_scale, method):
    x0 = noise(pipe, [7, 8])
    prompts = PROMPTS[:2]
    latents, images = pipe.generate(prompts, x0, num_steps=num_steps, guidance_scale=guidance_scale,
                                    negative_prompt="a cat", method=method)
    expected_latents, expected_images = instaflow_reference(ref, prompts, x0, num_steps, guidance_scale, "a cat",
                                                            heun=method == "heun")
    rel = rel_err(latents, expected_latents)
    print(f"\n[text_to_image] {method} {num_steps} steps, guidance {guidance_scale}: latents max rel |diff| {rel:.2e}")
    assert rel <= 1e-4
    assert np.abs(images.astype(int) - expected_images).max() <= 1
    assert not np.allclose(latents[0], latents[1])  # the prompts matter


def test_guidance_only_above_one(ref, pipe):
    """Scales 0 and 1 both sample the conditional model alone (InstaFlow's one-step model runs at 0);
    1.5 guides (test_matches_instaflow_reference)."""
    x0 = noise(pipe, [7, 8])  # the shapes and steps of a parity case: its compilation is reused
    at = {scale: pipe.generate(PROMPTS[:2], x0, num_steps=1, guidance_scale=scale, negative_prompt="a cat")[0]
          for scale in (0.0, 1.0)}
    np.testing.assert_array_equal(at[0.0], at[1.0])
    conditional, _ = instaflow_reference(ref, PROMPTS[:2], x0, 1, 1.0)
    assert rel_err(at[0.0], conditional) <= 1e-4
    negative_only, _ = instaflow_reference(ref, ["a cat"] * 2, x0, 1)  # v_u + 0 (v_c - v_u): the old scale 0
    assert rel_err(at[0.0], negative_only) > 1e-2


@pytest.mark.slow
def test_export_loads_in_diffusers_as_a_whole_pipeline(ref, pipe, tmp_path):
    rng = np.random.default_rng(4)  # new values: PyTorch can only match them through our export
    params = jax.tree.map(lambda p: p + 0.02 * rng.standard_normal(p.shape, np.float32), pipe.params)
    changed = TextToImage(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, params)
    changed.save_pretrained(tmp_path)
    # The whole folder, as the released InstaFlow folders are loaded: by a StableDiffusionPipeline-shaped
    # class (InstaFlow's RectifiedFlowPipeline is one; diffusers itself has no class of that name).
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path)
    assert loaded.scheduler.init_noise_sigma == 1.0 and loaded.safety_checker is None
    exported = types.SimpleNamespace(unet=loaded.unet.eval(), vae=loaded.vae.eval(), clip=loaded.text_encoder.eval(),
                                     tokenizer=loaded.tokenizer, scheduler=loaded.scheduler)
    x0 = noise(pipe, [1])
    latents, _ = changed.generate(PROMPTS[:1], x0, num_steps=1)
    expected, _ = instaflow_reference(exported, PROMPTS[:1], x0, 1)
    assert rel_err(latents, expected) <= 1e-4
    reloaded = TextToImage.from_pretrained(tmp_path)  # prediction_type auto: a velocity model again
    np.testing.assert_array_equal(reloaded.tokenize(PROMPTS), pipe.tokenize(PROMPTS))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(reloaded.params), jax.device_get(params))


def test_noise_prediction_folder_is_a_diffusion_model_unless_vouched_for(ref, tmp_path):
    folder = sd_folder(ref, tmp_path)
    assert TextToImage.from_pretrained(folder).teacher.parametrisation == "epsilon"
    vouched = TextToImage.from_pretrained(folder, prediction_type="velocity")
    assert vouched.pipeline_class == "StableDiffusionPipeline" and vouched.teacher.is_velocity
    with pytest.raises(weights.WeightLoadError, match="prediction_type must be one of auto, velocity"):
        TextToImage.from_pretrained(folder, prediction_type="epsilon")


@pytest.mark.slow
def test_bf16_compute_close(ref, pipe):
    half = TextToImage.from_pretrained(ref.folder, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}  # stored as computed
    x0 = noise(pipe, [2])
    latents, _ = half.generate(PROMPTS[:1], x0, num_steps=1)
    full, _ = pipe.generate(PROMPTS[:1], x0, num_steps=1)
    assert latents.dtype == np.float32 and rel_err(latents, full) <= 5e-2


# ---------------------------------------------------------------------------- loading mistakes


def _copy(ref, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(ref.folder, folder)
    return folder


def _to_bin(folder):
    """The unet as a PyTorch pickle (diffusion_pytorch_model.bin) instead of safetensors."""
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = {k: torch.from_numpy(np.array(v)) for k, v in weights.read_safetensors(file).items()}
    torch.save(state, folder / "unet" / "diffusion_pytorch_model.bin")
    file.unlink()


def test_wrong_folder(ref, tmp_path):
    with pytest.raises(weights.WeightLoadError, match="does not exist or is not a directory"):
        TextToImage.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(weights.WeightLoadError, match="no model_index.json"):
        TextToImage.from_pretrained(ref.folder / "unet")


def test_missing_subfolder(ref, tmp_path):
    folder = _copy(ref, tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(weights.WeightLoadError, match="subfolder 'vae' is missing"):
        TextToImage.from_pretrained(folder)
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(ref.folder / "vae", folder / "vae")
    with pytest.raises(weights.WeightLoadError, match="subfolder 'tokenizer' is missing"):
        TextToImage.from_pretrained(folder)


def test_misshaped_tensor_is_named(ref, tmp_path):
    folder = _copy(ref, tmp_path)
    file = folder / "text_encoder" / "model.safetensors"
    state = weights.read_safetensors(file)
    name = next(k for k in state if k.endswith("layers.1.mlp.fc1.weight"))
    state[name] = state[name][:, :-1]
    weights.write_safetensors(file, state)
    with pytest.raises(weights.WeightLoadError, match=r"mis-shaped 1: .*layers\.1\.mlp\.fc1\.weight"):
        TextToImage.from_pretrained(folder)


def test_pickle_weights_need_opt_in_and_torch(ref, tmp_path, monkeypatch):
    folder = _copy(ref, tmp_path)
    _to_bin(folder)
    with pytest.raises(weights.WeightLoadError, match="allow_pickle"):
        TextToImage.from_pretrained(folder)
    allowed = TextToImage.from_pretrained(folder, allow_pickle=True)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(allowed.params["unet"]),
                 jax.device_get(TextToImage.from_pretrained(ref.folder).params["unet"]))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if not installed
    with pytest.raises(weights.WeightLoadError, match="needs torch, which is not installed"):
        TextToImage.from_pretrained(folder, allow_pickle=True)


def test_mismatched_components(ref, tmp_path):
    folder = _copy(ref, tmp_path)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 48}))
    with pytest.raises(weights.WeightLoadError, match="mis-shaped"):  # the weights no longer fit
        TextToImage.from_pretrained(folder)
    index = {**MODEL_INDEX, "unet": ["diffusers", "UNet2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(weights.WeightLoadError, match="unet is a UNet2DModel"):
        TextToImage.from_pretrained(folder)


# ---------------------------------------------------------------------------- seeds, batches, interpolation


def test_same_seed_same_image(pipe, tmp_path):
    a = text_to_image.generate_to_folder(pipe, PROMPTS[:1], tmp_path / "a", seed=3, progress=False)
    b = text_to_image.generate_to_folder(pipe, PROMPTS[:1], tmp_path / "b", seed=3, progress=False)
    c = text_to_image.generate_to_folder(pipe, PROMPTS[:1], tmp_path / "c", seed=4, progress=False)
    read = lambda folder, records: np.asarray(Image.open(folder / records[0]["file"]))
    np.testing.assert_array_equal(read(tmp_path / "a", a), read(tmp_path / "b", b))
    assert not np.array_equal(read(tmp_path / "a", a), read(tmp_path / "c", c))


@pytest.mark.slow
def test_padded_batches_compile_once_and_match_single_runs(ref, tmp_path):
    fresh = TextToImage.from_pretrained(ref.folder)
    records = text_to_image.generate_to_folder(fresh, PROMPTS, tmp_path / "all", seed=10, batch_size=2,
                                               num_steps=2, progress=False)
    assert fresh.traces == 1  # two batches (the second padded), one trace and compilation
    latents = np.load(tmp_path / "all" / "latents.npz")
    assert latents["x1"].shape == (3, 8, 8, 4) and list(latents["seed"]) == [10, 11, 12]
    assert len(list((tmp_path / "all").glob("*.png"))) == 3
    for k in (0, 2):  # a full and a padded batch
        text_to_image.generate_to_folder(fresh, [PROMPTS[k]], tmp_path / f"one{k}", seed=10 + k, num_steps=2,
                                         progress=False)
        single = np.load(tmp_path / f"one{k}" / "latents.npz")
        np.testing.assert_array_equal(single["x0"][0], latents["x0"][k])
        np.testing.assert_allclose(single["x1"][0], latents["x1"][k], rtol=0, atol=1e-5)
        ours = np.asarray(Image.open(tmp_path / f"one{k}" / "00000.png")).astype(int)
        assert np.abs(ours - np.asarray(Image.open(tmp_path / "all" / records[k]["file"]))).max() <= 1


def test_interpolation_endpoints_are_the_seeds_images(pipe, tmp_path):
    records = text_to_image.interpolate_to_folder(pipe, PROMPTS[:1], tmp_path / "lerp", seeds=(3, 9), num_frames=4,
                                                  batch_size=4, progress=False)
    frames = np.load(tmp_path / "lerp" / "latents.npz")
    assert list(frames["alpha"]) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    for seed, frame in ((3, 0), (9, 3)):
        text_to_image.generate_to_folder(pipe, PROMPTS[:1], tmp_path / str(seed), seed=seed, progress=False)
        single = np.load(tmp_path / str(seed) / "latents.npz")
        np.testing.assert_array_equal(frames["x0"][frame], single["x0"][0])
        np.testing.assert_allclose(frames["x1"][frame], single["x1"][0], rtol=0, atol=1e-5)
    norms = np.linalg.norm(frames["x0"].reshape(4, -1), axis=1)
    assert norms[1:3].min() > 0.95 * norms[[0, 3]].min()  # slerp keeps the norm; a lerp shrinks it ~30% midway
    strip = np.asarray(Image.open(tmp_path / "lerp" / "interpolation_00000.png"))
    assert strip.shape == (16, 4 * 16, 3)
    np.testing.assert_array_equal(strip[:, :16], np.asarray(Image.open(tmp_path / "lerp" / records[0]["file"])))


def test_slerp_endpoints_exact():
    a, b = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(text_to_image.slerp(a, b, 0.0), a)
    np.testing.assert_array_equal(text_to_image.slerp(a, b, 1.0), b)


def test_batched_guidance_equals_two_calls():
    cond, uncond = (lambda x, t: 2.0 * x + t[:, None]), (lambda x, t: x - 1.0)
    both = lambda x, t: jnp.concatenate([cond(x[:2], t[:2]), uncond(x[2:], t[2:])])
    x, t = jnp.arange(6.0).reshape(2, 3), jnp.array([0.25, 0.5])
    np.testing.assert_allclose(sampling.classifier_free_guidance_batched(both, 1.5)(x, t),
                               sampling.classifier_free_guidance(cond, uncond, 1.5)(x, t))


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    long_prompt = " ".join(["a photo of a cat"] * 30)  # ~120 tokens
    with caplog.at_level("WARNING", logger="rectflow"):
        ids = pipe.tokenize(["a cat", long_prompt])
    assert ids.shape == (2, 77)
    warnings = [r.getMessage() for r in caplog.records if "tokens long" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("prompt 1 is ")


@pytest.mark.slow
def test_batches_split_over_the_devices(ref):
    devices = jax.local_device_count()  # 8 fake CPU devices from conftest, unless XLA_FLAGS says otherwise
    if devices < 2:
        pytest.skip(f"needs several devices, have {devices} (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    spread = TextToImage.from_pretrained(ref.folder)
    single = TextToImage.from_pretrained(ref.folder, mesh=parallel.make_mesh({"data": 1}))
    prompts, x0 = [PROMPTS[i % 3] for i in range(devices)], noise(spread, list(range(devices)))
    latents, images = spread.generate(prompts, x0, num_steps=2, guidance_scale=2.0)
    (runner,) = spread._runners.values()
    assert runner.chunk == devices and len(runner.rows.device_set) == devices  # rows split over every device
    one_latents, one_images = single.generate(prompts, x0, num_steps=2, guidance_scale=2.0)
    np.testing.assert_allclose(latents, one_latents, rtol=0, atol=1e-5)
    assert np.abs(images.astype(int) - one_images).max() <= 1
    # A batch that does not divide is padded to one that does (one compilation per batch size).
    np.testing.assert_allclose(spread.generate(prompts[:1], x0[:1], num_steps=2, guidance_scale=2.0)[0],
                               one_latents[:1], rtol=0, atol=1e-5)
