"""Speed of FID feature extraction: our Flax FID Inception-v3 against pytorch-fid's network, same weights and images.

What it measures: pool features (B, 2048) of --images random 299x299 images (uint8 noise
divided by 255, so floats in [0, 1], as a decoded image batch would be), --batch at a time,
by `jax.jit(rectflow_jax.models.inception.inception_features)` and by pytorch-fid's
`InceptionV3()` (resize_input and normalize_input on, the 2048-d block; the same calls
pytorch-fid's get_activations makes) under torch.no_grad. Both get the same random weights
(every tensor redrawn, BatchNorm statistics too; or --weights FILE, e.g. the real
pt_inception-2015-12-05-6726825d.pth with --allow_pickle) and the same images, and their
features are compared (max |ours - torch| / max |torch| over all images): a timing of two
different computations would mean nothing.

    # CPU: both sides on every core (about 10 minutes for 1000 images on 2 cores)
    python benchmarks/inception_speed.py --out benchmarks/results/cpu2_inception.json
    # GPU: JAX on its default backend (the GPU), torch on cuda
    python benchmarks/inception_speed.py --device cuda --batch 200 --images 10000 \\
        --out benchmarks/results/h200_inception.json
    python benchmarks/inception_speed.py --images 100 --batch 10      # a smoke run

pytorch-fid comes from tests/fid_reference.py's private folder (.fid_reference; see there
for the pip command), not from site-packages.

Timing: ours is compiled ahead of time (compile_s, reported on its own), then each side
gets --warmup untimed batches, then every batch is run by ours and by torch in turn, so both
see the same background load. A side's time for a batch covers moving the float32 images
in (device_put / torch.from_numpy(...).to(device)), the network, and the features back as
numpy; the uint8 -> float conversion is done before and timed for neither. Ours is waited
for by the host copy, torch is synchronised on CUDA. On CPU torch gets every core
(torch.set_num_threads), as XLA does; the load average is stored with the row, since other
work on the machine slows both sides. ratio = ours seconds / torch seconds for all images:
below 1 ours is faster.

On GPUs float32 convolutions may run in TF32 on both sides (torch's cudnn.allow_tf32 and
XLA's default precision), so agreement there is to ~1e-3, not the CPU's ~1e-6.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AGREE = {"cpu": 1e-4, "cuda": 1e-2}  # max rel diff above which the two sides are called different


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images to embed per side")
    parser.add_argument("--batch", type=int, default=50, help="images per call (pytorch-fid's default is 50)")
    parser.add_argument("--size", type=int, default=299, help="side of the input images (resized to 299 by both)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per side first")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cpu: both sides on the CPU (JAX_PLATFORMS=cpu); cuda: torch on cuda, JAX on its "
                             "default backend; auto: cuda if torch sees one")
    parser.add_argument("--weights", help="pytorch-fid's .pth (with --allow_pickle) or its safetensors conversion "
                                          "(default: random weights)")
    parser.add_argument("--allow_pickle", action="store_true", help="let --weights be a PyTorch pickle")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    parser.add_argument("--out", help="results json: this row is added, replacing one of the same settings")
    parser.add_argument("--note", default="", help="a remark stored with the row (e.g. what else ran)")
    args = parser.parse_args()
    if min(args.images, args.batch, args.size) < 1 or args.warmup < 0:
        parser.error("--images, --batch and --size must be positive, --warmup non-negative")
    return args


ARGS = parse_args()
if ARGS.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported
# On a GPU both sides share the card: JAX takes half of its memory (not its default 75%), torch the rest.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from rectflow_jax.models import inception as ours  # noqa: E402
from sd_speed import merge_rows  # noqa: E402


def import_pytorch_fid():
    """pytorch_fid.inception from tests/fid_reference.py's private folder, or exit saying how to install it."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fid_reference

    if not (fid_reference.FOLDER / "pytorch_fid").is_dir():
        sys.exit(f"pytorch-fid is not installed where tests/fid_reference.py looks; run: {fid_reference.INSTALL}")
    return fid_reference.import_pytorch_fid()[0]


def random_state(seed: int) -> dict[str, np.ndarray]:
    """pytorch-fid's state-dict names and shapes (fc included), every tensor random but activations O(1)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in ours.state_dict_shapes().items():
        if name.endswith("conv.weight"):
            state[name] = rng.normal(0, (2.0 / np.prod(shape[1:])) ** 0.5, shape)
        elif name.endswith("bn.weight"):
            state[name] = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("running_var"):
            state[name] = rng.uniform(0.5, 2.0, shape)
        else:
            state[name] = rng.normal(0, 0.2, shape)
    state["fc.weight"] = rng.normal(0, 2048 ** -0.5, (1008, 2048))
    state["fc.bias"] = np.zeros(1008)
    return {name: value.astype(np.float32) for name, value in state.items()}


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
            "torch": torch.__version__, "torch_device": str(device), "torch_threads": torch.get_num_threads(),
            "cpu_cores": len(os.sched_getaffinity(0)), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    info["cpu"] = models[0] if models else platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(args: argparse.Namespace) -> None:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if use_cuda else "cpu")
    cores = len(os.sched_getaffinity(0))
    if device.type == "cpu":
        torch.set_num_threads(cores)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])

    # The same weights on both sides.
    if args.weights:
        state = ours.read_weights(args.weights, allow_pickle=args.allow_pickle)
        weights_name = f"{Path(args.weights).name} ({ours.weights_fingerprint(args.weights)})"
    else:
        state = random_state(args.seed)
        weights_name = f"random (seed {args.seed})"
    params = ours.params_from_state_dict(state, source=weights_name)
    pytorch_fid = import_pytorch_fid()
    torch_state = {name: torch.from_numpy(np.array(value)) for name, value in state.items()}
    pytorch_fid.load_state_dict_from_url = lambda *_, **__: torch_state  # instead of the download
    model = pytorch_fid.InceptionV3().eval().to(device)

    pixels = np.random.default_rng(args.seed + 1).integers(0, 256, (args.images, args.size, args.size, 3), np.uint8)
    batches = [slice(i, min(i + args.batch, args.images)) for i in range(0, args.images, args.batch)]
    as_float = lambda sl: pixels[sl].astype(np.float32) / np.float32(255)

    start = time.perf_counter()
    compiled = {}
    for shape in sorted({(sl.stop - sl.start, args.size, args.size, 3) for sl in batches}, reverse=True):
        compiled[shape[0]] = jax.jit(ours.inception_features).lower(
            params, jax.ShapeDtypeStruct(shape, np.float32)).compile()
    compile_s = time.perf_counter() - start

    def run_ours(images_nhwc: np.ndarray) -> np.ndarray:
        return np.asarray(compiled[len(images_nhwc)](params, jax.device_put(images_nhwc)))

    def run_torch(images_nhwc: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))).to(device)
            out = model(x)[0].reshape(len(images_nhwc), -1).cpu().numpy()
        sync()
        return out

    print(f"{args.images} images of {args.size}x{args.size}, batch {args.batch}; weights {weights_name}; JAX on "
          f"{jax.default_backend()} ({jax.devices()[0]}), torch on {device} ({torch.get_num_threads()} threads); "
          f"ours compiled in {compile_s:.1f} s", flush=True)
    for i in range(args.warmup):
        warm = as_float(batches[i % len(batches)])
        run_ours(warm), run_torch(warm)
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} (1 min), {load_before[1]:.2f} (5 min)", flush=True)
    wall = {"ours": [], "torch": []}
    cpu = {"ours": [], "torch": []}
    feats = {"ours": [], "torch": []}
    for k, sl in enumerate(batches):
        images = as_float(sl)
        for name, fn in (("ours", run_ours), ("torch", run_torch)):
            t0, c0 = time.perf_counter(), time.process_time()
            feats[name].append(fn(images))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        if (k + 1) % max(1, len(batches) // 5) == 0:
            print(f"  {sl.stop}/{args.images}: ours {sum(wall['ours']):.1f} s, torch {sum(wall['torch']):.1f} s",
                  flush=True)
    load_after = os.getloadavg()

    ref = np.concatenate(feats["torch"])
    err = float(np.abs(np.concatenate(feats["ours"]) - ref).max() / np.abs(ref).max())
    agree = err <= AGREE[device.type]
    total = {name: sum(times) for name, times in wall.items()}
    row = dict(part="FID Inception-v3 pool features (resize to 299, 2048-d)", images=args.images, batch=args.batch,
               size=args.size, weights=weights_name,
               ours_s=total["ours"], torch_s=total["torch"], ratio=total["ours"] / total["torch"],
               ours_images_per_s=args.images / total["ours"], torch_images_per_s=args.images / total["torch"],
               ours_median_batch_s=statistics.median(wall["ours"]),
               torch_median_batch_s=statistics.median(wall["torch"]),
               ours_cpu_s=sum(cpu["ours"]), torch_cpu_s=sum(cpu["torch"]), compile_s=compile_s,
               warmup=args.warmup, rel_err=err, agree=agree,
               load_before=list(load_before), load_after=list(load_after), command=command, machine=machine(device),
               note=args.note, date=time.strftime("%Y-%m-%d %H:%M:%S %z"))

    print(f"{'images':>7}{'batch':>6}{'ours s':>9}{'torch s':>9}{'ours/torch':>11}{'ours img/s':>11}"
          f"{'torch img/s':>12}{'compile s':>10}{'rel diff':>10}{'load':>6}")
    print(f"{args.images:>7}{args.batch:>6}{total['ours']:>9.1f}{total['torch']:>9.1f}{row['ratio']:>11.3f}"
          f"{row['ours_images_per_s']:>11.2f}{row['torch_images_per_s']:>12.2f}{compile_s:>10.1f}{err:>10.1e}"
          f"{load_after[0]:>6.2f}")
    print(f"process CPU s: ours {row['ours_cpu_s']:.0f}, torch {row['torch_cpu_s']:.0f} ({cores} cores x wall: "
          f"{cores * total['ours']:.0f}, {cores * total['torch']:.0f})")
    print(f"agreement: max |ours - torch| / max |torch| = {err:.2e} (max |torch| {np.abs(ref).max():.3f})"
          + ("" if agree else f"  <-- DIFFERENT COMPUTATIONS (above {AGREE[device.type]:g}): the timing means nothing"))

    if args.out:
        key = lambda r: (r["images"], r["batch"], r["size"], r["machine"]["torch_device"], r["machine"]["jax_backend"])
        merge_rows(Path(args.out), row, key)
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main(ARGS)
