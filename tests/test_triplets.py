"""Text triplets from an SD teacher: resumable after a kill, noise regenerated bit for bit, compact on disk,
and one clear line for each bad input on their way."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import ROOT, error_line, rectflow

from rectflow_jax import configlib, pipeline, random_folder, sampling, teachers, train
from rectflow_jax.data import pairs as pair_io

CONFIG = str(ROOT / "configs" / "tiny_text_to_image.py")
PROMPTS = ["a photo of a cat", "a red house by a lake", "a dog on the road", "", "a snowy mountain"]
NUM_PAIRS, SHARD = 60, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("triplets")
    teacher = random_folder.write_random_folder(root / "sd", seed=2)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    jsonl = root / "prompts.jsonl"  # keeps the empty prompt, which a txt file skips
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    flags = [f"--config.teacher.pretrained={teacher}", f"--config.data.prompts={jsonl}",
             f"--config.data.data_dir={root / 'tfds'}", f"--config.pairs.num_pairs={NUM_PAIRS}",
             f"--config.pairs.shard_size={SHARD}", "--config.pairs.batch_size=12", "--config.teacher.num_steps=4"]
    return root, teacher, jsonl, flags


def config_of(flags):
    """The config the CLI builds from the same overrides."""
    config = configlib.load_config(CONFIG)
    for flag in flags:
        key, value = flag.removeprefix("--config.").split("=", 1)
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = type(node[name])(value) if node[name] is not None else value
    return config


@pytest.mark.slow
def test_killed_run_restarts_with_every_example_exactly_once(setup):
    root, teacher, _, flags = setup
    out = root / "killed"
    proc = rectflow("pairs", f"--config={CONFIG}", f"--checkpoint={teacher}", f"--out={out}", *flags,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("pairs-*.npz")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("pairs-*.npz")))
    assert 1 <= written < NUM_PAIRS // SHARD, written  # killed mid-run, after a shard
    with pytest.raises(pair_io.PairDataError, match="finish it"):
        pair_io.inspect_pairs(out)
    result = rectflow("pairs", f"--config={CONFIG}", f"--checkpoint={teacher}", f"--out={out}", *flags)
    assert "images/s" in result.stderr
    info = pair_io.inspect_pairs(out)
    assert info["num_pairs_found"] == NUM_PAIRS and not list(out.glob("*.tmp"))
    shards = [dict(np.load(f)) for f in info["files"]]
    indices = np.concatenate([s["noise_index"] for s in shards])
    assert sorted(indices.tolist()) == list(range(NUM_PAIRS))  # each example once, none lost
    # The restart wrote what an uninterrupted run (on the same devices) writes, bit for bit.
    whole = root / "whole"
    rectflow("pairs", f"--config={CONFIG}", f"--checkpoint={teacher}", f"--out={whole}", *flags)
    for file in info["files"]:
        a, b = np.load(file), np.load(whole / Path(file).name)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    meta = json.loads((out / "pairs.json").read_text())
    assert meta["teacher_run_hash"].startswith("folder:") and meta["method"] == "dpm_solver++"
    assert shards[0]["x1"].dtype == np.float16 and shards[0]["input_ids"].shape == (SHARD, 77)
    assert list(shards[0]["prompt"][:5]) == PROMPTS and "x0" not in shards[0]  # example k: prompt k % 5


@pytest.mark.slow
def test_training_regenerates_the_noise_bit_for_bit(setup):
    root, teacher_folder, _, flags = setup
    out = root / "one"
    config = config_of(flags)
    config.pairs.num_pairs = SHARD
    pipeline.generate_pairs(config, teacher_folder, out, progress=False)
    shard = dict(np.load(pair_io.inspect_pairs(out)["files"][0]))
    batch = {k: jnp.asarray(v) for k, v in shard.items() if k != "prompt"}
    x0 = np.asarray(jax.jit(lambda b: train.batch_x0(b, None, None))(batch))  # what the train step uses
    used = np.asarray(sampling.noise_from_seeds(shard["noise_seed"], shard["noise_index"], (8, 8, 4)))
    np.testing.assert_array_equal(x0, used)
    # And it is the noise the teacher started from: solving from it again gives the stored latents.
    teacher = teachers.load_sd_teacher(teacher_folder)
    solve = jax.jit(lambda p, x, i, n: teacher.solve(p, x, i, n, 5.0, method="dpm_solver++", num_steps=4,
                                                     guided=True))
    x1 = np.asarray(solve(teacher.params, x0, shard["input_ids"], teacher.text.negative_ids("")))
    np.testing.assert_allclose(shard["x1"].astype(np.float32), x1, rtol=2e-3, atol=2e-3)  # float16 storage
    other = np.asarray(solve(teacher.params, np.roll(x0, 1, axis=0), shard["input_ids"], teacher.text.negative_ids("")))
    assert np.abs(other - x1).max() > 0.1  # the check above can tell noise apart
    # Bytes per example on disk against float32 pairs (x0 and x1) with the same token ids.
    per_example = Path(pair_io.inspect_pairs(out)["files"][0]).stat().st_size / SHARD
    float32_pair = 2 * 4 * x1[0].size + shard["input_ids"][0].nbytes
    print(f"\n[triplets] {per_example:.0f} bytes per example vs {float32_pair} for float32 pairs "
          f"({per_example / float32_pair:.2f}); at SD 1.5 latents (64x64x4): "
          f"{2 * 64 * 64 * 4 + 308 + 8} vs {2 * 4 * 64 * 64 * 4 + 308} bytes plus the prompt")
    assert per_example < 0.6 * float32_pair


def test_an_empty_prompt_file_is_one_line(setup, tmp_path):
    root, teacher, _, flags = setup
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = rectflow("pairs", f"--config={CONFIG}", f"--checkpoint={teacher}", f"--out={tmp_path / 'p'}",
                      *[f for f in flags if "data.prompts" not in f], f"--config.data.prompts={empty}", check=False)
    line = error_line(result)
    assert "data.prompts" in line and "empty.txt" in line
    assert not list((tmp_path / "p").glob("pairs-*"))


def test_a_teacher_folder_of_an_unknown_kind_is_one_line(setup, tmp_path):
    root, teacher, _, flags = setup
    odd = tmp_path / "kandinsky"
    odd.mkdir()
    index = json.loads((teacher / "model_index.json").read_text())
    (odd / "model_index.json").write_text(json.dumps(dict(index, _class_name="KandinskyPipeline")))
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (odd / name).symlink_to(teacher / name)
    line = error_line(rectflow("pairs", f"--config={CONFIG}", f"--checkpoint={odd}", f"--out={tmp_path / 'p'}",
                               *flags, check=False))
    assert "KandinskyPipeline" in line and "prediction_type=velocity" in line
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    line = error_line(rectflow("pairs", f"--config={CONFIG}", f"--checkpoint={nothing}", f"--out={tmp_path / 'q'}",
                               *flags, check=False))
    assert "stage directory" in line and "model_index.json" in line


@pytest.mark.slow
def test_lpips_without_its_weights_is_one_line_before_training(setup, tmp_path):
    root, teacher, _, flags = setup
    pairs_dir = tmp_path / "pairs"
    config = config_of(flags)
    config.pairs.num_pairs = SHARD
    pipeline.generate_pairs(config, teacher, pairs_dir, progress=False)
    common = ["train", f"--config={CONFIG}", f"--pairs={pairs_dir}", f"--checkpoint={teacher}", *flags,
              "--config.flow.loss=lpips"]
    line = error_line(rectflow(*common, f"--workdir={tmp_path / 'a'}", check=False))
    assert "flow.lpips.backbone" in line
    line = error_line(rectflow(*common, f"--workdir={tmp_path / 'b'}",
                               f"--config.flow.lpips.backbone={tmp_path / 'vgg16.pth'}", check=False))
    assert "vgg16.pth" in line and "flow.lpips.backbone" in line
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()
