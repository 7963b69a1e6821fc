"""Round trip image -> noise -> image: do straight flows invert in fewer steps than DDIM inversion?

What it measures: for each model and step count N, real images are encoded, integrated
from t = 1 back to t = 0 with their captions (rectflow_jax.inversion.round_trip: the one
sampler, backwards), then sampled forwards again from the noise found with the same N and
decoded. The error of that round trip is the inversion's: pixel RMSE and PSNR in [-1, 1]
(peak-to-peak 2) against the input, and the latent RMSE; the noise found is described by
its mean, std (~0 and ~1 for noise a sampler would draw) and its correlation with the
image's latent, beside the same correlation of the model's own pairs (corr fwd: fresh
noise, seeds 0..n-1, and the sample the model makes from it with the same prompts and N):
inverted noise that correlates with its image more than the model's own noise does with
its samples is not noise the sampler would draw. noise_t is where the inversion stops
in our time (0: pure noise); DDIM's grid stops at its first timestep (0.064 for the digits
teacher's trailing spacing at SD's betas). No guidance anywhere (inverting with CFG drifts).

    # the trained text-conditioned digits (stages teacher: epsilon diffusion, 2rf, distill)
    python benchmarks/inversion.py --workdir runs/digits_text \\
        --out benchmarks/results/inversion_digits_text.json [--num_images 64] [--refine 5]
    # diffusers folders (e.g. random ones in CI): velocity folders by Euler, diffusion ones by DDIM
    python benchmarks/inversion.py --pretrained FOLDER [--pretrained FOLDER ...] --out OUT.json

Models: with --workdir, 2rf and distill (Euler, velocity UNets called at SD timestep
(1 - t) * 1000) and teacher (DDIM inversion: Euler in rectified-flow coordinates on DDIM's
grid); with --pretrained, each folder by its kind. Images: sklearn's digits (the data the
digits models learnt), a fixed seeded subset; with --workdir read through the first
stage's stored data config (rectflow_jax.data.datasets), captioned by its training
templates (template k % T for image k, rectflow_jax/data/digit_prompts.py); with
--pretrained scaled the same way ([0, 16] -> [-1, 1]) and resized and converted to the
folder's image size and channels (inversion.load_image). `--refine K` adds rows with K
fixed-point iterations per backward step (inversion.py; Euler / DDIM only), reported
separately; the NFE column counts the backward UNet evaluations (the forward pass always
takes N).

Writes --out (JSON: every row, the images' indices and prompts), a markdown table on
stdout, and a picture (default: --out with .png): a row of inputs, then one row of
reconstructions per model and step count (the first --picture_images images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rectflow_jax import inversion  # noqa: E402
from rectflow_jax.data import digit_prompts  # noqa: E402
from rectflow_jax.text_to_image import TextToImage, initial_noise  # noqa: E402

STAGES = (("2rf", "euler"), ("distill", "euler"), ("teacher", "ddim"))


def digits_of_stage(stage_dir: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images, labels, training templates) of the data a digits_text stage was trained on."""
    import ml_collections

    from rectflow_jax import checkpoint
    from rectflow_jax.data import datasets

    meta, _ = checkpoint.read_meta(stage_dir)
    data = datasets.get_dataset(ml_collections.ConfigDict(meta["data"]))
    if not hasattr(data, "templates"):
        raise SystemExit(f"{stage_dir} was trained on {meta['data'].get('name')!r}, not on captioned digits")
    return np.asarray(data.images), np.asarray(data.labels), tuple(data.templates)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]  # as rectflow_jax.data does
    return images, digits.target.astype(np.int32), digit_prompts.TRAIN_TEMPLATES


def models(args) -> list[tuple[str, str, str]]:
    """(name, source, method) of each model to invert."""
    if args.workdir:
        found = [(name, str(Path(args.workdir) / name), method) for name, method in STAGES
                 if (Path(args.workdir) / name / "checkpoints").is_dir()]
        if not found:
            raise SystemExit(f"{args.workdir} holds none of the stages {', '.join(n for n, _ in STAGES)}")
        return found
    return [(Path(folder).name, folder, "") for folder in args.pretrained]


def load(source: str, workdir: bool) -> TextToImage:
    return TextToImage.from_stage(source) if workdir else TextToImage.from_pretrained(source)


def picture(inputs: np.ndarray, rows: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Inputs, then each labelled row of reconstructions, tiles upscaled by nearest neighbour to >= 32 px."""
    scale = max(1, 32 // inputs.shape[1])
    label_width, pad = 150, 2

    def strip(images: np.ndarray) -> np.ndarray:
        images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        gap = np.full((images.shape[1], pad, 3), 255, np.uint8)
        return np.concatenate([part for image in images for part in (image, gap)], axis=1)

    labelled = [("input", inputs)] + rows
    strips = [strip(images) for _, images in labelled]
    height, width = strips[0].shape[0] + pad, label_width + strips[0].shape[1]
    canvas = Image.new("RGB", (width, height * len(strips)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, ((label, _), row) in enumerate(zip(labelled, strips)):
        canvas.paste(Image.fromarray(row), (label_width, k * height))
        draw.text((4, k * height + row.shape[0] // 2 - 5), label, fill="black")
    canvas.save(path)


def markdown(rows: list[dict]) -> str:
    head = ("| model | method | steps | refine | NFE back | pixel RMSE | PSNR dB | latent RMSE | noise mean | "
            "noise std | corr(x0, x1) | corr fwd | noise t |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['num_steps']} | {r['refine']} | {r['nfe_backward']} | "
                     f"{r['pixel_rmse']:.4f} | {r['mean_pixel_psnr']:.1f} | {r['mean_latent_rmse']:.4f} | "
                     f"{r['noise_mean']:+.3f} | {r['noise_std']:.3f} | {r['mean_noise_x1_correlation']:+.3f} | "
                     f"{r['forward_x0_x1_correlation']:+.3f} | "
                     f"{r['noise_time']:.3f} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """For each velocity model: the fewest steps whose round trip is as good as the teacher's at its most steps."""
    plain = [r for r in rows if r["refine"] == 0]
    ddim = [r for r in plain if r["method"] == "ddim"]
    if not ddim:
        return []
    best = max(ddim, key=lambda r: r["num_steps"])
    lines = []
    for name in dict.fromkeys(r["model"] for r in plain if r["method"] != "ddim"):
        mine = sorted((r for r in plain if r["model"] == name), key=lambda r: r["num_steps"])
        match = next((r for r in mine if r["mean_pixel_psnr"] >= best["mean_pixel_psnr"]), None)
        same = next((r for r in mine if r["num_steps"] == best["num_steps"]), None)
        text = (f"{name} matches the {best['num_steps']}-step DDIM inversion of {best['model']} "
                f"({best['mean_pixel_psnr']:.1f} dB) at {match['num_steps']} steps ({match['mean_pixel_psnr']:.1f} dB)"
                if match else f"{name} never matches the {best['num_steps']}-step DDIM inversion "
                              f"({best['mean_pixel_psnr']:.1f} dB) at the step counts tried")
        if same:
            text += f"; at {same['num_steps']} steps it reaches {same['mean_pixel_psnr']:.1f} dB"
        lines.append(text)
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a digits_text pipeline root (stages teacher, 2rf, distill)")
    source.add_argument("--pretrained", action="append", help="a diffusers folder (repeat for several)")
    parser.add_argument("--out", required=True, help="the JSON to write")
    parser.add_argument("--picture", help="the PNG to write (default: --out with .png)")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--steps", default="1,2,4,25", help="comma-separated step counts")
    parser.add_argument("--refine", type=int, default=0, help="also rows with this many fixed-point iterations")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--picture_images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="of the image subset")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    todo = models(args)

    images, labels, templates = digits_of_stage(Path(todo[0][1])) if args.workdir else sklearn_digits()
    rng = np.random.default_rng(args.seed)
    indices = np.sort(rng.choice(len(images), size=min(args.num_images, len(images)), replace=False))
    prompts = [digit_prompts.prompt(templates[k % len(templates)], int(labels[i])) for k, i in enumerate(indices)]

    rows, pictured, shown = [], [], None
    for name, path, method in todo:
        pipe = load(path, bool(args.workdir))
        method = method or ("euler" if pipe.teacher.is_velocity else "ddim")
        height, width = pipe.image_size()
        channels = inversion.image_channels(pipe)
        inputs = np.stack([inversion.load_image(images[i], height, width, channels) for i in indices])
        if shown is None:
            shown = np.round((inputs[:args.picture_images] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        ids = pipe.tokenize(prompts)
        batch = min(args.batch_size, len(inputs))
        for num_steps in steps:
            # The baseline for corr(x0, x1): the model's own pairs, fresh noise -> its sample, same prompts.
            noise = initial_noise(list(range(len(inputs))), [0] * len(inputs), pipe.latent_shape())
            sampled, _ = pipe.generate_ids(ids, noise, num_steps=num_steps, method=method, batch_size=batch,
                                           decode=False)
            forward = float(np.mean(inversion.correlation(noise, sampled)))
            for refine in sorted({0, args.refine}):
                start = time.perf_counter()
                parts = [inversion.round_trip(pipe, inputs[k:k + batch], ids[k:k + batch], num_steps=num_steps,
                                              method=method, batch_size=batch, refine=refine)
                         for k in range(0, len(inputs), batch)]
                result = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
                row = {"model": name, "source": path, "parametrisation": pipe.teacher.parametrisation,
                       "method": method, "num_steps": num_steps, "refine": refine,
                       "nfe_backward": num_steps * (1 + refine) * (2 if method == "heun" else 1),
                       "noise_time": inversion.noise_time(pipe, method, num_steps), **inversion.summarise(result),
                       "forward_x0_x1_correlation": forward,
                       "seconds": round(time.perf_counter() - start, 2)}
                rows.append(row)
                print(f"{name} {method} {num_steps} steps refine {refine}: PSNR {row['mean_pixel_psnr']:.1f} dB, "
                      f"latent RMSE {row['mean_latent_rmse']:.4f}, noise std {row['noise_std']:.3f} "
                      f"({row['seconds']} s)", flush=True)
                label = f"{name} {num_steps}" + (f" +refine {refine}" if refine else "")
                pictured.append((label, result["reconstruction_uint8"][:args.picture_images]))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture_path = Path(args.picture) if args.picture else out.with_suffix(".png")
    picture(shown, pictured, picture_path)
    report = {"benchmark": "inversion round trip (image -> noise -> image)",
              "workdir": args.workdir, "pretrained": args.pretrained, "num_images": len(indices), "steps": steps,
              "guidance_scale": 1.0, "refine": args.refine, "verdict": verdict(rows), "rows": rows,
              "images": {"indices": indices.tolist(), "prompts": prompts}, "picture": str(picture_path),
              "platform": {"python": platform.python_version(), "machine": platform.machine(),
                           "cpus": os.cpu_count()}}
    out.write_text(json.dumps(report, indent=2))
    print()
    print(markdown(rows))
    print()
    for line in report["verdict"]:
        print(line)
    print(f"wrote {out} and {picture_path}")
    return report


if __name__ == "__main__":
    main()
