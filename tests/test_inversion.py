"""Image -> noise -> image (rectflow_jax/inversion.py) on tiny random diffusers folders.

What holds and is tested: explicit steps backwards are not the inverse of the forward
steps, so the round trip of a velocity model is exact only in the limit (its error must
fall as the steps grow), and exact for the discrete sampler once each backward step is
solved by fixed-point iteration (`refine`). DDIM inversion of an epsilon folder is checked
against diffusers' DDIMInverseScheduler driven by the same torch UNet: the same states,
the same update; the one convention that differs (diffusers' inversion loops call the UNet
at the step's target timestep, ours at the state's own) is pinned by calling the torch
UNet at the state's timestep. The image reader is checked against VaeImageProcessor.
"""

import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from rectflow_jax import diffusion, inversion, parallel, random_folder, teachers  # noqa: E402
from rectflow_jax.text_to_image import TextToImage, TextToImageError  # noqa: E402

NUM_IMAGES = 8


def one_device():
    """One CPU device, not conftest's 8 fake ones: the mesh is not under test here, and 8 shards of these
    tiny batches cost compile and run time on 2 cores."""
    import jax

    return parallel.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("inversion")
    return {"velocity": random_folder.write_random_folder(root / "velocity", kind="rectified_flow", seed=1),
            "epsilon": random_folder.write_random_folder(root / "epsilon", kind="stable_diffusion", seed=2)}


@pytest.fixture(scope="module")
def velocity_pipe(folders):
    return TextToImage.from_pretrained(folders["velocity"], mesh=one_device())


@pytest.fixture(scope="module")
def epsilon_pipe(folders):
    return TextToImage.from_pretrained(folders["epsilon"], mesh=one_device())


@pytest.fixture(scope="module")
def digits():
    """Real small images: sklearn's digits as 16x16 RGB in [-1, 1] (the folders' image size)."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:NUM_IMAGES].astype(np.float32) / 8.0 - 1.0
    return np.stack([inversion.load_image(image, 16, 16, 3) for image in images])


@pytest.mark.slow
def test_round_trip_error_falls_with_the_steps(velocity_pipe, digits):
    ids = velocity_pipe.tokenize(["a photo of a cat"] * NUM_IMAGES)
    errors = {n: inversion.round_trip(velocity_pipe, digits, ids, num_steps=n)["latent_rmse"].mean()
              for n in (1, 25)}
    # Explicit Euler backwards is first order: the error falls about as 1 / N.
    assert errors[25] < 0.2 * errors[1], errors


@pytest.mark.slow
def test_refined_inversion_inverts_the_discrete_sampler(velocity_pipe, digits):
    ids = velocity_pipe.tokenize(["a photo of a cat"] * NUM_IMAGES)
    plain = inversion.round_trip(velocity_pipe, digits, ids, num_steps=25)["latent_rmse"].mean()
    refined = inversion.round_trip(velocity_pipe, digits, ids, num_steps=25, refine=4)["latent_rmse"].mean()
    # Each step solved to float precision: only round-off is left of the round trip's error.
    assert refined < 0.01 * plain, (refined, plain)


def test_ddim_inversion_matches_diffusers_inverse_scheduler(folders, epsilon_pipe, digits):
    folder = folders["epsilon"]
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    text_encoder = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    ids = epsilon_pipe.tokenize(["a photo of a cat", "a red car"] * (NUM_IMAGES // 2))
    x1 = epsilon_pipe.encode(digits)
    with torch.no_grad():
        context = text_encoder(torch.from_numpy(np.asarray(ids, np.int64))).last_hidden_state
    for num_steps in (4,):  # leading spacing, steps_offset 1: the first alpha is alphas_cumprod[0]
        scheduler = diffusers.DDIMInverseScheduler.from_config(config)
        scheduler.set_timesteps(num_steps)
        timesteps = [int(t) for t in scheduler.timesteps]
        # The states: diffusers' first alpha (initial_alpha_cumprod), then alphas_cumprod at its timesteps,
        # are our DDIM grid reversed.
        alphas = [float(scheduler.initial_alpha_cumprod)] + [float(scheduler.alphas_cumprod[t]) for t in timesteps]
        grid = epsilon_pipe.teacher.time_grid("ddim", num_steps)[::-1]
        np.testing.assert_allclose(grid, diffusion.rf_time_of_alpha_bar(np.asarray(alphas)), atol=1e-6)
        # The update: diffusers' step, its UNet called at the state's own timestep (0 for the first
        # state, alpha_cumprod[0]), as our field is; diffusers' pipelines call it at the target `t`.
        sample, current = torch.from_numpy(np.asarray(x1)).permute(0, 3, 1, 2), 0
        with torch.no_grad():
            for t in timesteps:
                eps = unet(sample, current, encoder_hidden_states=context).sample
                sample = scheduler.step(eps, t, sample).prev_sample
                current = t
        reference = sample.permute(0, 2, 3, 1).numpy()
        ours = epsilon_pipe.invert_ids(ids, x1, num_steps=num_steps, method="ddim")
        error = np.max(np.abs(ours - reference)) / np.max(np.abs(reference))
        assert error < 1e-4, (num_steps, error)


def test_invert_to_folder_writes_the_documented_files(velocity_pipe, digits, tmp_path):
    paths = []
    for k in range(2):
        path = tmp_path / f"in_{k}.png"
        Image.fromarray(np.round((digits[k] + 1) * 127.5).astype(np.uint8)).resize((20, 13)).save(path)
        paths.append(path)
    out = tmp_path / "out"
    # Two files (resized from 20x13) and the other digits as arrays: one batch of NUM_IMAGES.
    summary = inversion.invert_to_folder(velocity_pipe, [*paths, *digits[2:]], "a photo of a cat", out,
                                         num_steps=1, batch_size=NUM_IMAGES, progress=False)
    files = [f"reconstruction_{k:05d}.png" for k in range(NUM_IMAGES)]
    assert sorted(p.name for p in out.iterdir()) == sorted(files + ["comparison.png", "inversion.json",
                                                                    "latents.npz"])
    with np.load(out / "latents.npz") as latents:
        assert set(latents) == {"x0", "x1", "x1_reconstructed", "prompt", "input", "reconstruction_file"}
        for key in ("x0", "x1", "x1_reconstructed"):
            assert latents[key].shape == (NUM_IMAGES, 8, 8, 4) and latents[key].dtype == np.float32
        assert list(latents["reconstruction_file"]) == files
        assert list(latents["prompt"]) == ["a photo of a cat"] * NUM_IMAGES
        assert list(latents["input"]) == [str(paths[0]), str(paths[1])] + [f"<array {k}>" for k in range(2, NUM_IMAGES)]
        np.testing.assert_allclose(latents["x1"][2:], velocity_pipe.encode(digits)[2:], atol=1e-5)
    assert np.asarray(Image.open(out / files[0])).shape == (16, 16, 3)
    assert np.asarray(Image.open(out / "comparison.png")).shape == (NUM_IMAGES * 16, 32, 3)
    written = json.loads((out / "inversion.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["num_steps"] == 1 and written["method"] == "euler" and written["noise_time"] == 0.0
    assert written["guidance_note"] is None and not written["ddim_inversion"]
    for record in written["images"]:
        assert set(record) == {"input", "file", "prompt", *inversion.ERROR_KEYS}
        assert np.isfinite(list(record[k] for k in inversion.ERROR_KEYS)).all()


def test_image_files_are_read_as_vae_image_processor_preprocesses_them(tmp_path):
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(path)
    reference = VaeImageProcessor(vae_scale_factor=8).preprocess(Image.open(path), height=24, width=40)
    ours = inversion.load_image(path, 24, 40, 3)
    np.testing.assert_allclose(ours, reference[0].permute(1, 2, 0).numpy(), atol=1e-6)
    grey = inversion.load_image(path, 24, 40, 1)  # a one-channel model reads the file's luma (PIL's L)
    assert grey.shape == (24, 40, 1)
    # Arrays are resized by nearest neighbour, as VaeImageProcessor resizes them (torch's interpolate).
    array = rng.uniform(-1, 1, (5, 7, 3)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(array).permute(2, 0, 1)[None], size=(12, 9))
    np.testing.assert_allclose(inversion.load_image(array, 12, 9, 3), expected[0].permute(1, 2, 0).numpy())


def test_bad_requests_fail_before_any_compiling(velocity_pipe, digits, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    cases = [
        (dict(images=[tmp_path / "missing.png"]), "does not exist"),
        (dict(images=[not_an_image]), "not a readable image"),
        (dict(images=[digits[0] * 3]), r"must lie in \[-1, 1\]"),
        (dict(images=[np.zeros((4, 4, 2), np.float32)]), "1, 3 or 4 channels"),
        (dict(images=[]), "no images"),
        (dict(images=[digits[0], digits[1], digits[2]], prompts=["a cat", "a dog"]), "2 prompts for 3 images"),
        (dict(method="dpm_solver++"), "cannot run backwards"),
        (dict(method="heun", refine=2), "refine solves"),
        (dict(refine=-1), "refine must be >= 0"),
    ]
    assert issubclass(inversion.InversionError, TextToImageError)
    for overrides, message in cases:
        args = dict(images=[digits[0]], prompts="a cat", method="euler", refine=0) | overrides
        with pytest.raises(inversion.InversionError, match=message):
            inversion.invert_to_folder(velocity_pipe, args["images"], args["prompts"], tmp_path / "out",
                                       method=args["method"], refine=args["refine"], progress=False)
    assert not (tmp_path / "out").exists()
    assert set(teachers.INVERTIBLE_METHODS) >= set(inversion.REFINABLE_METHODS)
