"""The stages and their composition: train, pairs, distill, sample, eval, pipeline.

Each stage reads what earlier ones wrote (a stage directory or pair shards) and
nothing else, so any of them can run alone from the CLI, on any mesh.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rectflow_jax import (batch_runner, checkpoint, configlib, evaluate, flow, models, parallel, perceptual, plots,
                          preemption, sampling, sd_folder, storage, teachers, train)
from rectflow_jax.configlib import ConfigError
from rectflow_jax.data import datasets, pairs as pair_io
from rectflow_jax.models import sd_velocity
from rectflow_jax.text_conditioner import TextConditioner

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


def draw_source(dataset, key: jax.Array, n: int) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """x0 ~ pi0 and, for class-conditional data, the condition: labels cycling through the classes."""
    x0 = np.asarray(dataset.sample_source(key, n), np.float32)
    cond = {"label": (np.arange(n) % dataset.num_classes).astype(np.int32)} if dataset.num_classes else None
    return x0, cond


def inference_mesh(config) -> tuple[jax.sharding.Mesh, tuple]:
    """The mesh (config.mesh, as training lays it out, over all processes) and the logical rules
    that pairs, sampling and evaluation run on: a teacher's params are restored into them."""
    return parallel.make_mesh(config.mesh.to_dict()), parallel.logical_rules(config.sharding_rules.to_dict())


def _preview_fn(config, dataset, model, num_steps: int):
    """params -> picture of a few samples, for TensorBoard during training.

    On the training mesh, where the params are already: several processes must all call it.
    """
    apply = train.velocity_apply(model)
    solve = lambda params, x0, cond: sampling.integrate(lambda x, t: apply(params, x, t, cond), x0, num_steps,
                                                        method=config.sample.method).x1
    x0, cond = draw_source(dataset, _stream(config.seed, PREVIEW_STREAM), 64 if len(dataset.shape) > 1 else 1000)
    runner = batch_runner.BatchRunner(solve, len(x0), mesh=inference_mesh(config)[0])

    def preview(params):
        x1 = runner.full(params, x0, cond)
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
    stage_dir = storage.path(stage_dir)
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
    from_folder = teacher_dir is not None and sd_folder.is_pipeline_folder(teacher_dir)
    if init_from_teacher:
        provenance = teachers.teacher_provenance(teacher_dir)
        identity.update(teacher_run_hash=provenance["run_hash"], teacher_step=provenance["step"])
        meta["teacher"] = str(teacher_dir)
    if init_from_teacher and (checkpoint.latest_step(stage_dir) is None):
        if from_folder:  # 2-RF from Stable Diffusion: the teacher's UNet weights, called in our time
            if not isinstance(model, models.SDVelocity):
                raise teachers.IncompatibleTeacher(f"teacher {str(teacher_dir)!r} is a diffusers folder; a stage "
                                                   "initialised from it needs model.name = 'sd_unet'")
            init_params = sd_velocity.load_unet_params(model, teacher_dir)
        else:
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
        identity.update({f"pairs_{k}": info[k] for k in PAIRS_IDENTITY + TEXT_PAIRS_IDENTITY if k in info})
        meta["pairs"] = str(pairs_dir)
        batches = lambda b, seed, start, shard: pair_io.pair_batches(pairs_dir, b, seed, start, shard)

    frozen, extra_losses, null_cond, preview = {}, {}, None, None
    if isinstance(model, models.SDVelocity):
        if model.text_encoder_from_folder:
            folder = stage_config.model.pretrained
            frozen = sd_velocity.load_frozen(model, folder)
            tokenizer = sd_folder.load_tokenizer(folder)
        else:
            tokenizer = stage_tokenizer(stage_dir, dataset, model, teacher_dir if init_from_teacher else None)
        text = TextConditioner(tokenizer, model.text_encoder)
        null_cond = text.null_cond()
        if pairs_dir is None:  # captioned images: prompts tokenised as batches come
            batches = _tokenized(batches, text, dataset)
        if "lpips" in {name for _, name in train.loss_schedule(stage_config)}:
            if not model.text_encoder_from_folder:
                raise ConfigError("flow.loss 'lpips' compares VAE-decoded latents: it needs a model.pretrained "
                                  "Stable Diffusion folder")
            extra_losses["lpips"], loss_params = perceptual.lpips_latent_loss(stage_config, folder)
            frozen.update(loss_params)
    else:
        if dataset.num_classes:
            null_cond = {"label": np.full((1,), dataset.num_classes, np.int32)}
        preview = _preview_fn(stage_config, dataset, model, 1 if kind == "distill" else config.sample.num_steps)
    if kind == "distill":
        objective = "distill"
    elif kind == "rf" and stage_config.flow.get("objective", "rectified_flow") == "diffusion":
        if not isinstance(model, models.SDVelocity):  # only SD-shaped teachers are solved as diffusion ODEs
            raise ConfigError("flow.objective 'diffusion' trains a text-to-image teacher: it needs "
                              f"model.name 'sd_unet', not {stage_config.model.name!r}")
        objective = "diffusion"
    else:
        objective = "flow"
    stage = train.Stage(
        name=name or stage_dir.name, objective=objective, model=model,
        shape=tuple(dataset.shape), num_classes=dataset.num_classes, source_fn=dataset.sample_source,
        batches=batches, init_params=init_params, meta=meta, identity=identity, sample_fn=preview,
        frozen_params=frozen, extra_losses=extra_losses, null_cond=null_cond)
    train.train(stage_config, stage_dir, stage, progress=progress)
    return stage_dir


def stage_tokenizer(stage_dir: str | Path, dataset, model, teacher_dir: str | Path | None):
    """The tokenizer of a text model trained from scratch, kept in its stage (stage_dir/tokenizer).

    A first stage learns a CLIP BPE from its data's training prompts; a stage started from
    a teacher takes the teacher's, which its token ids (and triplets) were made with.
    """
    from rectflow_jax import tokenizer as bpe

    target = storage.path(stage_dir) / "tokenizer"
    if not target.is_dir():
        staging = storage.path(stage_dir) / f".tokenizer.{jax.process_index()}"
        storage.remove_tree(staging)
        if teacher_dir is not None:
            if not (storage.path(teacher_dir) / "tokenizer").is_dir():
                raise teachers.IncompatibleTeacher(f"teacher {str(teacher_dir)!r} keeps no tokenizer/ of its own")
            storage.copy_tree(storage.path(teacher_dir) / "tokenizer", staging)
        else:
            if not hasattr(dataset, "prompt_source"):
                raise ConfigError(f"a text model trained from scratch learns its tokenizer from captioned data; "
                                  f"data {dataset.name!r} has no prompts")
            corpus = dataset.prompt_source().all_prompts
            bpe.build_corpus_tokenizer(corpus, staging, model_max_length=model.text_encoder.max_position_embeddings)
        try:
            staging.rename(target)
        except OSError:  # another process got there first: theirs is the same tokenizer
            storage.remove_tree(staging)
    tokenizer = sd_folder.load_tokenizer(stage_dir)
    if len(tokenizer) > model.text_encoder.vocab_size:
        raise ConfigError(f"the tokenizer in {str(target)!r} has {len(tokenizer)} tokens, more than "
                          f"model.text_encoder.vocab_size={model.text_encoder.vocab_size}; raise it")
    return tokenizer


def _tokenized(batches, text: TextConditioner, dataset):
    """Batches with 'prompt' replaced by its token ids; the training prompts are tokenised once."""
    known = list(dataset.prompt_source().all_prompts) if hasattr(dataset, "prompt_source") else []
    ids_of = dict(zip(known, text.tokenize(known))) if known else {}

    def tokenized(batch_size, seed, start, shard):
        for batch in batches(batch_size, seed, start, shard):
            batch = dict(batch)
            texts = [str(p) for p in batch.pop("prompt")]
            missing = sorted({t for t in texts if t not in ids_of})
            if missing:
                ids_of.update(zip(missing, text.tokenize(missing)))
            batch["input_ids"] = np.stack([ids_of[t] for t in texts])
            yield batch

    return tokenized


def _check_pair_sizes(cfg) -> int:
    if cfg.num_pairs < 1 or cfg.shard_size < 1 or cfg.batch_size < 1:
        raise ConfigError("pairs.num_pairs, pairs.shard_size and pairs.batch_size must be positive")
    return math.ceil(cfg.num_pairs / cfg.shard_size)


def generate_pairs(config, teacher_dir: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Reflow couplings from a teacher's ODE, written as pair shards with pairs.json.

    The teacher is one of our stages (x0 from its own source; `config.pairs` sets the solver)
    or, for text-to-image, a Stable Diffusion folder or an 'sd_unet' stage (triplets; see
    `generate_text_pairs`). Only a finished teacher is a source, and pairs.json names its
    checkpoint (run hash, step) or folder fingerprint; its path is only a note. Shard i is
    deterministic in i, so a rerun skips the finished shards; a directory made by another
    teacher or other settings is refused. Every process runs every shard together over the
    mesh (config.mesh), the teacher's params restored straight into their shardings; each
    shard's owner writes it (pairs.write_pair_shards is collective), and a stop request
    (preemption) ends the run at a shard boundary.
    """
    if teachers.is_sd_teacher(teacher_dir):
        return generate_text_pairs(config, teacher_dir, out_dir, progress=progress)
    dataset = datasets.get_dataset(config.data)
    mesh, rules = inference_mesh(config)
    teacher = teachers.load_velocity_teacher(teacher_dir, expected_shape=dataset.shape,
                                             expected_num_classes=dataset.num_classes,
                                             expected_source=dataset.source_spec, finished=True, mesh=mesh,
                                             rules=rules)
    provenance = teachers.finished_provenance(teacher_dir, teacher.meta, teacher.step)
    source = teacher.dataset  # pi0 as the teacher learnt it
    cfg = config.pairs
    num_shards = _check_pair_sizes(cfg)
    sampling.check_method(cfg.method)
    runner = batch_runner.BatchRunner(
        lambda params, x0, cond: sampling.integrate(lambda x, t: teacher.apply_velocity(params, x, t, cond), x0,
                                                    cfg.num_steps, method=cfg.method).x1, cfg.batch_size, mesh=mesh)
    params = runner.place(teacher.params)  # restored into its shardings: kept as it is

    def make_shard(index: int) -> dict[str, np.ndarray]:
        # Every process draws the whole shard's inputs alike, solves its block of rows, gets all of x1.
        size = min(cfg.shard_size, cfg.num_pairs - index * cfg.shard_size)
        key = pair_key(config.seed, provenance, index)
        shard = {"x0": np.asarray(source.sample_source(key, size), np.float32)}
        if dataset.num_classes:
            shard["label"] = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (size,), 0,
                                                           dataset.num_classes), np.int32)
        shard["x1"] = runner.full(params, shard["x0"], models.condition(shard)).astype(np.float32)
        return shard

    meta = {"teacher_run_hash": provenance["run_hash"],
            "teacher_step": provenance["step"], "source": source.source_spec, "shape": list(dataset.shape),
            "num_classes": dataset.num_classes, "num_pairs": cfg.num_pairs, "shard_size": cfg.shard_size,
            "num_steps": cfg.num_steps, "method": cfg.method, "seed": config.seed}
    pair_io.write_pair_shards(out_dir, make_shard, num_shards, meta, notes={"teacher": str(teacher_dir)},
                              progress=progress, stop_requested=preemption.requested)
    return storage.path(out_dir)


# The pairs.json entries of text triplets beyond PAIRS_IDENTITY that define them.
TEXT_PAIRS_IDENTITY = ("guidance_scale", "negative_prompt", "prompts", "noise_seed", "parametrisation")


def text_pair_settings(config, teacher_dir: str | Path):
    """The solver settings for triplets: config.teacher for the first teacher (a pretrained folder or a
    diffusion model of ours), config.pairs for our reflowed stages (2-RF making the student's pairs)."""
    first = sd_folder.is_pipeline_folder(teacher_dir) or teachers.stage_parametrisation(teacher_dir) != "velocity"
    return config.teacher if first else config.pairs


def generate_text_pairs(config, teacher_dir: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """(text, noise, latent) triplets from an SD teacher: the reflow pairs of InstaFlow.

    Example k uses prompt k % P of `data.prompts` and the noise
    x0 = noise_from_seeds(noise_seed, k), stored as (noise_seed, noise_index) and
    regenerated bit for bit by training; x1 is the teacher's final latent in float16, as
    its pipeline would make it (`SDTeacher.solve`, with guidance above 1); the token ids
    and the prompt are stored beside. The VAE is never run. Settings: `config.teacher`
    (method, num_steps, guidance_scale, negative_prompt, dtype) for a pretrained folder,
    `config.pairs` for an 'sd_unet' stage (2-RF making the distillation pairs). As in
    `generate_pairs`, every process runs every shard together over config.mesh, the
    teacher loaded straight into its shardings by the logical rules (sharded over 'fsdp'
    and 'tensor' axes: a teacher larger than one device).
    """
    dataset = datasets.get_dataset(config.data)
    settings = text_pair_settings(config, teacher_dir)
    cfg = config.pairs
    num_shards = _check_pair_sizes(cfg)
    sampling.check_method(settings.method)
    mesh, rules = inference_mesh(config)
    teacher = teachers.load_sd_teacher(teacher_dir, dtype=settings.get("dtype", "float32"),
                                       prediction_type=config.sample.prediction_type, finished=True,
                                       clip_skip=settings.get("clip_skip"), mesh=mesh, rules=rules)
    if tuple(teacher.latent_shape) != tuple(dataset.shape):
        raise teachers.IncompatibleTeacher(f"teacher {str(teacher_dir)!r} makes latents of shape "
                                           f"{teacher.latent_shape}, but data.latent_shape is {tuple(dataset.shape)}")
    teacher.time_grid(settings.method, settings.num_steps)  # a bad scheduler or step count fails before any work
    prompt_source = dataset.prompt_source()
    provenance = teacher.provenance
    noise_seed = int(checkpoint.json_hash({"seed": config.seed, "teacher": provenance})[:8], 16)
    scale, guided = float(settings.guidance_scale), sampling.guidance_applies(settings.guidance_scale)
    shape = tuple(dataset.shape)

    def solve(consts, indices, ids):
        x0 = sampling.noise_from_seeds(jnp.full(indices.shape, noise_seed, jnp.uint32), indices, shape)
        return teacher.solve(consts["params"], x0, ids, consts["negative"], consts["scale"], method=settings.method,
                             num_steps=settings.num_steps, guided=guided)

    runner = batch_runner.BatchRunner(solve, cfg.batch_size, mesh=mesh)
    consts = runner.place({"params": teacher.params, "negative": teacher.text.negative_ids(settings.negative_prompt),
                           "scale": np.float32(scale)})
    made = {"examples": 0, "seconds": 0.0}

    def make_shard(index: int) -> dict[str, np.ndarray]:
        indices = np.arange(index * cfg.shard_size, min((index + 1) * cfg.shard_size, cfg.num_pairs), dtype=np.uint32)
        texts = prompt_source.prompts(indices)
        ids = teacher.text.tokenize(texts)
        start = time.perf_counter()
        x1 = runner.full(consts, indices, ids)  # every process: its block of rows solved, all of x1 back
        made["seconds"] += time.perf_counter() - start
        made["examples"] += len(indices)
        log.info("pairs shard %d: %d triplets at %.2f images/s", index, len(indices),
                 made["examples"] / max(made["seconds"], 1e-9))
        return {"x1": x1.astype(np.float16), "input_ids": ids, "prompt": np.asarray(texts, dtype=str),
                "noise_seed": np.full(len(indices), noise_seed, np.uint32), "noise_index": indices}

    meta = {"teacher_run_hash": provenance["run_hash"], "teacher_step": provenance["step"],
            "source": dataset.source_spec, "shape": list(shape), "num_classes": 0, "num_pairs": cfg.num_pairs,
            "shard_size": cfg.shard_size, "num_steps": settings.num_steps, "method": settings.method,
            "seed": config.seed, "guidance_scale": scale if guided else 1.0,
            "negative_prompt": settings.negative_prompt if guided else None, "prompts": prompt_source.spec,
            "noise_seed": noise_seed, "parametrisation": teacher.parametrisation}
    pair_io.write_pair_shards(out_dir, make_shard, num_shards, meta,
                              notes={"teacher": str(teacher_dir), "prompts_origin": prompt_source.origin},
                              progress=progress, stop_requested=preemption.requested)
    if made["examples"]:
        log.info("pairs -> %s: %d triplets at %.2f images/s", out_dir, made["examples"],
                 made["examples"] / max(made["seconds"], 1e-9))
    return storage.path(out_dir)


def sample(config, checkpoint_dir: str | Path, out_dir: str | Path) -> dict[str, np.ndarray]:
    """Writes out/samples.npz (x0, x1[, label]) and a picture; same seed, same x0.

    Every process runs it alike over config.mesh (each solves its block of the rows) and
    returns the whole result; process 0 alone writes the files.
    """
    dataset = datasets.get_dataset(config.data)
    mesh, rules = inference_mesh(config)
    teacher = teachers.load_velocity_teacher(checkpoint_dir, expected_shape=dataset.shape,
                                             expected_num_classes=dataset.num_classes,
                                             expected_source=dataset.source_spec, mesh=mesh, rules=rules)
    cfg = config.sample
    x0, cond = draw_source(dataset, _stream(config.seed, SAMPLE_STREAM), cfg.num_samples)
    drawn = len(dataset.shape) == 1  # 2-D data: the trajectories are the picture

    def solve(params, x0, cond):
        sol = sampling.integrate(lambda x, t: teacher.apply_velocity(params, x, t, cond), x0, cfg.num_steps,
                                 method=cfg.method, return_trajectory=drawn)
        return sol.x1, (jnp.swapaxes(sol.trajectory, 0, 1) if drawn else None)  # the runner's rows come first

    x1, paths = batch_runner.BatchRunner(solve, cfg.batch_size, mesh=mesh).full(teacher.params, x0, cond)
    result = {"x0": x0, "x1": np.asarray(x1, np.float32), **(cond or {})}
    if len(dataset.shape) == 3:
        result["x1"] = np.clip(result["x1"], -1.0, 1.0)
    if jax.process_index() != 0:
        return result
    out = storage.path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(dataset.shape) == 3:
        plots.save_png(plots.image_grid(result["x1"][:256], upscale=max(1, 32 // dataset.shape[0])), out / "grid.png")
    else:
        title = f"{storage.path(checkpoint_dir).name}: {cfg.num_steps} {cfg.method} steps"
        plots.save_png(plots.trajectory_figure(np.swapaxes(paths, 0, 1), dataset.reference(2000)["x1"],
                                               title=title), out / "trajectories.png")
    storage.save_npz(out / "samples.npz", result)
    return result


def evaluate_stage(config, checkpoint_dir: str | Path) -> dict[str, Any]:
    """Metrics of a stage at config.eval.steps Euler steps, from x0 fixed by the seed.

    Every process runs it alike over config.mesh and gets the same metrics; it writes nothing.
    """
    dataset = datasets.get_dataset(config.data)
    mesh, rules = inference_mesh(config)
    teacher = teachers.load_velocity_teacher(checkpoint_dir, expected_shape=dataset.shape,
                                             expected_num_classes=dataset.num_classes,
                                             expected_source=dataset.source_spec, mesh=mesh, rules=rules)
    x0, cond = draw_source(dataset, _stream(config.seed, EVAL_STREAM), config.eval.num_samples)
    return evaluate.evaluate_velocity(teacher.apply_velocity, teacher.params, dataset, x0, cond,
                                      steps=tuple(config.eval.steps), batch_size=config.sample.batch_size, mesh=mesh)


def run_pipeline(config, workdir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """1-RF -> pairs -> 2-RF -> pairs -> distill, then the report. Reruns resume.

    Text-to-image configs (prompt data: 'prompts', 'digits_text') run InstaFlow's recipe
    instead (`run_text_pipeline`).
    """
    if hasattr(datasets.get_dataset(config.data), "prompt_source"):
        return run_text_pipeline(config, workdir, progress=progress)
    work = storage.path(workdir)
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
    """workdir/report: report.md (metrics table and claims), metrics.json, pictures.

    Every process evaluates alike and returns the report; process 0 alone draws and writes it.
    """
    work = storage.path(workdir)
    out = work / "report"
    writes = jax.process_index() == 0
    if writes:
        out.mkdir(parents=True, exist_ok=True)
    dataset = datasets.get_dataset(config.data)
    metric = evaluate.primary_metric(dataset)
    results, pictures = {}, []
    if writes and len(dataset.shape) == 3:
        real = dataset.reference(min(100, config.eval.num_samples), seed=1)["x1"]
        plots.save_png(plots.image_grid(real, ncols=10, upscale=max(1, 48 // dataset.shape[0])), out / "data.png")
        pictures.append(("real data", "data.png"))
    for label, name in REPORT_STAGES:
        evaluation = evaluate_stage(config, work / name)
        outputs, paths = evaluation.pop("outputs"), evaluation.pop("trajectory")
        results[name] = evaluation
        if not writes:
            continue
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
    if writes:
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


# ----------------------------------------------------------------------------- text to image


def run_text_pipeline(config, workdir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """InstaFlow, from the folder in config.teacher.pretrained or a teacher trained here; then the report.

    Captioned images (data 'digits_text') first train the diffusion teacher W/teacher
    (flow.objective 'diffusion'). From a diffusion teacher (that one, or Stable Diffusion):
    triplets W/pairs_teacher -> 2-RF W/2rf (from the teacher's UNet) -> pairs with CFG
    W/pairs_2rf -> one-step distillation W/distill. A velocity folder (a 2-RF release) is
    straight already: W/pairs_teacher -> W/distill. Reruns resume.
    """
    work = storage.path(workdir)
    teacher = config.teacher.get("pretrained")
    trains_teacher = not teacher
    plan = []
    if trains_teacher:
        if not hasattr(datasets.get_dataset(config.data), "prompt_table"):
            raise ConfigError("a text-to-image pipeline starts from a Stable Diffusion or 2-RF folder: set "
                              "--config.teacher.pretrained=FOLDER (or train one on captioned images, data "
                              "'digits_text')")
        if config.flow.get("objective") != "diffusion":
            raise ConfigError("the teacher trained on captioned images is a diffusion model: set "
                              "flow.objective='diffusion'")
        teacher = work / "teacher"
        plan.append(("teacher", lambda: train_stage(config, teacher, "rf", progress=progress)))
    work.mkdir(parents=True, exist_ok=True)
    plan.append(("pairs_teacher", lambda: generate_pairs(config, teacher, work / "pairs_teacher", progress=progress)))
    if trains_teacher or _needs_reflow(config, teacher):
        plan += [
            ("2rf", lambda: train_stage(config, work / "2rf", "reflow", pairs_dir=work / "pairs_teacher",
                                        teacher_dir=teacher, progress=progress)),
            ("pairs_2rf", lambda: generate_pairs(config, work / "2rf", work / "pairs_2rf", progress=progress)),
            ("distill", lambda: train_stage(config, work / "distill", "distill", pairs_dir=work / "pairs_2rf",
                                            teacher_dir=work / "2rf", progress=progress))]
    else:
        plan.append(("distill", lambda: train_stage(config, work / "distill", "distill",
                                                    pairs_dir=work / "pairs_teacher", teacher_dir=teacher,
                                                    progress=progress)))
    for name, run in plan:
        log.info("stage %s", name)
        run()
    from rectflow_jax import text_report  # its imports (transformers, the classifier) are only needed here

    if trains_teacher:
        return text_report.write_digits_text_report(config, work)
    return text_report.write_text_report(config, work, reflow=_needs_reflow(config, teacher))


def _needs_reflow(config, folder: str | Path) -> bool:
    """Whether a pretrained folder is a diffusion model (reflow it first) rather than a velocity one."""
    index = sd_folder.read_model_index(folder)
    kind = sd_folder.parametrisation(folder, index, sd_folder.read_scheduler_config(folder),
                                     config.sample.prediction_type)
    return kind != "velocity"
