"""The stages and their composition: train, pairs, distill, sample, eval, pipeline.

Each stage reads what earlier ones wrote (a stage directory or pair shards) and
nothing else, so any of them can run alone from the CLI, on any mesh.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rectflow_jax import checkpoint, configlib, evaluate, flow, models, plots, sampling, teachers, train
from rectflow_jax.configlib import ConfigError
from rectflow_jax.data import datasets, pairs as pair_io

log = logging.getLogger("rectflow")

# Independent random streams, all derived from config.seed.
SAMPLE_STREAM, PAIRS_STREAM, EVAL_STREAM, PREVIEW_STREAM = 0, 1, 2, 3
STAGES = ("1rf", "pairs_1rf", "2rf", "pairs_2rf", "distill")


def _stream(seed: int, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), stream)


def pair_key(seed: int, teacher: dict, shard_index: int) -> jax.Array:
    """The key of one pair shard: each teacher checkpoint ({'run_hash', 'step'}) draws its own x0."""
    teacher_stream = int(checkpoint.json_hash(teacher)[:8], 16)
    return jax.random.fold_in(jax.random.fold_in(_stream(seed, PAIRS_STREAM), teacher_stream), shard_index)


def draw_source(dataset, key: jax.Array, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """x0 ~ pi0 and, for class-conditional data, labels cycling through the classes."""
    x0 = np.asarray(dataset.sample_source(key, n), np.float32)
    labels = (np.arange(n) % dataset.num_classes).astype(np.int32) if dataset.num_classes else None
    return x0, labels


def _preview_fn(config, dataset, model, num_steps: int):
    """params -> picture of a few samples, for TensorBoard during training."""
    apply = train.velocity_apply(model)
    sampler = sampling.make_sampler(apply, num_steps, method=config.sample.method)
    x0, labels = draw_source(dataset, _stream(config.seed, PREVIEW_STREAM), 64 if len(dataset.shape) > 1 else 1000)

    def preview(params):
        x1 = np.asarray(sampler(params, jnp.asarray(x0), None if labels is None else jnp.asarray(labels)).x1)
        if len(dataset.shape) == 1:
            return plots.scatter_figure(x1, dataset.reference(1000)["x1"], title=f"{num_steps}-step samples")
        return plots.image_grid(x1, upscale=max(1, 64 // dataset.shape[0]))

    return preview


# The pairs.json entries that define a coupling (its path does not), part of a student's identity.
PAIRS_IDENTITY = ("teacher_run_hash", "teacher_step", "source", "num_pairs", "num_steps", "method", "seed")


def _check_pairs_fit(pairs_dir: str | Path, dataset) -> dict[str, Any]:
    """The pairs' metadata, after checking they were made for this data by a traceable teacher."""
    info = pair_io.inspect_pairs(pairs_dir)
    if tuple(info["shape"]) != tuple(dataset.shape):
        raise pair_io.PairDataError(f"pairs in {str(pairs_dir)!r} have shape {tuple(info['shape'])}, "
                                    f"the data of this config {tuple(dataset.shape)}")
    missing = [k for k in PAIRS_IDENTITY if k not in info]
    if missing:
        raise pair_io.PairDataError(f"pairs in {str(pairs_dir)!r} were made by an older rectflow_jax (pairs.json "
                                    f"lacks {', '.join(missing)}); make them again with `rectflow pairs`")
    if info["source"] != dataset.source_spec:
        raise pair_io.PairDataError(f"pairs in {str(pairs_dir)!r} start from the source {info['source']!r}, "
                                    f"this config's data from {dataset.source_spec!r}")
    return info


def train_stage(config, stage_dir: str | Path, kind: str, *, name: str | None = None,
                pairs_dir: str | Path | None = None, teacher_dir: str | Path | None = None,
                progress: bool = True) -> Path:
    """Trains one stage: kind 'rf' (from data), 'reflow' (from pairs) or 'distill' (from pairs)."""
    stage_config = configlib.stage_config(config, kind)
    stage_dir = Path(stage_dir)
    dataset = datasets.get_dataset(stage_config.data)
    if kind != "rf" and pairs_dir is None:
        raise ConfigError(f"a {kind} stage trains on pairs: give --pairs DIR (made by `rectflow pairs`)")
    init_from_teacher = kind == "distill" or (kind == "reflow" and config.stages.reflow.init == "teacher")
    if init_from_teacher and teacher_dir is None:
        raise ConfigError(f"a {kind} stage starts from its teacher's parameters: give --checkpoint TEACHER_DIR")

    # What the stage is made from beyond its config: a resume over other inputs is refused.
    identity: dict[str, Any] = {"kind": kind}
    if kind == "reflow":
        identity["init"] = config.stages.reflow.init
    model = models.build_velocity_model(stage_config.model, dataset.shape, dataset.num_classes)
    init_params, meta = None, {"kind": kind}
    if init_from_teacher:
        provenance = teachers.finished_provenance(teacher_dir)
        identity.update(teacher_run_hash=provenance["run_hash"], teacher_step=provenance["step"])
        meta["teacher"] = str(teacher_dir)
    if init_from_teacher and (checkpoint.latest_step(stage_dir) is None):
        teacher = teachers.load_velocity_teacher(teacher_dir, expected_shape=dataset.shape,
                                                 expected_num_classes=dataset.num_classes,
                                                 expected_source=dataset.source_spec, finished=True)
        if teacher.meta["model"] != checkpoint.jsonable(stage_config.model.to_dict()):
            raise teachers.IncompatibleTeacher(
                f"teacher {str(teacher_dir)!r} has another model config than this stage; "
                "the student starts from its parameters, so they must agree")
        init_params = teacher.params

    if pairs_dir is None:
        batches = dataset.batches
    else:
        info = _check_pairs_fit(pairs_dir, dataset)
        identity.update({f"pairs_{k}": info[k] for k in PAIRS_IDENTITY})
        meta["pairs"] = str(pairs_dir)
        batches = lambda b, seed, start, shard: pair_io.pair_batches(pairs_dir, b, seed, start, shard)

    stage = train.Stage(
        name=name or stage_dir.name, objective="distill" if kind == "distill" else "flow", model=model,
        shape=tuple(dataset.shape), num_classes=dataset.num_classes, source_fn=dataset.sample_source,
        batches=batches, init_params=init_params, meta=meta, identity=identity,
        sample_fn=_preview_fn(stage_config, dataset, model, 1 if kind == "distill" else config.sample.num_steps))
    train.train(stage_config, stage_dir, stage, progress=progress)
    return stage_dir


def generate_pairs(config, teacher_dir: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Integrates the teacher's ODE from fresh x0 and writes (x0, x1[, label]) shards.

    x0 comes from the source the teacher was trained on (the config's must be the same).
    Shard i draws from `pair_key(seed, teacher checkpoint, i)`: deterministic, so a rerun
    skips the finished shards, and another teacher draws other x0. Only a finished teacher
    is a source, and pairs.json names its checkpoint (run hash, step; its path is only a
    note): a directory made by another checkpoint is refused. Processes split the shards.
    """
    dataset = datasets.get_dataset(config.data)
    teacher = teachers.load_velocity_teacher(teacher_dir, expected_shape=dataset.shape,
                                             expected_num_classes=dataset.num_classes,
                                             expected_source=dataset.source_spec, finished=True)
    provenance = teachers.finished_provenance(teacher_dir, teacher.meta, teacher.step)
    source = teacher.dataset  # pi0 as the teacher learnt it
    cfg = config.pairs
    if cfg.num_pairs < 1 or cfg.shard_size < 1 or cfg.batch_size < 1:
        raise ConfigError("pairs.num_pairs, pairs.shard_size and pairs.batch_size must be positive")
    num_shards = math.ceil(cfg.num_pairs / cfg.shard_size)
    sampler = sampling.make_sampler(teacher.apply_velocity, cfg.num_steps, method=cfg.method)
    local = Mesh(np.asarray(jax.local_devices()), ("data",))
    rows = NamedSharding(local, P("data"))
    chunk = cfg.batch_size - cfg.batch_size % len(jax.local_devices()) or len(jax.local_devices())

    def make_shard(index: int) -> dict[str, np.ndarray]:
        size = min(cfg.shard_size, cfg.num_pairs - index * cfg.shard_size)
        key = pair_key(config.seed, provenance, index)
        x0, labels = source.sample_source(key, size), None
        if dataset.num_classes:
            labels = jax.random.randint(jax.random.fold_in(key, 1), (size,), 0, dataset.num_classes)
        outputs = []
        for start in range(0, size, chunk):
            stop = min(start + chunk, size)
            pad = (-(stop - start)) % len(jax.local_devices())  # equal rows per device
            x = jax.device_put(jnp.pad(x0[start:stop], [(0, pad)] + [(0, 0)] * len(dataset.shape)), rows)
            y = None if labels is None else jax.device_put(jnp.pad(labels[start:stop], (0, pad)), rows)
            outputs.append(np.asarray(sampler(teacher.params, x, y).x1)[: stop - start])
        shard = {"x0": np.asarray(x0, np.float32), "x1": np.concatenate(outputs).astype(np.float32)}
        if labels is not None:
            shard["label"] = np.asarray(labels, np.int32)
        return shard

    meta = {"teacher_run_hash": provenance["run_hash"],
            "teacher_step": provenance["step"], "source": source.source_spec, "shape": list(dataset.shape),
            "num_classes": dataset.num_classes, "num_pairs": cfg.num_pairs, "shard_size": cfg.shard_size,
            "num_steps": cfg.num_steps, "method": cfg.method, "seed": config.seed}
    mine = range(jax.process_index(), num_shards, jax.process_count())
    pair_io.write_pair_shards(out_dir, make_shard, num_shards, meta, shard_indices=mine,
                              notes={"teacher": str(teacher_dir)}, progress=progress)
    return Path(out_dir)


def sample(config, checkpoint_dir: str | Path, out_dir: str | Path) -> dict[str, np.ndarray]:
    """Writes out/samples.npz (x0, x1[, label]) and a picture; same seed, same x0."""
    dataset = datasets.get_dataset(config.data)
    teacher = teachers.load_velocity_teacher(checkpoint_dir, expected_shape=dataset.shape,
                                             expected_num_classes=dataset.num_classes,
                                             expected_source=dataset.source_spec)
    cfg = config.sample
    x0, labels = draw_source(dataset, _stream(config.seed, SAMPLE_STREAM), cfg.num_samples)
    sampler = sampling.make_sampler(teacher.apply_velocity, cfg.num_steps, method=cfg.method,
                                    return_trajectory=len(dataset.shape) == 1)
    x1, paths = [], []
    for start in range(0, cfg.num_samples, cfg.batch_size):
        sl = slice(start, start + cfg.batch_size)
        sol = sampler(teacher.params, jnp.asarray(x0[sl]), None if labels is None else jnp.asarray(labels[sl]))
        x1.append(np.asarray(sol.x1, np.float32))
        if sol.trajectory is not None:
            paths.append(np.asarray(sol.trajectory))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"x0": x0, "x1": np.concatenate(x1)}
    if labels is not None:
        result["label"] = labels
    if len(dataset.shape) == 3:
        result["x1"] = np.clip(result["x1"], -1.0, 1.0)
        plots.save_png(plots.image_grid(result["x1"][:256], upscale=max(1, 32 // dataset.shape[0])), out / "grid.png")
    else:
        title = f"{Path(checkpoint_dir).name}: {cfg.num_steps} {cfg.method} steps"
        plots.save_png(plots.trajectory_figure(np.concatenate(paths, axis=1), dataset.reference(2000)["x1"],
                                               title=title), out / "trajectories.png")
    np.savez(out / "samples.npz", **result)
    return result


def evaluate_stage(config, checkpoint_dir: str | Path) -> dict[str, Any]:
    """Metrics of a stage at config.eval.steps Euler steps, from x0 fixed by the seed."""
    dataset = datasets.get_dataset(config.data)
    teacher = teachers.load_velocity_teacher(checkpoint_dir, expected_shape=dataset.shape,
                                             expected_num_classes=dataset.num_classes,
                                             expected_source=dataset.source_spec)
    x0, labels = draw_source(dataset, _stream(config.seed, EVAL_STREAM), config.eval.num_samples)
    return evaluate.evaluate_velocity(teacher.apply_velocity, teacher.params, dataset, x0, labels,
                                      steps=tuple(config.eval.steps), batch_size=config.sample.batch_size)


def run_pipeline(config, workdir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """1-RF -> pairs -> 2-RF -> pairs -> distill, then the report. Reruns resume."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    plan = [
        ("1rf", lambda: train_stage(config, work / "1rf", "rf", progress=progress)),
        ("pairs_1rf", lambda: generate_pairs(config, work / "1rf", work / "pairs_1rf", progress=progress)),
        ("2rf", lambda: train_stage(config, work / "2rf", "reflow", pairs_dir=work / "pairs_1rf",
                                    teacher_dir=work / "1rf", progress=progress)),
        ("pairs_2rf", lambda: generate_pairs(config, work / "2rf", work / "pairs_2rf", progress=progress)),
        ("distill", lambda: train_stage(config, work / "distill", "distill", pairs_dir=work / "pairs_2rf",
                                        teacher_dir=work / "2rf", progress=progress)),
    ]
    for name, run in plan:
        # A finished stage returns at once, once it has checked that its inputs (teacher
        # checkpoint, pairs) are those it was made from; finished pair shards are kept.
        log.info("stage %s", name)
        run()
    return write_report(config, work)


REPORT_STAGES = (("1-RF", "1rf"), ("2-RF", "2rf"), ("distilled", "distill"))


def write_report(config, workdir: str | Path) -> dict[str, Any]:
    """workdir/report: report.md (metrics table and claims), metrics.json, pictures."""
    work = Path(workdir)
    out = work / "report"
    out.mkdir(parents=True, exist_ok=True)
    dataset = datasets.get_dataset(config.data)
    metric = evaluate.primary_metric(dataset)
    results, pictures = {}, []
    if len(dataset.shape) == 3:
        real = dataset.reference(min(100, config.eval.num_samples), seed=1)["x1"]
        plots.save_png(plots.image_grid(real, ncols=10, upscale=max(1, 48 // dataset.shape[0])), out / "data.png")
        pictures.append(("real data", "data.png"))
    for label, name in REPORT_STAGES:
        evaluation = evaluate_stage(config, work / name)
        outputs, paths = evaluation.pop("outputs"), evaluation.pop("trajectory")
        results[name] = evaluation
        for steps in (min(outputs), max(outputs)):
            file = f"{name}_{steps}step.png"
            if len(dataset.shape) == 3:
                grid = plots.image_grid(np.clip(outputs[steps][:100], -1, 1), ncols=10,
                                        upscale=max(1, 48 // dataset.shape[0]))
            else:
                grid = plots.scatter_figure(outputs[steps], dataset.reference(2000)["x1"],
                                            title=f"{label}, {steps} Euler step{'s' * (steps > 1)}")
            plots.save_png(grid, out / file)
            pictures.append((f"{label}, {steps} step{'s' * (steps > 1)}", file))
        if len(dataset.shape) == 1:
            file = f"{name}_trajectories.png"
            plots.save_png(plots.trajectory_figure(paths, dataset.reference(2000)["x1"],
                                                   title=f"{label} trajectories ({max(outputs)} steps)"), out / file)
            pictures.append((f"{label} trajectories", file))
    # The independent coupling's cost, the baseline rectification must not exceed.
    x0, _ = draw_source(dataset, _stream(config.seed, EVAL_STREAM), config.eval.num_samples)
    independent = float(flow.transport_cost(jnp.asarray(x0), jnp.asarray(
        dataset.reference(config.eval.num_samples, seed=1)["x1"])))
    claims = dict(_claims(results, metric), independent_coupling_transport_cost=independent)
    real = evaluate.real_data_metrics(dataset)
    report = {"metric": metric, "stages": results, "claims": claims, "real_data": real}
    checkpoint.write_json(out / "metrics.json", report)
    (out / "report.md").write_text(_report_markdown(config, results, metric, claims, pictures, real))
    return report


def _claims(results: dict, metric: str) -> dict[str, float]:
    """The ratios the Rectified Flow papers claim, from this run's numbers."""
    one = lambda name: results[name]["steps"]["1"]
    finest = lambda name: results[name]["steps"][max(results[name]["steps"], key=int)]
    ratio = lambda a, b: float(a / b) if b else float("inf")
    return {
        f"2rf_1step_{metric}_over_1rf": ratio(one("2rf")[metric], one("1rf")[metric]),
        "1rf_gap_over_2rf_gap": ratio(one("1rf")["gap_to_finest"], one("2rf")["gap_to_finest"]),
        "2rf_transport_cost_over_1rf": ratio(finest("2rf")["transport_cost"], finest("1rf")["transport_cost"]),
        f"distill_1step_{metric}_over_1rf_finest": ratio(one("distill")[metric], finest("1rf")[metric]),
        f"distill_1step_{metric}_over_1rf_1step": ratio(one("distill")[metric], one("1rf")[metric]),
    }


def _report_markdown(config, results, metric, claims, pictures, real: dict[str, float] | None = None) -> str:
    real = real or {}
    extra = [k for k in ("confidence", "class_coverage", "background_level") if k in results["1rf"]["steps"]["1"]]
    header = ["stage", "Euler steps", metric, *extra, "transport cost", "gap to finest", "straightness"]
    lines = [f"# rectflow report: {config.data.name}", "",
             "Each stage sampled from the same x0 (seed "
             f"{config.seed}, {config.eval.num_samples} samples). Straightness E∫‖(X1−X0)−v(X_t,t)‖²dt is "
             "measured along the finest trajectory; the gap is E‖x1(N steps) − x1(finest)‖².", ""]
    if "background_level" in extra:
        lines += ["Background level: the mean grey level (0–16) of the samples, clipped to [-1, 1], in the "
                  f"pixels blank in ≥ {evaluate.BLANK_SHARE:.0%} of the real images; the real data's own value "
                  "is the first row.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if real:
        cells = ["real data", "–", "–", *(f"{real[k]:.3f}" if k in real else "–" for k in extra), "–", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    for label, name in REPORT_STAGES:
        for steps, row in sorted(results[name]["steps"].items(), key=lambda kv: int(kv[0])):
            cells = [label, steps, f"{row[metric]:.4g}", *(f"{row[k]:.3f}" for k in extra),
                     f"{row['transport_cost']:.4g}", f"{row['gap_to_finest']:.4g}",
                     f"{results[name]['straightness']:.4g}"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Claims", "", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in claims.items()]
    lines += ["", "## Samples", ""] + [f"**{title}**\n\n![{title}]({file})\n" for title, file in pictures]
    return "\n".join(lines) + "\n"
