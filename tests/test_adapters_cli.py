"""`rectflow sample --lora / --controlnet` and `rectflow invert` on random folders, as a user runs them.

The library parts have their own parity tests (test_lora.py, test_controlnet.py,
test_inversion.py); here the command line is checked against the Python API it stands for,
on a random InstaFlow-layout (velocity) folder, a random ControlNet for it and a random LoRA.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from cli_helpers import error_line, rectflow
from rectflow_jax import random_folder, weights
from rectflow_jax import text_to_image as t2i

PROMPT = "a photograph of a red car"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    folder = random_folder.write_random_folder(root / "instaflow", kind="rectified_flow", prediction_type="epsilon")
    controlnet = random_folder.write_random_controlnet(root / "controlnet", folder, seed=3)
    random_folder.write_random_controlnet(root / "controlnet_b", folder, seed=4)  # a second, for two at once
    pipe = t2i.TextToImage.from_pretrained(folder)
    height, width = pipe.image_size()
    rng = np.random.default_rng(0)
    for name in ("edges.png", "depth.png"):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name)
    # A kohya LoRA on every attention query and value projection of the UNet, rank 2, alpha 1.
    kohya = {}
    for path, leaf in traverse_util.flatten_dict(pipe.params["unet"]).items():
        if path[-2] in ("to_q", "to_v") and path[-1] == "kernel":
            name = "lora_unet_" + weights.torch_name(path).removesuffix(".weight").replace(".", "_")
            kohya[f"{name}.lora_down.weight"] = rng.standard_normal((2, leaf.shape[0])).astype(np.float32)
            kohya[f"{name}.lora_up.weight"] = rng.standard_normal((leaf.shape[1], 2)).astype(np.float32)
            kohya[f"{name}.alpha"] = np.float32(1.0)
    weights.write_safetensors(root / "style.safetensors", kohya)
    return root, folder, controlnet


def _images(out):
    return np.stack([np.asarray(Image.open(out / r["file"])) for r in json.loads((out / "prompts.json").read_text())
                     ["images"]])


@pytest.mark.slow
def test_lora_and_controlnet_sampling(folders, tmp_path):
    root, folder, controlnet = folders
    common = ["sample", "--pretrained", folder, "--prompt", PROMPT, "--quiet"]
    rectflow(*common, "--out", tmp_path / "plain")
    rectflow(*common, "--out", tmp_path / "lora", "--lora", f"{root / 'style.safetensors'}:0.5")
    rectflow(*common, "--out", tmp_path / "control", "--controlnet", controlnet, "--control-image",
             root / "edges.png", "--config.sample.controlnet_scale=0.7")
    plain, with_lora, controlled = (_images(tmp_path / n) for n in ("plain", "lora", "control"))
    assert not np.array_equal(plain, with_lora) and not np.array_equal(plain, controlled)

    # What the commands stand for, through the Python API.
    pipe = t2i.TextToImage.from_pretrained(folder)
    x0 = np.load(tmp_path / "plain" / "latents.npz")["x0"]
    pipe.merge_loras([(root / "style.safetensors", 0.5)])
    latents, _ = pipe.generate([PROMPT], x0, num_steps=1)
    np.testing.assert_allclose(np.load(tmp_path / "lora" / "latents.npz")["x1"], latents, atol=1e-5)
    summary = json.loads((tmp_path / "lora" / "prompts.json").read_text())
    assert summary["loras"][0]["scale"] == 0.5 and summary["loras"][0]["layout"] == "kohya"

    from rectflow_jax import control_image
    from rectflow_jax.models.controlnet import ControlNetModel

    pipe = t2i.TextToImage.from_pretrained(folder)
    pipe.attach_controlnet(*ControlNetModel.from_pretrained(controlnet))
    image = control_image.load_control_image(root / "edges.png", *pipe.image_size())
    latents, _ = pipe.generate_ids(pipe.tokenize([PROMPT]), x0, num_steps=1, control_image=image,
                                   controlnet_scale=0.7)
    np.testing.assert_allclose(np.load(tmp_path / "control" / "latents.npz")["x1"], latents, atol=1e-5)
    assert json.loads((tmp_path / "control" / "prompts.json").read_text())["controlnets"] == [
        {"source": str(controlnet), "scale": 0.7}]
    one_controlnet = latents

    # Two ControlNets, each with its image; the first's scale its own, the second's the config's.
    rectflow(*common, "--out", tmp_path / "two", "--controlnet", f"{controlnet}:0.7", "--control-image",
             root / "edges.png", "--controlnet", root / "controlnet_b", "--control-image", root / "depth.png",
             "--config.sample.controlnet_scale=0.4")
    two = t2i.TextToImage.from_pretrained(folder)
    two.attach_controlnet(*ControlNetModel.from_pretrained(controlnet))
    two.attach_controlnet(*ControlNetModel.from_pretrained(root / "controlnet_b"))
    images = [image, control_image.load_control_image(root / "depth.png", *two.image_size())]
    latents, _ = two.generate_ids(two.tokenize([PROMPT]), x0, num_steps=1, control_image=images,
                                  controlnet_scale=[0.7, 0.4])
    np.testing.assert_allclose(np.load(tmp_path / "two" / "latents.npz")["x1"], latents, atol=1e-5)
    assert np.abs(latents - one_controlnet).max() > 1e-3
    assert json.loads((tmp_path / "two" / "prompts.json").read_text())["controlnets"] == [
        {"source": str(controlnet), "scale": 0.7}, {"source": str(root / "controlnet_b"), "scale": 0.4}]
    two.detach_controlnets()
    with pytest.raises(t2i.TextToImageError, match="needs a ControlNet"):
        two.generate_ids(two.tokenize([PROMPT]), x0, num_steps=1, control_image=images)
    two.attach_controlnet(*ControlNetModel.from_pretrained(controlnet))
    with pytest.raises(t2i.TextToImageError, match="2 control images for 1 ControlNets"):
        two.generate_ids(two.tokenize([PROMPT]), x0, num_steps=1, control_image=images)
    with pytest.raises(t2i.TextToImageError, match="2 ControlNet scales for 1"):
        two.generate_ids(two.tokenize([PROMPT]), x0, num_steps=1, control_image=image, controlnet_scale=[1, 2])

    # N steps with guidance: both halves of the guided call are steered.
    rectflow(*common, "--out", tmp_path / "guided", "--controlnet", controlnet, "--control-image",
             root / "edges.png", "--config.sample.num_steps=3", "--config.sample.guidance_scale=2.0")
    latents, _ = pipe.generate_ids(pipe.tokenize([PROMPT]), x0, num_steps=3, guidance_scale=2.0,
                                   negative_ids=pipe.teacher.text.negative_ids(""), control_image=image)
    np.testing.assert_allclose(np.load(tmp_path / "guided" / "latents.npz")["x1"], latents, atol=1e-5)


def test_unmerged_loras_change_scale_without_recompiling(folders):
    root, folder, _ = folders
    x0 = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
    merged = t2i.TextToImage.from_pretrained(folder)
    merged.merge_loras([(root / "style.safetensors", 0.3)])
    expected = merged.generate([PROMPT], x0, num_steps=2, decode=False)[0]
    pipe = t2i.TextToImage.from_pretrained(folder)
    pipe.attach_loras([(root / "style.safetensors", 1.0)])
    first = pipe.generate([PROMPT], x0, num_steps=2, decode=False)[0]
    traces = pipe.traces
    pipe.set_lora_scales([0.3])
    second = pipe.generate([PROMPT], x0, num_steps=2, decode=False)[0]
    assert pipe.traces == traces  # the scale is a runtime input
    np.testing.assert_allclose(second, expected, atol=1e-5)
    assert np.abs(first - second).max() > 1e-3


@pytest.mark.slow
def test_invert_command_round_trip(folders, tmp_path):
    _, folder, _ = folders
    rectflow("sample", "--pretrained", folder, "--prompt", PROMPT, "--out", tmp_path / "made", "--quiet",
             "--config.sample.num_steps=4")
    made = tmp_path / "made" / "00000.png"
    psnr = {}
    for steps in (1, 4):
        out = tmp_path / f"inverted_{steps}"
        rectflow("invert", "--pretrained", folder, "--image", made, "--prompt", PROMPT, "--out", out, "--quiet",
                 f"--config.sample.num_steps={steps}")
        with np.load(out / "latents.npz") as z:
            assert z["x0"].shape == z["x1"].shape == (1, 8, 8, 4)
        summary = json.loads((out / "inversion.json").read_text())
        assert len(summary["images"]) == 1 and (out / summary["images"][0]["file"]).is_file()
        psnr[steps] = summary["images"][0]["pixel_psnr"]
    assert (tmp_path / "inverted_4" / "comparison.png").is_file()
    # sample.inversion_refine reaches the sampler: the implicit backward step is undone by the forward one.
    out = tmp_path / "refined_1"
    rectflow("invert", "--pretrained", folder, "--image", made, "--prompt", PROMPT, "--out", out, "--quiet",
             "--config.sample.num_steps=1", "--config.sample.inversion_refine=4")
    refined = json.loads((out / "inversion.json").read_text())
    assert refined["refine"] == 4
    # Latents: a random VAE's own round trip bounds the pixel error.
    rmse = {steps: json.loads((tmp_path / f"inverted_{steps}" / "inversion.json").read_text())["mean_latent_rmse"]
            for steps in (1, 4)}
    rmse["1, refine 4"] = refined["mean_latent_rmse"]
    print(f"\n[invert cli] latent RMSE: {rmse}")
    assert rmse["1, refine 4"] < rmse[1] / 3
    print(f"\n[invert cli] random velocity folder, pixel PSNR at 1 and 4 steps: {psnr}")


def test_bad_adapter_input_is_one_line(folders, tmp_path):
    root, folder, controlnet = folders
    common = ["sample", "--pretrained", folder, "--prompt", PROMPT, "--out", tmp_path / "o", "--quiet"]
    assert "does not exist" in error_line(rectflow(*common, "--lora", root / "missing.safetensors", check=False))
    assert "go together" in error_line(rectflow(*common, "--controlnet", controlnet, check=False))
    assert "got 2 and 1" in error_line(rectflow(*common, "--controlnet", controlnet, "--controlnet", controlnet,
                                                "--control-image", root / "edges.png", check=False))
    bad = root / "bad_lora.safetensors"
    weights.write_safetensors(bad, {"lora_unet_no_such_module.lora_down.weight": np.zeros((2, 4), np.float32),
                                    "lora_unet_no_such_module.lora_up.weight": np.zeros((4, 2), np.float32)})
    assert "no_such_module" in error_line(rectflow(*common, "--lora", bad, check=False))
    line = error_line(rectflow("invert", "--pretrained", folder, "--prompt", PROMPT, "--out", tmp_path / "i",
                               check=False))
    assert "--image" in line
