"""InstaFlow's recipe end to end through the CLI, on a random SD folder: triplets -> 2-RF -> pairs with
CFG -> one-step distillation -> report -> export -> `rectflow sample --pretrained` at one step.

The claim checked is the one that holds for any teacher: reflow straightens its ODE, so 2-RF's one
step lands much closer to its own 25 steps than the teacher's one step does to the teacher's 25.
"""

import json

import numpy as np
import pytest
from cli_helpers import ROOT, error_line, rectflow

from rectflow_jax import random_folder

CONFIG = str(ROOT / "configs" / "tiny_text_to_image.py")
PROMPTS = ["a photo of a cat", "a red house by a lake", "a dog on the road", "a snowy mountain",
           "a green tree", "a small car", "a blue river", "the big house"]
# The config's recipe at a size CI affords.
SHORT = ["--config.pairs.num_pairs=64", "--config.pairs.shard_size=32", "--config.pairs.batch_size=32",
         "--config.train.num_steps=100", "--config.train.batch_size=16", "--config.stages.distill.train.num_steps=40",
         "--config.eval.num_samples=8", "--config.mesh.data=1", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_t2i")
    teacher = random_folder.write_random_folder(root / "sd", seed=1)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = [f"--config.teacher.pretrained={teacher}", f"--config.data.prompts={prompts}",
              f"--config.data.data_dir={root / 'tfds'}"]
    rectflow("pipeline", f"--config={CONFIG}", f"--workdir={root / 'w'}", *common, *SHORT)
    return root, teacher, common


@pytest.mark.slow
def test_pipeline_straightens_and_distils(run):
    root, _, _ = run
    work = root / "w"
    for stage in ("pairs_teacher", "2rf", "pairs_2rf", "distill", "report"):
        assert (work / stage).is_dir(), stage
    report = json.loads((work / "report" / "metrics.json").read_text())
    ratio = report["claims"]["teacher_gap_over_2rf_gap"]
    print(f"\n[text pipeline] gaps {report['gaps']}; teacher gap / 2-RF gap {ratio:.3g}")
    assert ratio > 2.0
    # The student was distilled from 2-RF's pairs: its one step sits near 2-RF's 25 steps.
    assert report["gaps"]["distill"] < report["gaps"]["2rf"]
    assert (work / "report" / "grid.png").is_file()
    pairs_2rf = json.loads((work / "pairs_2rf" / "pairs.json").read_text())
    assert pairs_2rf["guidance_scale"] == 1.5 and pairs_2rf["method"] == "euler"
    teacher_pairs = json.loads((work / "pairs_teacher" / "pairs.json").read_text())
    assert teacher_pairs["method"] == "dpm_solver++" and teacher_pairs["parametrisation"] == "epsilon"


@pytest.mark.slow
def test_export_samples_at_one_step_like_the_stage(run):
    root, _, _ = run
    folder = root / "export"
    rectflow("export", f"--checkpoint={root / 'w' / 'distill'}", f"--out={folder}")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "RectifiedFlowPipeline"
    from_folder, from_stage = root / "s_folder", root / "s_stage"
    rectflow("sample", f"--pretrained={folder}", "--prompt=a photo of a cat", f"--out={from_folder}",
             "--config.sample.num_steps=1", "--quiet")
    rectflow("sample", f"--checkpoint={root / 'w' / 'distill'}", "--prompt=a photo of a cat", f"--out={from_stage}",
             "--config.sample.num_steps=1", "--quiet")
    a, b = (np.load(d / "latents.npz") for d in (from_folder, from_stage))
    np.testing.assert_array_equal(a["x0"], b["x0"])
    np.testing.assert_allclose(a["x1"], b["x1"], rtol=0, atol=1e-5)
    assert (from_folder / "00000.png").is_file()
    # --latents starts from given noise: the same x0 gives the same x1.
    noise = root / "x0.npy"
    np.save(noise, a["x0"])
    again = root / "s_latents"
    rectflow("sample", f"--pretrained={folder}", "--prompt=a photo of a cat", f"--out={again}",
             f"--latents={noise}", "--config.sample.num_steps=1", "--quiet")
    np.testing.assert_allclose(np.load(again / "latents.npz")["x1"], a["x1"], rtol=0, atol=1e-6)
    # A text-to-image stage without prompts, or asked for digits metrics, is one line.
    stage = root / "w" / "distill"
    assert "give --prompt" in error_line(rectflow("sample", f"--checkpoint={stage}", f"--out={root / 'x'}",
                                                  check=False))
    assert "coco2017_5k" in error_line(rectflow("eval", f"--checkpoint={stage}", f"--config={CONFIG}",
                                                f"--out={root / 'e'}", check=False))
