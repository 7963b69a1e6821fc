"""Speed of triplet generation (InstaFlow's reflow data) against diffusers PyTorch: same weights, noise, prompt.

What it measures: the teacher ODE that `rectflow pairs` runs on a Stable Diffusion folder,
text -> final latent, with no VAE decode: DPM-Solver++ (2M) with classifier-free guidance
(empty negative prompt), ours (`teachers.load_sd_teacher(folder).solve`, one jit of text
encoder + N guided UNet steps in a lax.scan) against diffusers' StableDiffusionPipeline with
DPMSolverMultistepScheduler.from_config of the same folder and output_type="latent". One
random-weight folder at SD 1.5 sizes (UNet 320/640/1280/1280 with 2 layers per block, CLIP
ViT-L/14's text tower, 768 x 12 layers; a small 4-level VAE, only so that the VAE factor is
8: 64x64 latents for 512 px) is written once by rectflow_jax.random_folder and cached under
/tmp (~4 GB; reused while it exists). Both sides start from the same NHWC / NCHW noise and
the same prompt, and their final latents are compared (max |ours - torch| / max |torch|,
~1e-5 expected in float32): a timing of two different computations would mean nothing.

    # CPU (2 cores: a 25-step call is several minutes per side, so time 3 steps and scale per step)
    python benchmarks/triplets.py --steps 3 --repeats 3 --out benchmarks/results/cpu2_triplets.json
    python benchmarks/triplets.py --steps 25 --repeats 1 --warmup 0 --out benchmarks/results/cpu2_triplets.json
    # GPU (JAX and torch on the same card; the goal is >= 10 images/s of triplets)
    python benchmarks/triplets.py --dtype bfloat16 --batch 64 --steps 25 --repeats 3 \\
        --out benchmarks/results/h200_triplets_bf16.json
    python benchmarks/triplets.py --size tiny --steps 3 --repeats 3    # a smoke run in seconds

Timing: ours is compiled ahead of time (the compile time is reported on its own row field),
then each side gets --warmup untimed calls (torch's first call; ours' first run of the
compiled executable), then --repeats timed calls, ours and torch's alternating so both see
the same background load; the median is reported (the minimum is stored too). Ours is
waited for with block_until_ready; torch runs under inference_mode (and is synchronised on
CUDA). Torch's call includes tokenising the prompt (milliseconds), ours does not. On CPU
both use every core (torch.set_num_threads); the 1-minute load average is stored with the
row, since other work on the machine slows both sides, torch's OpenMP threads usually more.

Reading the ratio: ratio = ours median / torch median seconds per call (= per image at the
same batch); below 1 ours is faster. Per step is seconds per call / steps (the one text
encoding is spread over the steps; CLIP-L on 2 rows is ~2% of a guided UNet step's FLOPs),
so a 3-step ratio carries over to 25 steps up to noise. images/s = batch / seconds per call
at --steps. The process CPU seconds printed beside it tell how much of the machine each side
got: near cores x wall, it had the machine to itself; near 1 x wall on 2 cores, it shared
them (benchmarks/results/cpu2_triplets.json was measured so; see each row's note).

Costs: writing the SD 1.5 folder takes about a minute and peaks near 14 GB of host memory
(random_params draws all 0.95 G weights at once); both sides then hold ~8 GB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

# On a GPU both sides share the card: JAX takes half of its memory (not its default 75%), torch the rest.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_speed import merge_rows, rel_err  # noqa: E402  (rel_err: max |a - b| / max |b|)

from rectflow_jax import sampling, teachers  # noqa: E402
from rectflow_jax.random_folder import write_random_folder  # noqa: E402

# Config keys laid over random_folder's tiny defaults.
SIZES = {
    "sd15": dict(
        unet=dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
                  cross_attention_dim=768, sample_size=64, norm_num_groups=32,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        # Small in channels, but 4 levels: the VAE factor is 8 (64x64 latents <-> 512 px), as SD's. Never run here.
        vae=dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=512,
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
        text_encoder=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)),
    "tiny": dict(unet={}, vae={}, text_encoder={}),  # random_folder's defaults: 8x8 latents
}
PROMPT = "a photo of a cat sitting on a wooden table"
GOAL_IMAGES_PER_S = 10.0  # triplets per second on one accelerator
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
AGREE = {"float32": 1e-3, "bfloat16": 1e-1}  # max rel diff above which the two sides are called different


def folder_for(size: str, root: str) -> Path:
    """The cached random folder of `size` (written once, atomically; its name carries a hash of the configs)."""
    spec = SIZES[size]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(root) / f"rectflow_triplets_{size}_{digest}"
    if (folder / "model_index.json").exists():
        print(f"random folder: {folder} (cached)")
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    write_random_folder(partial, unet=spec["unet"], vae=spec["vae"], text_encoder=spec["text_encoder"])
    partial.rename(folder)
    size_gb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9
    print(f"random folder: {folder} written in {time.perf_counter() - start:.0f} s ({size_gb:.2f} GB)")
    return folder


def race(contenders: dict, repeats: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict]:
    """Wall and CPU seconds of each of `repeats` calls per contender after `warmup` untimed ones; the last outputs.

    As sd_speed.race, calls alternate so that every contender sees the same background load;
    all times are kept (the caller reports the median) and the outputs are returned for the
    agreement check, so no call is spent on it alone. CPU seconds are this process's (all
    threads, spin-waiting included): when they exceed cores x wall, nothing else was ours.
    """
    outputs = {}
    for _ in range(warmup):
        for name, fn in contenders.items():
            outputs[name] = fn()
    wall, cpu = {name: [] for name in contenders}, {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu, outputs


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
            "torch": torch.__version__, "torch_device": str(device), "torch_threads": torch.get_num_threads(),
            "cpu_cores": len(os.sched_getaffinity(0)), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    import diffusers

    info["diffusers"] = diffusers.__version__
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    info["cpu"] = models[0] if models else platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps (25 is several minutes per call "
                                                              "on 2 CPU cores; 3 gives the per-step ratio)")
    parser.add_argument("--batch", type=int, default=1, help="prompts (images) per call")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (> 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side before them")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32", help="bfloat16 is for GPUs")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="torch's device (auto: cuda if torch sees one); JAX uses its default backend")
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15", help="tiny: a smoke run")
    parser.add_argument("--folder_root", default="/tmp", help="where the random folder is cached")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument("--out", help="results json: this row is added, replacing one of the same settings")
    parser.add_argument("--note", default="", help="a remark stored with the row (e.g. what else ran)")
    args = parser.parse_args()
    if not sampling.guidance_applies(args.guidance):
        parser.error(f"--guidance must be above 1 (classifier-free guidance), got {args.guidance}")
    if args.repeats < 1 or args.warmup < 0 or args.steps < 1 or args.batch < 1:
        parser.error("--steps, --batch and --repeats must be positive, --warmup non-negative")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if use_cuda else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])

    folder = folder_for(args.size, args.folder_root)

    # Ours.
    start = time.perf_counter()
    teacher = teachers.load_sd_teacher(folder, dtype=args.dtype)
    load_ours = time.perf_counter() - start
    h, w, c = teacher.latent_shape
    x0 = np.random.default_rng(args.seed).standard_normal((args.batch, h, w, c), dtype=np.float32)
    ids = teacher.text.tokenize([PROMPT] * args.batch)
    negative = teacher.text.negative_ids("")
    scale = np.float32(args.guidance)
    solve = jax.jit(lambda p, x, i, n, s: teacher.solve(p, x, i, n, s, method="dpm_solver++", num_steps=args.steps,
                                                          guided=True))
    x0_dev = jax.device_put(x0)
    start = time.perf_counter()
    compiled = solve.lower(teacher.params, x0_dev, ids, negative, scale).compile()
    compile_s = time.perf_counter() - start
    ours = lambda: jax.block_until_ready(compiled(teacher.params, x0_dev, ids, negative, scale))

    # diffusers, from the same folder.
    import diffusers

    start = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                             requires_safety_checker=False,
                                                             torch_dtype=TORCH_DTYPES[args.dtype]).to(device)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_torch = time.perf_counter() - start
    latents = torch.from_numpy(np.ascontiguousarray(x0.transpose(0, 3, 1, 2))).to(device, TORCH_DTYPES[args.dtype])
    factor = pipe.vae_scale_factor

    def theirs():
        with torch.inference_mode():
            out = pipe([PROMPT] * args.batch, negative_prompt=[""] * args.batch, height=h * factor, width=w * factor,
                       num_inference_steps=args.steps, guidance_scale=args.guidance, latents=latents,
                       output_type="latent").images
        sync()
        return out

    print(f"size {args.size}, dtype {args.dtype}, batch {args.batch}, {args.steps} DPM-Solver++ steps, guidance "
          f"{args.guidance}; latents {h}x{w}x{c} ({h * factor} px, VAE factor {factor}); JAX on "
          f"{jax.default_backend()} ({jax.device_count()} device), torch on {device} ({torch.get_num_threads()} "
          f"threads); params loaded in {load_ours:.0f} s (ours), {load_torch:.0f} s (torch); ours compiled in "
          f"{compile_s:.0f} s")
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} (1 min), {load_before[1]:.2f} (5 min)", flush=True)
    start = time.perf_counter()
    times, cpu_times, outputs = race({"ours": ours, "torch": theirs}, args.repeats, args.warmup)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} (1 min), {load_after[1]:.2f} (5 min); timed part {wall:.0f} s")

    ref = outputs["torch"].float().permute(0, 2, 3, 1).cpu().numpy()
    err = rel_err(np.asarray(outputs["ours"], np.float32), ref)
    agree = err <= AGREE[args.dtype]
    print(f"agreement: max |ours - torch| / max |torch| = {err:.2e} (max |torch| {np.abs(ref).max():.3f})"
          + ("" if agree else f"  <-- DIFFERENT COMPUTATIONS (above {AGREE[args.dtype]:g}): the timing means nothing"))

    med = {k: statistics.median(v) for k, v in times.items()}
    row = dict(part="triplets: DPM-Solver++ 2M + CFG, latents", size=args.size, dtype=args.dtype, batch=args.batch,
               steps=args.steps, guidance=args.guidance, prompt=PROMPT,
               ours_s=med["ours"], torch_s=med["torch"], ratio=med["ours"] / med["torch"],
               ours_s_per_image=med["ours"] / args.batch, torch_s_per_image=med["torch"] / args.batch,
               ours_s_per_step=med["ours"] / args.steps, torch_s_per_step=med["torch"] / args.steps,
               ours_images_per_s=args.batch / med["ours"], torch_images_per_s=args.batch / med["torch"],
               ours_min_s=min(times["ours"]), torch_min_s=min(times["torch"]),
               ours_times_s=times["ours"], torch_times_s=times["torch"],
               ours_cpu_s=cpu_times["ours"], torch_cpu_s=cpu_times["torch"], repeats=args.repeats, warmup=args.warmup,
               compile_s=compile_s, rel_err=err, agree=agree,
               load_before=list(load_before), load_after=list(load_after), command=command, machine=machine(device),
               folder=str(folder), note=args.note, date=time.strftime("%Y-%m-%d %H:%M:%S %z"))

    print(f"{'steps':>5}{'batch':>6}{'ours s/img':>12}{'torch s/img':>12}{'ours/torch':>11}{'ours s/step':>12}"
          f"{'torch s/step':>13}{'compile s':>10}{'ours img/s':>11}{'torch img/s':>12}{'rel diff':>10}{'load':>6}")
    print(f"{args.steps:>5}{args.batch:>6}{row['ours_s_per_image']:>12.2f}{row['torch_s_per_image']:>12.2f}"
          f"{row['ratio']:>11.3f}{row['ours_s_per_step']:>12.2f}{row['torch_s_per_step']:>13.2f}{compile_s:>10.1f}"
          f"{row['ours_images_per_s']:>11.3f}{row['torch_images_per_s']:>12.3f}{err:>10.1e}{load_after[0]:>6.2f}")
    print(f"(medians of {args.repeats} timed calls after {args.warmup} warm-up; per step = per call / {args.steps}); "
          f"process CPU s per call: ours {statistics.median(cpu_times['ours']):.0f}, torch "
          f"{statistics.median(cpu_times['torch']):.0f} ({len(os.sched_getaffinity(0))} cores x wall: "
          f"{len(os.sched_getaffinity(0)) * med['ours']:.0f}, {len(os.sched_getaffinity(0)) * med['torch']:.0f})")
    if jax.default_backend() == "gpu":
        verdict = "meets" if row["ours_images_per_s"] >= GOAL_IMAGES_PER_S else "BELOW"
        print(f"GPU: ours {row['ours_images_per_s']:.2f} images/s at batch {args.batch}, {args.steps} steps: "
              f"{verdict} the {GOAL_IMAGES_PER_S:g} images/s goal (torch {row['torch_images_per_s']:.2f})")

    if args.out:
        key = lambda r: (r["size"], r["dtype"], r["batch"], r["steps"], r["guidance"], r["machine"]["torch_device"])
        merge_rows(Path(args.out), row, key)
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
