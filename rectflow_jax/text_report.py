"""The reports of the text-to-image pipeline.

`write_text_report` (from a pretrained folder): how straight each model's ODE is, each
model's one step against its N steps, in latents.

`write_digits_text_report` (the text-conditioned digits): does each stage draw its prompt's
digit, in one step or many? For the teacher (DDIM at each of eval.steps, and DPM-Solver++ at teacher.num_steps, with
teacher.guidance_scale), 2-RF (Euler, pairs.guidance_scale) and the distilled student
(Euler, no guidance), on the training prompts and on the held-out paraphrases:
  - agreement: the share of samples that the digits classifier (evaluate.FeatureClassifier,
    fit on all real digits) reads as the prompt's digit;
  - Frechet distance of the samples to the real digits in that classifier's features;
  - diversity: per prompt, the mean pairwise distance of its samples over that of the real
    digits of its class, averaged over prompts (1: as varied as real digits; 0: one image);
  - straightness E int ||(X1 - X0) / T - v||^2 dt along each model's finest trajectory
    (in rectified-flow coordinates for the diffusion teacher, whose grid spans T < 1).
Every model starts from the same noise: prompt k of a set, image i uses
x0 = noise_from_seeds(seed + k, i), as `rectflow sample` would.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rectflow_jax import batch_runner, checkpoint, evaluate, flow, plots, sampling, storage
from rectflow_jax import text_to_image as t2i
from rectflow_jax.data import datasets, digit_prompts

PROMPT_SETS = ("train", "held_out")
GRID_SAMPLES = 8  # columns of each grid


def _mean_pairwise_distance(images: np.ndarray) -> float:
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    if len(flat) < 2:
        return float("nan")
    squared = np.sum(flat ** 2, 1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None] - 2 * flat @ flat.T, 0.0))
    return float(distances[np.triu_indices(len(flat), 1)].mean())


def prompt_metrics(samples: np.ndarray, digits: np.ndarray, prompt_ids: np.ndarray, dataset) -> dict[str, float]:
    """Agreement, Frechet distance and diversity of samples (N, H, W, 1) made for prompts of `digits`."""
    classifier, real_features = evaluate.classifier_for(dataset)
    samples = np.clip(np.asarray(samples, np.float32), -1.0, 1.0)
    predicted = classifier.probabilities(samples).argmax(1)
    real_spread = _real_class_spread(dataset)
    ratios = [_mean_pairwise_distance(samples[prompt_ids == p]) / real_spread[int(digits[prompt_ids == p][0])]
              for p in np.unique(prompt_ids)]
    return {"agreement": float(np.mean(predicted == digits)),
            "frechet_distance": evaluate.frechet_distance(classifier.features(samples), real_features),
            "diversity": float(np.nanmean(ratios))}


@functools.lru_cache(maxsize=4)
def _real_class_spread(dataset) -> dict[int, float]:
    return {int(c): _mean_pairwise_distance(dataset.images[dataset.labels == c]) for c in np.unique(dataset.labels)}


def real_data_row(dataset, num_samples: int, seed: int) -> dict[str, float]:
    """The metrics of real digits drawn as a prompt set would be (the floor of the Frechet distance)."""
    real = dataset.reference(min(num_samples, len(dataset.images)), seed=seed)
    groups = real["label"]  # one 'prompt' per class
    return prompt_metrics(real["x1"], real["label"], groups, dataset)


def _runs(config) -> dict[str, tuple[str, str, int, float]]:
    """name -> (stage, method, steps, guidance scale) of every model run in the report."""
    steps = sorted(int(s) for s in config.eval.steps)
    teacher, reflow = config.teacher, config.pairs
    runs = {f"teacher_ddim_{n}": ("teacher", "ddim", n, teacher.guidance_scale) for n in steps}
    runs[f"teacher_{teacher.method}_{teacher.num_steps}"] = ("teacher", teacher.method, int(teacher.num_steps),
                                                              teacher.guidance_scale)
    runs.update({f"2rf_euler_{n}": ("2rf", "euler", n, reflow.guidance_scale) for n in steps})
    runs.update({f"distill_euler_{n}": ("distill", "euler", n, 1.0) for n in steps})
    return runs


def _prompt_set(dataset, held_out: bool, num_samples: int, seed: int, latent_shape) -> dict[str, np.ndarray]:
    table = dataset.prompt_table(held_out=held_out)
    per_prompt = max(2, math.ceil(num_samples / len(table)))  # two at least: diversity needs pairs
    prompt_ids = np.repeat(np.arange(len(table)), per_prompt)
    image_ids = np.tile(np.arange(per_prompt), len(table))
    return {"prompt": np.asarray([table[k][0] for k in prompt_ids]), "digit": np.asarray([table[k][1] for k in prompt_ids]),
            "prompt_id": prompt_ids,
            "x0": t2i.initial_noise((seed + prompt_ids).tolist(), image_ids.tolist(), latent_shape)}


def _straightness(pipe: t2i.TextToImage, ids: np.ndarray, x0: np.ndarray, method: str, num_steps: int,
                  scale: float, batch_size: int) -> float:
    """Mean straightness of the guided ODE from (x0, prompt) pairs, solved by the one sampling driver."""
    guided = sampling.guidance_applies(scale)

    def solve(consts, x0, ids):
        solution = pipe.teacher.solution(consts["params"], x0, ids, consts["negative"], consts["scale"],
                                         method=method, num_steps=num_steps, guided=guided, return_trajectory=True)
        # Per row, so the padding of a ragged last chunk drops out of the mean.
        return jax.vmap(lambda path, v: flow.straightness(path[:, None], solution.times, v[:, None]),
                        in_axes=(1, 1))(solution.trajectory, solution.velocities)

    runner = batch_runner.BatchRunner(solve, batch_size, mesh=pipe.mesh)
    consts = {"params": {k: pipe.params[k] for k in ("unet", "text_encoder")},
              "negative": pipe.teacher.text.negative_ids(""), "scale": np.float32(scale)}
    return float(np.mean(runner.full(consts, x0, ids)))


def write_digits_text_report(config, workdir: str | Path, *, straightness_samples: int = 200) -> dict[str, Any]:
    """workdir/report: report.md (tables and claims), metrics.json, and a grid per stage and prompt set."""
    work = storage.path(workdir)
    out = work / "report"
    out.mkdir(parents=True, exist_ok=True)
    dataset = datasets.get_dataset(config.data)
    pipes = {name: t2i.TextToImage.from_stage(work / name) for name in ("teacher", "2rf", "distill")}
    shape = pipes["teacher"].latent_shape()
    runs = _runs(config)
    sets = {name: _prompt_set(dataset, name == "held_out", int(config.eval.num_samples), int(config.seed), shape)
            for name in PROMPT_SETS}
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in PROMPT_SETS}
    samples: dict[tuple[str, str], np.ndarray] = {}
    for set_name, prompts in sets.items():
        for run, (stage, method, steps, scale) in runs.items():
            pipe = pipes[stage]
            x1, _ = pipe.generate_ids(pipe.tokenize(prompts["prompt"]), prompts["x0"], num_steps=steps,
                                      guidance_scale=scale, negative_ids=pipe.teacher.text.negative_ids(""),
                                      method=method, decode=False, batch_size=int(config.sample.batch_size))
            samples[set_name, run] = np.clip(x1, -1.0, 1.0)
            results[set_name][run] = prompt_metrics(x1, prompts["digit"], prompts["prompt_id"], dataset)
    finest = {"teacher": f"teacher_ddim_{max(config.eval.steps)}", "2rf": f"2rf_euler_{max(config.eval.steps)}",
              "distill": f"distill_euler_{max(config.eval.steps)}"}
    train_set = sets["train"]
    picks = np.linspace(0, len(train_set["x0"]) - 1, min(straightness_samples, len(train_set["x0"]))).astype(int)
    straightness = {}
    for stage, run in finest.items():
        _, method, steps, scale = runs[run]
        pipe = pipes[stage]
        straightness[stage] = _straightness(pipe, pipe.tokenize(train_set["prompt"][picks]), train_set["x0"][picks],
                                            method, steps, scale, int(config.sample.batch_size))
    real = real_data_row(dataset, int(config.eval.num_samples), seed=1)
    pictures = _grids(out, samples, sets, runs)
    claims = _claims(config, results)
    report = {"runs": {run: list(map(str, spec)) for run, spec in runs.items()}, "results": results,
              "straightness": straightness, "real_data": real, "claims": claims,
              "prompts": {name: sorted(set(sets[name]["prompt"].tolist())) for name in PROMPT_SETS},
              "samples_per_set": {name: int(len(sets[name]["x0"])) for name in PROMPT_SETS}}
    checkpoint.write_json(out / "metrics.json", report)
    (out / "report.md").write_text(_markdown(config, report, pictures))
    return report


def _claims(config, results) -> dict[str, float]:
    """The figures the recipe is judged by (the issue's must-shows), from this run's numbers."""
    train, held_out = results["train"], results["held_out"]
    teacher_fine = f"teacher_{config.teacher.method}_{config.teacher.num_steps}"
    one = {"distill": "distill_euler_1", "2rf": "2rf_euler_1", "teacher": "teacher_ddim_1"}
    ratio = lambda a, b: float(a / b) if b else float("inf")
    return {
        "distill_1step_agreement_train": train[one["distill"]]["agreement"],
        "distill_1step_agreement_held_out": held_out[one["distill"]]["agreement"],
        "distill_1step_fd_over_teacher_finest_fd": ratio(train[one["distill"]]["frechet_distance"],
                                                         train[teacher_fine]["frechet_distance"]),
        "distill_1step_diversity": train[one["distill"]]["diversity"],
        "teacher_finest_agreement_train": train[teacher_fine]["agreement"],
        "2rf_1step_agreement_train": train[one["2rf"]]["agreement"],
        "teacher_1step_agreement_train": train[one["teacher"]]["agreement"],
        "2rf_1step_fd": train[one["2rf"]]["frechet_distance"],
        "teacher_1step_fd": train[one["teacher"]]["frechet_distance"],
        "teacher_1step_fd_over_2rf_1step_fd": ratio(train[one["teacher"]]["frechet_distance"],
                                                    train[one["2rf"]]["frechet_distance"]),
    }


def _grids(out: Path, samples, sets, runs) -> list[tuple[str, str]]:
    """One grid per (run shown, prompt set): a row per prompt of the set's first template, GRID_SAMPLES columns.

    Shown: every model's one step, and the teacher's own solver at its step count."""
    shown = [run for run in runs if run.endswith("_1")] + [
        run for run, (stage, method, _, _) in runs.items() if stage == "teacher" and method != "ddim"]
    pictures = []
    for set_name, prompts in sets.items():
        # prompt_table is template-major: the first template's prompts are ids 0..9, one per digit.
        rows = [np.flatnonzero(prompts["prompt_id"] == p)[:GRID_SAMPLES] for p in range(len(digit_prompts.WORDS))]
        for run in shown:
            images = np.concatenate([samples[set_name, run][r] for r in rows])
            file = f"{run}_{set_name}.png"
            plots.save_png(plots.image_grid(images, ncols=min(GRID_SAMPLES, len(rows[0])), upscale=4), out / file)
            pictures.append((f"{run.replace('_', ' ')}, {set_name.replace('_', '-')} prompts "
                             f"(rows: {str(prompts['prompt'][rows[0][0]])!r} ... {str(prompts['prompt'][rows[-1][0]])!r})", file))
    return pictures


def _markdown(config, report, pictures) -> str:
    lines = ["# rectflow report: text-conditioned digits", "",
             f"{report['samples_per_set']['train']} samples over the training prompts and "
             f"{report['samples_per_set']['held_out']} over the held-out paraphrases, the same noise for every "
             "model (seed " f"{config.seed}). Agreement: the classifier reads the prompt's digit. FD: Fréchet "
             "distance in the classifier's features. Diversity: within-prompt spread over the real digits' "
             "within-class spread.", ""]
    real = report["real_data"]
    for set_name in PROMPT_SETS:
        lines += [f"## {'Training prompts' if set_name == 'train' else 'Held-out paraphrases'}", "",
                  "| model | solver | steps | guidance | agreement | FD | diversity |", "|---|---|---|---|---|---|---|",
                  f"| real digits | – | – | – | {real['agreement']:.3f} | {real['frechet_distance']:.3g} | "
                  f"{real['diversity']:.3f} |"]
        for run, (stage, method, steps, scale) in report["runs"].items():
            row = report["results"][set_name][run]
            lines.append(f"| {stage} | {method} | {steps} | {scale} | {row['agreement']:.3f} | "
                         f"{row['frechet_distance']:.3g} | {row['diversity']:.3f} |")
        lines.append("")
    lines += ["## Straightness (finest trajectory, training prompts)", "", "| model | straightness |", "|---|---|"]
    lines += [f"| {stage} | {value:.4g} |" for stage, value in report["straightness"].items()]
    lines += ["", "## Claims", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in report["claims"].items()]
    lines += ["", "## Samples", ""] + [f"**{title}**\n\n![{title}]({file})\n" for title, file in pictures]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- from a pretrained folder


def write_text_report(config, workdir: str | Path, *, reflow: bool) -> dict[str, Any]:
    """workdir/report: how straight each model's ODE is, from the same noise and prompts.

    gap = E||x1(1 step) - x1(N steps)||^2 per latent element, each model against its own
    N-step solution (the distilled student against 2-RF's); reflow should shrink it well
    below the teacher's. A grid shows the decoded latents, one row per (model, steps).
    """
    work = storage.path(workdir)
    out = work / "report"
    out.mkdir(parents=True, exist_ok=True)
    prompt_source = datasets.get_dataset(config.data).prompt_source()
    n = int(config.eval.num_samples)
    texts = prompt_source.prompts(range(n))
    teacher_cfg, pairs_cfg = config.teacher, config.pairs
    models_ = {"teacher": t2i.TextToImage.from_pretrained(config.teacher.pretrained,
                                                         prediction_type=config.sample.prediction_type,
                                                         clip_skip=teacher_cfg.get("clip_skip", 0)),
               "distill": t2i.TextToImage.from_stage(work / "distill")}
    if reflow:
        models_["2rf"] = t2i.TextToImage.from_stage(work / "2rf")
    x0 = t2i.initial_noise([config.seed] * n, list(range(n)), models_["teacher"].latent_shape())
    ids = models_["teacher"].tokenize(texts)
    teacher_fine = f"teacher_{teacher_cfg.num_steps}"
    rf_fine = f"2rf_{pairs_cfg.num_steps}" if reflow else teacher_fine  # what the student was distilled from
    runs = {  # name: (model, method, steps, guidance)
        "teacher_1": ("teacher", teacher_cfg.method, 1, teacher_cfg.guidance_scale),
        teacher_fine: ("teacher", teacher_cfg.method, teacher_cfg.num_steps, teacher_cfg.guidance_scale)}
    if reflow:
        runs["2rf_1"] = ("2rf", "euler", 1, pairs_cfg.guidance_scale)
        runs[rf_fine] = ("2rf", pairs_cfg.method, pairs_cfg.num_steps, pairs_cfg.guidance_scale)
    runs["distill_1"] = ("distill", "euler", 1, 1.0)
    latents, images = {}, {}
    for run, (name, method, steps, scale) in runs.items():
        pipe = models_[name]
        negative = pipe.teacher.text.negative_ids(teacher_cfg.negative_prompt if name == "teacher"
                                                  else pairs_cfg.negative_prompt)
        latents[run], images[run] = pipe.generate_ids(ids, x0, num_steps=steps, guidance_scale=scale,
                                                      negative_ids=negative, method=method)
    gap = lambda a, b: float(np.mean(np.square(latents[a] - latents[b])))
    gaps = {"teacher": gap("teacher_1", teacher_fine), "distill": gap("distill_1", rf_fine)}
    claims = {"teacher_1step_to_teacher_finest": gaps["teacher"],
              "distill_1step_to_teacher_finest": gap("distill_1", teacher_fine)}
    if reflow:
        gaps["2rf"] = gap("2rf_1", rf_fine)
        claims["teacher_gap_over_2rf_gap"] = gaps["teacher"] / gaps["2rf"] if gaps["2rf"] else float("inf")
        claims["2rf_1step_to_teacher_finest"] = gap("2rf_1", teacher_fine)
    rows = min(8, n)
    shown = np.concatenate([images[run][:rows] for run in runs]).astype(np.float32) / 127.5 - 1.0
    plots.save_png(plots.image_grid(shown, ncols=rows, upscale=max(1, 64 // shown.shape[1])), out / "grid.png")
    report = {"gaps": gaps, "claims": claims, "runs": {run: list(map(str, spec)) for run, spec in runs.items()},
              "prompts": texts[:rows], "num_samples": n}
    checkpoint.write_json(out / "metrics.json", report)
    lines = ["# rectflow report: text to image", "",
             f"{n} prompts of data.prompts, the same noise (seed {config.seed}) for every model. The gap is "
             "E‖x1(1 step) − x1(N steps)‖² per latent element, each model against its own N-step output "
             "(the distilled student against 2-RF's).", "",
             "| model | gap | 1 step vs teacher N steps |", "|---|---|---|",
             f"| teacher ({teacher_cfg.method}, guidance {teacher_cfg.guidance_scale}) | {gaps['teacher']:.4g} | "
             f"{gaps['teacher']:.4g} |"]
    if reflow:
        lines.append(f"| 2-RF (guidance {pairs_cfg.guidance_scale}) | {gaps['2rf']:.4g} | "
                     f"{claims['2rf_1step_to_teacher_finest']:.4g} |")
    lines += [f"| distilled | {gaps['distill']:.4g} | {claims['distill_1step_to_teacher_finest']:.4g} |", ""]
    if reflow:
        lines += [f"Teacher gap / 2-RF gap: **{claims['teacher_gap_over_2rf_gap']:.3g}** (above 1: reflow "
                  "straightened the flow).", ""]
    lines += ["## Samples", "", "Rows, top to bottom: " + ", ".join(f"{run.replace('_', ' at ')} step(s)" for run in runs)
             + f"; columns: the first {rows} prompts.", "", "![samples](grid.png)", "",
             "Prompts: " + "; ".join(f"{k}. {t}" for k, t in enumerate(texts[:rows]))]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report
