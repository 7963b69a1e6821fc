"""The SD 1.5 UNet's 2-RF training step: step time, images/s, memory and MFU at the largest batch that fits.

    python benchmarks/sd_train_step.py --size sd15 --batch auto --torch --attention_report   # on a GPU
    python benchmarks/sd_train_step.py --size sd15 --batch 32 --remat full
    python benchmarks/sd_train_step.py --size tiny --batch 2 --steps 3 --torch                # a CPU smoke run

What is timed is our real step (rectflow_jax.train.make_train_step, as train.train jits it: state
sharded over a data-parallel mesh, donated, the step compiled ahead of time), built as a 2-RF
stage from Stable Diffusion builds it: model.name 'sd_unet' read from a diffusers folder, here
one that holds only the two configs (SD 1.5 sizes from sd_speed.SIZES, random weights), so the
CLIP text encoder is frozen exactly as there: its params are the step's `frozen` argument,
outside the optimiser and the EMA, and its output is stop_gradient-ed. (Inline `unet:` and
`text_encoder:` configs would make the text encoder trainable: in the optimiser, the EMA and the
gradient.) The optimiser, EMA, clipping, time sampler and condition dropout are those of
configs/sd15_2rf.py (AdamW behind clipping at 1.0, EMA 0.9999, t ~ U[1e-3, 1], 10% null
prompts); the loss is L2 on v(x_t, t | text) = unet(x_t, (1 - t) * 1000, clip(ids)) against
x1 - x0. A batch is {x1: latents (B, 64, 64, 4), x0: noise, input_ids: int32 (B, 77)}, random.

--batch auto: the per-device batch doubles from --batch_start (1) up to --max_batch, then the
gap between the last batch that fits and the first that does not is searched down to
--batch_multiple (by the line through the compiled memory estimates of the two largest fits
where there are two, else by halving). A batch does not fit when its compile raises
RESOURCE_EXHAUSTED, when XLA's estimate of its peak (memory_analysis: arguments + outputs +
temporaries - donated aliases) exceeds the device's bytes_limit (or --memory_limit_gib), or when
its first two steps raise an out-of-memory error; a batch whose estimate is predicted >15% over
the limit by that line is not compiled, and where the line reaches the limit before twice the
last fit the search goes straight there. At SD 1.5 size a compile takes on the order of a minute
on a GPU (an estimate, not yet measured), so start higher on a large GPU (--batch_start 16) and
cap the search with --search_budget_s. On CPU the tiny step compiles in 40-60 s on 2 cores.

--remat none (the default) recomputes nothing, so at any batch where it fits it does the least
work per image; configs/sd15_2rf.py trains with remat True ('full'), which also recomputes the
forward pass (about a third more work); 'dots_saveable' keeps matmul and conv outputs. Measure
the others with --remat full / dots_saveable: each has its own row in the JSON.

Timing: --warmup steps, then --steps steps, each waited for (jax.block_until_ready on the new
state and metrics); fastest and median step. On CPU, ours and torch's steps alternate in one
process, so both see the same background load (sd_speed.race's rule); on a GPU each side runs
in its own process (JAX preallocates the GPU's memory, and torch's caching allocator keeps its
own), one after the other, as does --attention_report; --isolate does the same on CPU. On a
shared CPU, timings move several-fold with other work (torch's tiny step took 27 to 181 ms in
runs here, in one process and in its own), torch's OpenMP threads being slowed the most.

MFU = model FLOPs per step / step time / (devices * bf16 peak of train.peak_flops; none on CPU).
Model FLOPs: XLA's cost analysis of the same step lowered (not compiled) in float32 without
remat and one microbatch, where attention is plain XLA dot products: a rematerialised step's
recomputation is not model work, and the compiled step's count (reported as xla_flops_per_step,
train.compiled_stats) counts recomputation and may leave out the work inside cuDNN custom calls.
At SD 1.5 size this is 2.38 TFLOPs per image: the UNet forward's 0.79 three times (forward and
backward) plus the frozen CLIP forward and the optimiser's elementwise work.

--torch: diffusers' UNet2DConditionModel and transformers' CLIPTextModel of the same configs,
random weights: the same function (the frozen text encoder under no_grad, the UNet trained),
torch.autocast bf16 on CUDA (float32 on CPU, whatever --dtype), fused AdamW on CUDA (foreach on
CPU), the same clipping, EMA update and condition dropout, on the same shapes; memory is
torch.cuda.max_memory_allocated (omitted on CPU). Should torch not fit our batch, it halves.

--attention_report (GPU): for each attention shape of the UNet (self-attention at 64x64, 32x32,
16x16, 8x8 tokens with head widths 40, 80, 160, 160, and cross-attention over 77 tokens), in
bf16, which implementation models/layers.multi_head_attention picks, and whether
jax.nn.dot_product_attention(implementation='cudnn') runs it (forward and forward+backward),
timed against implementation='xla'.

Output: a table, and the row merged into benchmarks/results/<device>_sd_train_step_<size>.json
(device: cpu<cores>, h100, h200, ...; --out_dir elsewhere), keyed by dtype, remat, microbatches, batch
mode and processes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/sd_train_step.py` without an installed package
    sys.path.insert(1, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402  (the backend starts at first use, in the process that measures)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sd_speed import SIZES, merge_rows  # noqa: E402  (this folder)

REMATS = ("none", "full", "dots_saveable")
TEXT_TOKENS = 77
GIB = 2 ** 30


def latent_shape(size: str) -> tuple[int, int, int]:
    side = SIZES[size]["unet"].get("sample_size", 64)
    return (side, side, SIZES[size]["unet"].get("in_channels", 4))


def stage_config():
    """configs/sd15_2rf.py: the optimiser, EMA, time sampler and condition dropout of SD 1.5's 2-RF stage."""
    spec = importlib.util.spec_from_file_location("sd15_2rf", ROOT / "configs" / "sd15_2rf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("phase1")


def is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OutOfMemory" in text


@contextlib.contextmanager
def xla_paths_only():
    """Traces inside see models/layers without its CPU-only paths (tiled attention, patch matmuls):
    their scans would be counted once by XLA's cost analysis. Thresholds are read at trace time."""
    from rectflow_jax.models import layers

    saved = layers.CPU_KEY_BLOCK, layers.CPU_PATCH_MATMUL_MAX_PIXELS
    layers.CPU_KEY_BLOCK, layers.CPU_PATCH_MATMUL_MAX_PIXELS = 2 ** 62, 0
    try:
        yield
    finally:
        layers.CPU_KEY_BLOCK, layers.CPU_PATCH_MATMUL_MAX_PIXELS = saved


def step_times(contenders: dict, steps: int, warmup: int) -> dict[str, dict]:
    """Seconds per call of each contender: `warmup` calls each, then `steps` rounds in which they alternate."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times = {name: [] for name in contenders}
    for _ in range(steps):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"fastest_s": min(t), "median_s": statistics.median(t), "times_s": t} for name, t in times.items()}


# ----------------------------------------------------------------------------- ours


class Ours:
    """Our 2-RF step at one size, dtype and remat policy, over a data-parallel mesh of every device."""

    def __init__(self, size: str, dtype: str, remat: str, microbatches: int):
        from rectflow_jax import flow, models, parallel, train

        self.flow, self.train, self.parallel = flow, train, parallel
        self.size, self.dtype, self.remat, self.microbatches = size, dtype, remat, microbatches
        self.shape = latent_shape(size)
        self.config = stage_config()
        self.folder = tempfile.TemporaryDirectory()
        for sub, cfg in (("unet", SIZES[size]["unet"]), ("text_encoder", SIZES[size]["clip"])):
            (Path(self.folder.name) / sub).mkdir()
            (Path(self.folder.name) / sub / "config.json").write_text(json.dumps(cfg))
        start = time.perf_counter()
        self.model = self.build(dtype, remat)
        assert models.frozen_keys(self.model) == ("text_encoder",)
        self.mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        self.rules = parallel.logical_rules()
        self.devices = int(self.mesh.size)
        self.tx = train.make_optimizer(self.config.optim, int(self.config.train.num_steps))
        stage = train.Stage(name="2rf", objective="flow", model=self.model, shape=self.shape, num_classes=0,
                            source_fn=self.source, batches=lambda *a, **k: iter(()))
        self.state_sharding = train._state_shardings(self.model, self.tx, stage, self.mesh, self.rules)
        self.frozen_sharding = parallel.param_shardings(
            models.abstract_frozen_boxed(self.model, self.shape, 0), self.mesh, self.rules)
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.replicated = parallel.replicated(self.mesh)
        self.create = jax.jit(self.fresh, out_shardings=(self.state_sharding, self.frozen_sharding))
        with_sharding = lambda tree, shardings: jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
        abstract_state, abstract_frozen = jax.eval_shape(self.create, jax.random.key(0))
        self.abstract_state = with_sharding(abstract_state, self.state_sharding)
        self.abstract_frozen = with_sharding(abstract_frozen, self.frozen_sharding)
        self.key = parallel.replicate(np.asarray(jax.random.key_data(jax.random.key(0))), self.mesh)
        self.state = self.frozen = None
        self.compiled, self.batch, self.per_device = None, None, None
        print(f"our step set up in {time.perf_counter() - start:.1f} s ({self.devices} device(s), "
              f"{jax.devices()[0].device_kind})", flush=True)

    def build(self, dtype: str, remat: str):
        from rectflow_jax import models

        return models.build_velocity_model({"name": "sd_unet", "pretrained": self.folder.name, "dtype": dtype,
                                            "param_dtype": "float32", "remat": remat}, self.shape, 0)

    def source(self, key, n):
        return jax.random.normal(key, (n, *self.shape))

    def fresh(self, key):
        from rectflow_jax import models

        params = nn.unbox(self.model.init(key, *models.example_inputs(self.model, self.shape, 0))["params"])
        trainable = models.trainable(self.model, params)
        frozen = {k: params[k] for k in models.frozen_keys(self.model)}
        return self.train.TrainState(step=jnp.zeros((), jnp.int32), params=trainable, ema_params=trainable,
                                     opt_state=self.tx.init(trainable)), frozen

    def step_fn(self, model, microbatches: int):
        flow_config = self.config.flow
        sampler = flow_config.time_sampler
        optim = self.config.optim
        return self.train.make_train_step(
            model, self.tx, objective="flow", loss=self.train.plain_loss(flow_config.loss),
            time_sampler=self.flow.time_sampler(sampler, **flow_config[sampler]), source_fn=self.source,
            ema_decay=self.train.ema_decay_schedule(optim.ema_decay, optim.ema_warmup),
            cond_dropout=float(flow_config.cond_dropout),
            null_cond={"input_ids": np.zeros((1, TEXT_TOKENS), np.int32)}, microbatches=microbatches)

    def jitted(self, model, microbatches: int):
        return jax.jit(self.step_fn(model, microbatches),
                       in_shardings=(self.state_sharding, self.batch_sharding, self.replicated, self.frozen_sharding),
                       out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)

    def abstract_batch(self, per_device: int) -> dict:
        b = per_device * self.devices
        spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
        return {"x1": spec((b, *self.shape), np.float32), "x0": spec((b, *self.shape), np.float32),
                "input_ids": spec((b, TEXT_TOKENS), np.int32)}

    def make_batch(self, per_device: int) -> dict:
        b = per_device * self.devices
        rng = np.random.default_rng(per_device)
        vocab = SIZES[self.size]["clip"]["vocab_size"]
        host = {"x1": rng.standard_normal((b, *self.shape), dtype=np.float32),
                "x0": rng.standard_normal((b, *self.shape), dtype=np.float32),
                "input_ids": rng.integers(0, vocab, (b, TEXT_TOKENS)).astype(np.int32)}
        return {k: jax.device_put(v, self.batch_sharding) for k, v in host.items()}

    def compile(self, per_device: int):
        with self.parallel.activation_sharding(self.mesh, self.rules):
            lowered = self.jitted(self.model, self.microbatches).lower(
                self.abstract_state, self.abstract_batch(per_device), self.key, self.abstract_frozen)
        return lowered.compile()

    def model_flops(self, per_device: int) -> float | None:
        """FLOPs of one step as model work: the step in float32, no remat, one microbatch, lowered only."""
        model = self.build("float32", "none")
        with xla_paths_only(), self.parallel.activation_sharding(self.mesh, self.rules):
            lowered = self.jitted(model, 1).lower(self.abstract_state, self.abstract_batch(per_device), self.key,
                                                  self.abstract_frozen)
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) if cost and cost.get("flops") else None

    def reset_state(self):
        self.state = self.frozen = None
        gc.collect()

    def install(self, per_device: int, compiled) -> None:
        if self.state is None:
            self.state, self.frozen = self.create(jax.random.key(0))
        self.compiled, self.per_device = compiled, per_device
        self.batch = self.make_batch(per_device)

    def run_step(self):
        self.state, self.metrics = self.compiled(self.state, self.batch, self.key, self.frozen)
        jax.block_until_ready((self.state, self.metrics))


def memory_limit(args) -> int | None:
    if args.memory_limit_gib:
        return int(args.memory_limit_gib * GIB)
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def try_batch(ours: Ours, per_device: int, limit: int | None, log: list[dict]) -> tuple[bool, dict]:
    """Compiles the step at `per_device` and runs two steps: whether it fits, and the compiled stats."""
    entry: dict = {"per_device_batch": per_device}
    start = time.perf_counter()
    try:
        compiled = ours.compile(per_device)
    except Exception as err:  # noqa: BLE001 - only out-of-memory is an answer, the rest re-raised
        if not is_oom(err):
            raise
        entry.update(fits=False, reason=f"compile: {str(err).splitlines()[0][:200]}")
        log.append(entry)
        return False, entry
    entry["compile_s"] = time.perf_counter() - start
    stats = ours.train.compiled_stats(compiled, ours.mesh)
    entry["peak_bytes_estimate"] = stats.get("peak_bytes_estimate")
    if limit and entry["peak_bytes_estimate"] and entry["peak_bytes_estimate"] > limit:
        entry.update(fits=False, reason=f"estimate {entry['peak_bytes_estimate'] / GIB:.2f} GiB > limit "
                                        f"{limit / GIB:.2f} GiB")
        log.append(entry)
        return False, entry
    try:
        ours.install(per_device, compiled)
        for _ in range(2):
            ours.run_step()
    except Exception as err:  # noqa: BLE001
        if not is_oom(err):
            raise
        ours.reset_state()
        ours.compiled = None
        entry.update(fits=False, runtime_oom=True, reason=f"run: {str(err).splitlines()[0][:200]}")
        log.append(entry)
        return False, entry
    entry.update(fits=True, stats=stats, compiled=compiled)
    log.append(entry)
    return True, entry


def search_batch(ours: Ours, args, limit: int | None) -> tuple[int, list[dict]]:
    """The largest per-device batch that fits: doubling, then the gap searched down to --batch_multiple."""
    log: list[dict] = []
    step = max(args.microbatches, 1)  # every batch splits into the microbatches
    multiple = max(step, args.batch_multiple // step * step)
    begin = time.perf_counter()
    over_budget = lambda: bool(args.search_budget_s) and time.perf_counter() - begin > args.search_budget_s
    fits: dict[int, dict] = {}

    def limit_crossing() -> float | None:
        """The batch at which the line through the two largest fits' estimates reaches the limit."""
        if not limit or len(fits) < 2:
            return None
        (b0, e0), (b1, e1) = sorted(fits.items())[-2:]
        per = (e1["peak_bytes_estimate"] - e0["peak_bytes_estimate"]) / (b1 - b0)
        return b1 + (limit - e1["peak_bytes_estimate"]) / per if per > 0 else None

    def attempt(b: int) -> bool:
        crossing = limit_crossing()
        if crossing is not None and b > 1.15 * crossing:
            reason = f"predicted over the limit from batch {crossing:.0f} on: not compiled"
            log.append({"per_device_batch": b, "fits": False, "reason": reason})
            print(f"  batch {b}/device: {reason}", flush=True)
            return False
        ok, entry = try_batch(ours, b, limit, log)
        said = [("fits" if ok else f"does not fit ({entry['reason']})")]
        if "compile_s" in entry:
            said.append(f"compiled in {entry['compile_s']:.1f} s")
        if entry.get("peak_bytes_estimate"):
            said.append(f"estimate {entry['peak_bytes_estimate'] / GIB:.2f} GiB")
        print(f"  batch {b}/device: " + ", ".join(said), flush=True)
        if ok:
            fits[b] = entry
            for other in fits:  # only the largest fit's executable is kept
                if other != max(fits):
                    fits[other].pop("compiled", None)
        return ok

    b, last_fit, first_fail = max(step, args.batch_start // step * step), None, None
    while not over_budget():  # doubling
        if not attempt(b):
            first_fail = b
            break
        last_fit = b
        if b >= args.max_batch:
            break
        after = min(2 * b, max(step, args.max_batch // step * step))
        crossing = limit_crossing()
        jump = int(crossing // multiple * multiple) if crossing is not None and crossing < after else None
        if jump is not None and b < jump:  # the line reaches the limit before 2b: straight to where it does
            if attempt(jump):
                last_fit = jump
                first_fail = jump + multiple  # beyond the line: not compiled
                log.append({"per_device_batch": first_fail, "fits": False,
                            "reason": f"predicted over the limit from batch {crossing:.0f} on: not compiled"})
            else:
                first_fail = jump
            break
        if jump is not None:  # b is already the last grid point under the line
            first_fail = b + multiple
            break
        b = after
    while last_fit is None and b > step and not over_budget():  # the first batch failed: halving
        b = max(step, b // 2 // step * step)
        if attempt(b):
            last_fit = b
        else:
            first_fail = b
    if last_fit is None:
        raise SystemExit(f"no batch fits: {log[-1]['reason'] if log else 'the search budget is spent'}")
    while first_fail is not None and not over_budget():  # the gap, on the grid last_fit + k * multiple
        between = -(-(first_fail - last_fit) // multiple) - 1  # grid points strictly inside the gap
        if between < 1:
            break
        k = (between + 1) // 2
        crossing = limit_crossing()
        if crossing is not None and crossing < first_fail:  # the line knows better than halving
            k = min(int((crossing - last_fit) // multiple), between)
            if k < 1:
                break  # the line puts the limit below last_fit + multiple
        candidate = last_fit + k * multiple
        if attempt(candidate):
            last_fit = candidate
        else:
            first_fail = candidate
    if ours.per_device != last_fit or ours.compiled is None:
        ours.install(last_fit, fits[last_fit]["compiled"])
        ours.run_step()
    return last_fit, log


def attention_calls(compiled) -> dict[str, int]:
    """The cuDNN fused-attention custom calls in a compiled step, by target name."""
    text = compiled.as_text()
    calls: dict[str, int] = {}
    names = re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', text) or re.findall(r"__cudnn\$fmha\w*", text)
    for name in names:
        calls[name] = calls.get(name, 0) + 1
    return calls


def attention_layers(size: str) -> dict[str, int]:
    """Attention layers of the configs: the UNet's self + cross attentions and CLIP's causal ones."""
    u = SIZES[size]["unet"]
    down = u.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    up = u.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    per = u.get("layers_per_block", 2)
    blocks = per * sum("CrossAttn" in k for k in down) + (per + 1) * sum("CrossAttn" in k for k in up) + 1
    return {"unet": 2 * blocks, "text_encoder": SIZES[size]["clip"]["num_hidden_layers"]}


def measure_ours(args, ours: Ours, torch_side=None) -> tuple[dict, dict | None]:
    """Our row (and torch's timings when it runs in this process): search or fixed batch, timed steps."""
    limit = memory_limit(args)
    log: list[dict] = []
    if args.batch == "auto":
        print(f"largest batch (limit {f'{limit / GIB:.4g} GiB' if limit else 'none'}):", flush=True)
        per_device, log = search_batch(ours, args, limit)
        entry = next(e for e in log if e.get("fits") and e["per_device_batch"] == per_device)
    else:
        per_device = int(args.batch)
        if per_device % args.microbatches:
            raise SystemExit(f"--batch {per_device} is not a multiple of --microbatches {args.microbatches}")
        ok, entry = try_batch(ours, per_device, None, log)
        if not ok:
            raise SystemExit(f"batch {per_device} does not fit: {entry['reason']}")
    stats = entry["stats"]
    compiled = ours.compiled
    fused = attention_calls(compiled) if jax.default_backend() == "gpu" else {}
    start = time.perf_counter()
    flops = ours.model_flops(per_device)
    print(f"batch {per_device}/device compiled in {entry.get('compile_s', 0):.1f} s; model FLOPs counted in "
          f"{time.perf_counter() - start:.1f} s; timing {args.warmup} + {args.steps} steps", flush=True)
    batch = per_device * ours.devices
    contenders = {"ours": ours.run_step}
    if torch_side is not None:
        torch_side.prepare(batch)
        contenders["torch"] = torch_side.step
    timings = step_times(contenders, args.steps, args.warmup)
    loss, finite = (float(v) for v in jax.device_get((ours.metrics["loss"], ours.metrics["finite"])))
    peak = stats.get("peak_flops")
    t = timings["ours"]
    row = {
        "size": args.size, "dtype": args.dtype, "remat": args.remat, "microbatches": args.microbatches,
        "batch_mode": "auto" if args.batch == "auto" else "fixed", "devices": ours.devices,
        "device_kind": stats.get("device_kind"), "per_device_batch": per_device, "batch": batch,
        "latent_shape": list(ours.shape), "text_tokens": TEXT_TOKENS,
        "step_time_s": t["fastest_s"], "step_time_median_s": t["median_s"], "step_times_s": t["times_s"],
        "images_per_s": batch / t["fastest_s"], "images_per_s_median": batch / t["median_s"],
        "model_flops_per_step": flops, "model_tflops_per_image": flops / batch / 1e12 if flops else None,
        "xla_flops_per_step": stats.get("flops_per_step"), "peak_flops_per_device": peak,
        "mfu": flops / t["fastest_s"] / (ours.devices * peak) if flops and peak else None,
        "mfu_median": flops / t["median_s"] / (ours.devices * peak) if flops and peak else None,
        "mfu_xla_flops": (stats["flops_per_step"] / t["fastest_s"] / (ours.devices * peak)
                          if stats.get("flops_per_step") and peak else None),
        "compile_s": entry.get("compile_s"),
        "memory": {k: stats[k] for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
                                         "peak_bytes_estimate") if k in stats},
        "memory_limit_bytes": limit, "attention_layers": attention_layers(args.size),
        "fused_attention_calls": fused, "loss": loss, "finite": bool(finite),
        "search": [{k: v for k, v in e.items() if k not in ("stats", "compiled")} for e in log],
    }
    if jax.default_backend() != "cpu":
        mem = jax.devices()[0].memory_stats() or {}
        row["peak_bytes_in_use"] = mem.get("peak_bytes_in_use")
        row["bytes_limit"] = mem.get("bytes_limit")
        row["peak_includes_failed_attempt"] = any(e.get("runtime_oom") for e in log)
    return row, timings.get("torch")


# ----------------------------------------------------------------------------- torch


class TorchStep:
    """diffusers' UNet trained on the frozen transformers CLIP's output: the same step in PyTorch."""

    def __init__(self, size: str, dtype: str, device: str):
        import diffusers
        import torch
        import transformers

        self.torch, self.size, self.device = torch, size, torch.device(device)
        self.config = stage_config()
        cfg = SIZES[size]
        torch.manual_seed(0)
        with self.device:
            self.unet = diffusers.UNet2DConditionModel(**cfg["unet"]).train()
            self.clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["clip"])).eval()
        self.clip.requires_grad_(False)
        self.autocast = (torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda" and dtype == "bfloat16"
                         else contextlib.nullcontext())
        self.compute = "bfloat16 autocast" if self.device.type == "cuda" and dtype == "bfloat16" else "float32"
        optim = self.config.optim
        self.params = [p for p in self.unet.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                                     weight_decay=optim.weight_decay, **(
                                         {"fused": True} if self.device.type == "cuda" else {"foreach": True}))
        self.ema = [p.detach().clone() for p in self.params]
        self.count = 0
        self.shape = latent_shape(size)

    def prepare(self, batch: int) -> None:
        torch = self.torch
        gen = torch.Generator().manual_seed(0)
        c, h, w = self.shape[2], self.shape[0], self.shape[1]
        self.batch = batch
        self.x1 = torch.randn(batch, c, h, w, generator=gen).to(self.device)
        self.x0 = torch.randn(batch, c, h, w, generator=gen).to(self.device)
        self.ids = torch.randint(0, SIZES[self.size]["clip"]["vocab_size"], (batch, TEXT_TOKENS), generator=gen
                                 ).to(self.device)
        self.null_ids = torch.zeros_like(self.ids)

    def step(self) -> None:
        torch = self.torch
        flow_config, optim = self.config.flow, self.config.optim
        b = self.batch
        drop = torch.rand(b, device=self.device) < flow_config.cond_dropout
        ids = torch.where(drop[:, None], self.null_ids, self.ids)
        eps = flow_config.uniform.eps
        t = torch.rand(b, device=self.device) * (1.0 - eps) + eps
        tb = t[:, None, None, None]
        x = tb * self.x1 + (1.0 - tb) * self.x0
        with self.autocast:
            with torch.no_grad():
                context = self.clip(ids).last_hidden_state
            v = self.unet(x, (1.0 - t) * 1000.0, context).sample
        loss = torch.mean(torch.square(v.float() - (self.x1 - self.x0)))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, optim.grad_clip, foreach=True)
        self.opt.step()
        decay = min(optim.ema_decay, (1.0 + self.count) / (10.0 + self.count))  # optim.ema_warmup 'ramp'
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - decay)
        self.count += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.loss = loss.detach()


def measure_torch(args, batch: int) -> dict:
    """Torch's own process (GPU): its step at our batch, halved while it runs out of memory."""
    import torch

    side = TorchStep(args.size, args.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    tried = []
    while True:
        try:
            side.prepare(batch)
            if side.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timings = step_times({"torch": side.step}, args.steps, args.warmup)["torch"]
            break
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            print(f"torch: batch {batch} ran out of memory; trying {batch // 2}", flush=True)
        # Out of the except block, whose traceback holds the activations: now they can go.
        tried.append(batch)
        side.opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        batch //= 2
    out = torch_row(side, timings, batch)
    out["batches_out_of_memory"] = tried
    return out


def torch_row(side: TorchStep, timings: dict, batch: int) -> dict:
    import diffusers
    import torch

    out = {"batch": batch, "step_time_s": timings["fastest_s"], "step_time_median_s": timings["median_s"],
           "step_times_s": timings["times_s"], "images_per_s": batch / timings["fastest_s"],
           "compute": side.compute, "device": side.device.type, "loss": side.loss.item(),
           "torch": torch.__version__, "diffusers": diffusers.__version__}
    if side.device.type == "cuda":
        out["max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
        out["device_name"] = torch.cuda.get_device_name()
    return out


# ----------------------------------------------------------------------------- attention


def attention_shapes(size: str) -> list[dict]:
    """(tokens, keys, heads, head width) of each distinct attention of the UNet: self and cross, per level."""
    u = SIZES[size]["unet"]
    channels = tuple(u.get("block_out_channels", (320, 640, 1280, 1280)))
    down = u.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    heads = u.get("num_attention_heads") or u.get("attention_head_dim", 8)
    heads = heads if isinstance(heads, (list, tuple)) else (heads,) * len(channels)
    side = u.get("sample_size", 64)
    levels = [(i, channels[i], heads[i]) for i, kind in enumerate(down) if "CrossAttn" in kind]
    levels.append((len(channels) - 1, channels[-1], heads[-1]))  # the mid block
    shapes = []
    for i, width, h in dict.fromkeys(levels):
        tokens = (side // 2 ** i) ** 2
        for kind, keys in (("self", tokens), ("cross", TEXT_TOKENS)):
            shapes.append({"level": i, "kind": kind, "tokens": tokens, "keys": keys, "heads": h,
                           "head_dim": width // h})
    return shapes


def backend() -> str:
    return jax.default_backend()


def fastest_ms(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def attention_report(args) -> list[dict]:

    from rectflow_jax.models import layers

    if backend() != "gpu":
        print(f"--attention_report: skipped on {backend()} (it times cuDNN kernels: GPU only)")
        return []
    device = jax.devices()[0]
    print(f"attention in bfloat16 on {device.device_kind} (compute capability "
          f"{getattr(device, 'compute_capability', '?')}), batch {args.attention_batch}:")
    rows = []
    for shape in attention_shapes(args.size):
        b, h, d = args.attention_batch, shape["heads"], shape["head_dim"]
        rng = np.random.default_rng(0)
        make = lambda n: jnp.asarray(rng.standard_normal((b, n, h, d), dtype=np.float32), jnp.bfloat16)
        q, k, v = make(shape["tokens"]), make(shape["keys"]), make(shape["keys"])
        g = make(shape["tokens"])
        flat = lambda a: a.reshape(a.shape[0], a.shape[1], h * d)
        ours = jax.jit(lambda q, k, v: layers.multi_head_attention(q, k, v, h))
        ours_text = ours.lower(flat(q), flat(k), flat(v)).as_text()
        row = dict(shape, model_picks="cudnn" if "cudnn$fmha" in ours_text else "xla")
        for impl in ("xla", "cudnn"):
            attn = lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, implementation=impl)
            fwd = jax.jit(attn)
            train = jax.jit(lambda q, k, v, g, attn=attn: jax.vjp(attn, q, k, v)[1](g))
            for name, fn, inputs in (("fwd", fwd, (q, k, v)), ("fwd_bwd", train, (q, k, v, g))):
                try:
                    row[f"{impl}_{name}_ms"] = fastest_ms(fn, *inputs)
                except Exception as err:  # noqa: BLE001 - an unsupported shape is the answer
                    row[f"{impl}_{name}_ms"] = None
                    row[f"{impl}_{name}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:240]}"
        row["cudnn_supported"] = row.get("cudnn_fwd_bwd_ms") is not None
        if row["cudnn_supported"] and row.get("xla_fwd_bwd_ms"):
            row["xla_over_cudnn_fwd_bwd"] = row["xla_fwd_bwd_ms"] / row["cudnn_fwd_bwd_ms"]
        rows.append(row)
        del q, k, v, g
        gc.collect()
    print(f"{'level':>6}{'kind':>7}{'tokens':>8}{'keys':>6}{'heads':>6}{'width':>6}{'model':>7}{'cuDNN':>7}"
          f"{'xla fwd':>10}{'cudnn fwd':>11}{'xla f+b':>10}{'cudnn f+b':>11}")
    ms = lambda x: f"{x:.3f}" if x is not None else "-"
    for r in rows:
        print(f"{r['level']:>6}{r['kind']:>7}{r['tokens']:>8}{r['keys']:>6}{r['heads']:>6}{r['head_dim']:>6}"
              f"{r['model_picks']:>7}{'yes' if r['cudnn_supported'] else 'no':>7}{ms(r['xla_fwd_ms']):>10}"
              f"{ms(r['cudnn_fwd_ms']):>11}{ms(r['xla_fwd_bwd_ms']):>10}{ms(r['cudnn_fwd_bwd_ms']):>11}")
        for key in ("cudnn_fwd_error", "cudnn_fwd_bwd_error"):
            if key in r:
                print(f"      {key}: {r[key]}")
    missed = [r for r in rows if r["cudnn_supported"] and r["model_picks"] != "cudnn"]
    if missed:
        print("cuDNN runs these, the model does not use it for them: head widths "
              f"{sorted({r['head_dim'] for r in missed})} (models/layers.multi_head_attention's `fused` condition)")
    return rows


# ----------------------------------------------------------------------------- the run


def device_tag(row: dict) -> str:
    kind = (row.get("device_kind") or "").lower()
    if kind in ("cpu", "") or row.get("platform") == "cpu":
        return f"cpu{os.cpu_count()}"
    match = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", kind.replace("nvidia", ""))
    tag = match.group(1) if match else re.sub(r"[^a-z0-9]+", "", kind)[:16]
    return tag if row.get("devices", 1) == 1 else f"{tag}x{row['devices']}"


def child_env(args) -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.mem_fraction))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_child(args, part: str, extra: list[str], env: dict, required: bool = True) -> dict | None:
    """Runs one part in a fresh process (its own GPU memory) and returns the JSON it writes
    (None if an optional part failed)."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        argv = [sys.executable, __file__, *args.argv, "--part", part, "--result", str(result), *extra]
        done = subprocess.run(argv, env=env)
        if done.returncode != 0:
            if required:
                raise SystemExit(f"the {part} part failed (exit {done.returncode})")
            print(f"the {part} part failed (exit {done.returncode}); carrying on without it", flush=True)
            return None
        return json.loads(result.read_text())


def print_table(row: dict) -> None:
    torch_row_ = row.get("torch") if row.get("torch", {}).get("step_time_s") else None
    gib = lambda b: f"{b / GIB:.2f}" if b else "-"
    print(f"{'side':<8}{'batch':>7}{'fastest ms':>12}{'median ms':>11}{'images/s':>10}{'MFU':>7}"
          f"{'peak GiB':>10}{'estimate GiB':>14}")
    mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"
    print(f"{'ours':<8}{row['batch']:>7}{1e3 * row['step_time_s']:>12.1f}{1e3 * row['step_time_median_s']:>11.1f}"
          f"{row['images_per_s']:>10.2f}{mfu:>7}{gib(row.get('peak_bytes_in_use')):>10}"
          f"{gib(row['memory'].get('peak_bytes_estimate')):>14}")
    if torch_row_:
        print(f"{'torch':<8}{torch_row_['batch']:>7}{1e3 * torch_row_['step_time_s']:>12.1f}"
              f"{1e3 * torch_row_['step_time_median_s']:>11.1f}{torch_row_['images_per_s']:>10.2f}{'':>7}"
              f"{gib(torch_row_.get('max_memory_allocated')):>10}")
        line = f"ours/torch: step time {row['ours_over_torch_step_time']:.2f}"
        if row.get("ours_over_torch_memory"):
            line += f", memory {row['ours_over_torch_memory']:.2f}"
        print(line + (" (per image: torch ran a smaller batch)" if torch_row_["batch"] != row["batch"] else ""))
    if row.get("model_flops_per_step"):
        print(f"model FLOPs: {row['model_flops_per_step'] / 1e12:.4g} TFLOPs per step, "
              f"{row['model_tflops_per_image']:.4g} per image; XLA's count of the compiled step "
              f"{(row['xla_flops_per_step'] or 0) / 1e12:.4g}; "
              + (f"peak {row['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device"
                 if row.get("peak_flops_per_device") else "no peak FLOP/s known for this device: MFU omitted"))
    if row.get("fused_attention_calls") is not None and row.get("platform") == "gpu":
        print(f"attention layers {row['attention_layers']}; cuDNN fused attention calls in the compiled step: "
              f"{row['fused_attention_calls'] or 'none'}")


def finish(row: dict, args, platform: str, attention: list) -> Path:
    """Derived figures and notes of a row; merges it into the JSON file, returned."""
    row["platform"] = platform
    row["processes"] = "one" if platform == "cpu" and not args.isolate else "per part"
    row["load"] = os.getloadavg()[0]
    row["jax"] = jax.__version__
    row["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    if attention:
        row["attention_report"] = attention
    if row.get("torch", {}).get("step_time_s"):
        t = row["torch"]
        per_image = lambda r: r["step_time_s"] / r["batch"]
        row["ours_over_torch_step_time"] = (row["step_time_s"] / t["step_time_s"] if t["batch"] == row["batch"]
                                            else per_image(row) / per_image(t))
        if t.get("max_memory_allocated") and row.get("peak_bytes_in_use"):
            row["ours_over_torch_memory"] = row["peak_bytes_in_use"] / t["max_memory_allocated"]
    notes = []
    if row.get("mfu") is None:
        notes.append("MFU omitted: no bf16 peak FLOP/s is known for this device (train.peak_flops)")
    if platform == "cpu" and args.torch and args.dtype == "bfloat16":
        notes.append("torch runs float32 on CPU (autocast bf16 on CUDA only), ours bfloat16")
    if platform == "cpu" and args.torch:
        notes.append("CPU timings move several-fold with other load on the machine, torch's OpenMP threads' "
                     "most; in one process (the CPU default) XLA's spinning threads can slow torch's too, "
                     "--isolate gives each side its own process")
    row["notes"] = notes
    out = Path(args.out_dir) / f"{device_tag(row)}_sd_train_step_{args.size}.json"
    merge_rows(out, row, key=lambda r: (r["dtype"], r["remat"], r["microbatches"], r["batch_mode"],
                                        r.get("processes", "one")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15")
    parser.add_argument("--batch", default="auto", help="per-device batch, or 'auto': the largest that fits")
    parser.add_argument("--batch_start", type=int, default=1, help="--batch auto: the first batch tried")
    parser.add_argument("--max_batch", type=int, default=1024, help="--batch auto: the largest batch tried")
    parser.add_argument("--batch_multiple", type=int, default=8, help="--batch auto: the search's resolution")
    parser.add_argument("--search_budget_s", type=float, default=0.0,
                        help="--batch auto: stop searching after this many seconds (0: no limit)")
    parser.add_argument("--memory_limit_gib", type=float, default=0.0,
                        help="treat a larger compiled estimate as not fitting (default: the device's bytes_limit)")
    parser.add_argument("--remat", choices=REMATS, default="none")
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--torch", action="store_true", help="add the PyTorch (diffusers) reference")
    parser.add_argument("--attention_report", action="store_true", help="cuDNN fused attention per head width (GPU)")
    parser.add_argument("--attention_batch", type=int, default=8)
    parser.add_argument("--mem_fraction", type=float, default=0.95,
                        help="XLA_PYTHON_CLIENT_MEM_FRACTION of the GPU processes, unless set")
    parser.add_argument("--isolate", action="store_true",
                        help="run each part in its own process, as on accelerators (where it is always done)")
    parser.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--part", choices=("ours", "torch", "attention"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--torch_batch", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.argv = [a for a in sys.argv[1:]]
    if args.batch != "auto" and not args.batch.isdigit():
        parser.error("--batch takes a number or 'auto'")
    if args.part:  # one part in its own process: write its JSON and stop
        if args.part == "attention":
            out = {"attention": attention_report(args)}
        elif args.part == "torch":
            out = measure_torch(args, args.torch_batch)
        else:
            out, _ = measure_ours(args, Ours(args.size, args.dtype, args.remat, args.microbatches))
        Path(args.result).write_text(json.dumps(out))
        return

    env = child_env(args)
    cache = tempfile.TemporaryDirectory()  # shared by the parts: a rerun at the found batch compiles nothing
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True,
                           text=True, env=dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false"))
    if probe.returncode != 0:
        raise SystemExit(f"JAX does not start here:\n{probe.stderr}")
    platform = probe.stdout.strip().splitlines()[-1]
    print(f"size {args.size}, dtype {args.dtype}, remat {args.remat}, microbatches {args.microbatches}; JAX "
          f"{jax.__version__} on {platform}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    attention = []
    if platform == "cpu" and not args.isolate:  # one process: ours and torch alternate under the same load
        if args.attention_report:
            attention = attention_report(args)
        torch_side = TorchStep(args.size, args.dtype, "cpu") if args.torch else None
        row, torch_timings = measure_ours(args, Ours(args.size, args.dtype, args.remat, args.microbatches),
                                          torch_side)
        if torch_side is not None:
            row["torch"] = torch_row(torch_side, torch_timings, row["batch"])
    else:  # a process per part: each has the accelerator's memory to itself
        if platform != "cpu":
            env.setdefault("JAX_COMPILATION_CACHE_DIR", cache.name)
        if args.attention_report:
            attention = (run_child(args, "attention", [], env, required=False) or {}).get("attention", [])
        row = run_child(args, "ours", [], env)
        if row.get("peak_includes_failed_attempt"):  # measure the peak again without the failed batch
            print("rerunning at the batch found, for a peak memory free of the out-of-memory attempt", flush=True)
            search = row["search"]
            row = run_child(args, "ours", ["--batch", str(row["per_device_batch"])], env)
            row["search"], row["batch_mode"] = search, "auto"
        if args.torch:
            finish(dict(row, torch={"error": "not measured yet"}), args, platform, attention)  # kept if cut short
            row["torch"] = run_child(args, "torch", ["--torch_batch", str(row["batch"])], env, required=False) or {
                "error": "the torch part failed: see its output above"}
    finish(row, args, platform, attention)
    print_table(row)
    for note in row["notes"]:
        print(f"note: {note}")
    cache.cleanup()


if __name__ == "__main__":
    main()
