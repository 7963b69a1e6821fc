"""One training loop for every stage: 1-RF from data, k-RF from pairs, distillation.

A stage differs only in its batches (data or pair shards), its initial parameters
(fresh or a teacher's) and its objective: 'flow' regresses v(X_t, t) on X1 - X0 at
sampled t; 'distill' trains the one-step map x0 + v(x0, 0) onto x1; 'diffusion' trains a
noise (or v-, or sample-) prediction on a diffusers noise schedule, as Stable Diffusion
was trained: the model sees x_tau at our time 1 - tau / 1000 (rectflow_jax.diffusion).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from rectflow_jax import checkpoint, configlib, diffusion, flow, models, parallel, sampling

OBJECTIVES = ("flow", "distill", "diffusion")
SCHEDULES = ("constant", "cosine")                  # optim.schedule, after the linear warm-up
EMA_WARMUPS = ("ramp", "bias_correction", "none")   # optim.ema_warmup, see configlib.base_config


class TrainingDiverged(RuntimeError):
    """The loss or the updated state became NaN or infinite; the last good checkpoint is kept."""


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def learning_rate_schedule(optim, num_steps: int) -> optax.Schedule:
    """Linear warm-up to optim.lr, then constant or a cosine decay to 0.

    The cosine decays over optim.decay_steps, or, when that is 0, over the rest of
    the stage (num_steps - warmup_steps), so the rate reaches 0 at the last step.
    """
    warmup_steps = int(optim.warmup_steps)
    warmup = optax.linear_schedule(0.0, optim.lr, max(warmup_steps, 1))
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        decay_steps = int(optim.decay_steps) or int(num_steps) - warmup_steps
        if decay_steps < 1:
            raise configlib.ConfigError(f"a cosine schedule needs steps after its warm-up: train.num_steps={num_steps}, "
                             f"optim.warmup_steps={warmup_steps}, optim.decay_steps={optim.decay_steps}")
        after = optax.cosine_decay_schedule(optim.lr, decay_steps)
    else:
        raise configlib.ConfigError(f"optim.schedule={optim.schedule!r} is not one of {list(SCHEDULES)}")
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(optim, num_steps: int) -> optax.GradientTransformation:
    """AdamW behind global-norm clipping, at learning_rate_schedule(optim, num_steps)."""
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip else optax.identity(),
        optax.adamw(learning_rate_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay),
    )


def ema_decay_schedule(decay: float, warmup: str) -> Callable[[jax.Array], jax.Array]:
    """update index t (0 for the first update) -> the decay of that EMA update.

    The EMA starts from the initial params (or a teacher's); a fixed decay ('none')
    leaves them decay^t of the weight after t updates, 37% after 1000 steps at 0.999.
    'ramp' shortens the average early on; 'bias_correction' keeps the EMA equal to
    Adam's corrected average of the params from zero, m_t / (1 - decay^(t+1)), in
    which the initial params have no weight: its decay is (d - d^(t+1)) / (1 - d^(t+1)).
    """
    if warmup == "ramp":
        return lambda t: jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    if warmup == "bias_correction":
        return lambda t: (decay - decay ** (t + 1.0)) / (1.0 - decay ** (t + 1.0))
    if warmup == "none":
        return lambda t: jnp.asarray(decay, jnp.float32)
    raise configlib.ConfigError(f"optim.ema_warmup={warmup!r} is not one of {list(EMA_WARMUPS)}")


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def velocity_apply(model: nn.Module) -> Callable:
    """(params, x, t, cond) -> v for samplers: the model in inference mode.

    `params` is the whole tree the model reads: a stage's (EMA) params with any frozen
    parts (a text encoder) merged in.
    """
    return lambda params, x, t, cond=None: model.apply({"params": params}, x, t, cond, train=False)


def drop_condition(key: jax.Array, cond: Mapping[str, jax.Array], null_cond: Mapping[str, Any],
                   rate: float) -> dict[str, jax.Array]:
    """Replaces each example's condition by the null one (the empty prompt, the null class) at `rate`,
    so that classifier-free guidance works on what is trained."""
    batch = jax.tree_util.tree_leaves(cond)[0].shape[0]
    dropped = jax.random.bernoulli(key, rate, (batch,))

    def pick(value, null):
        null = jnp.broadcast_to(jnp.asarray(null, value.dtype), value.shape)
        return jnp.where(dropped.reshape((batch,) + (1,) * (value.ndim - 1)), null, value)

    return {k: pick(v, null_cond[k]) for k, v in cond.items()}


LossFn = Callable[[jax.Array, jax.Array, Any], jax.Array]  # (pred, target, frozen params) -> (B,)


def batch_x0(batch: Mapping[str, jax.Array], source_fn: Callable, key: jax.Array) -> jax.Array:
    """A batch's x0: stored, regenerated from its (noise_seed, noise_index) exactly as the
    triplets were made, or drawn fresh from the source (1-RF)."""
    if "x0" in batch:
        return batch["x0"].astype(jnp.float32)
    if "noise_seed" in batch:
        return sampling.noise_from_seeds(batch["noise_seed"], batch["noise_index"], batch["x1"].shape[1:])
    return source_fn(key, batch["x1"].shape[0])


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *, objective: str,
                    loss: LossFn, time_sampler: Callable, source_fn: Callable,
                    ema_decay: Callable[[jax.Array], jax.Array], cond_dropout: float = 0.0,
                    null_cond: Mapping[str, Any] | None = None, schedule: diffusion.Schedule | None = None,
                    freeze: tuple[str, ...] = ()):
    """The pure step (state, batch, key, frozen) -> (state, metrics); jit it with shardings.

    A batch holds x1, and optionally x0 (or the (noise_seed, noise_index) it is regenerated
    from, `sampling.noise_from_seeds`) and condition keys (models.COND_KEYS). `frozen` are
    params the model or loss reads but never trains (a text encoder, a VAE, LPIPS).
    `ema_decay(t)` is the decay of the t-th EMA update (ema_decay_schedule). metrics
    hold the loss (of the params before the update) and `finite`: whether the loss
    and the whole updated state are finite, so a diverged state is never saved.
    `schedule`: the diffusion objective's noise schedule. `freeze`: top-level param names
    that get neither gradient nor update (2-RF keeping its teacher's text encoder).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    if cond_dropout and null_cond is None:
        raise ValueError("condition dropout needs the null condition")
    if (objective == "diffusion") != (schedule is not None):
        raise ValueError("the diffusion objective, and only it, takes a noise schedule")
    alphas_cumprod = None if schedule is None else jnp.asarray(schedule.alphas_cumprod, jnp.float32)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array], base_key: jax.Array, frozen: Any = None):
        # Keys derive from the step, so a resumed run draws what an uninterrupted one would.
        step_key = jax.random.fold_in(base_key, state.step)
        key_t, key_x0, key_dropout = jax.random.split(step_key, 3)
        key_cond = jax.random.fold_in(step_key, 3)  # beside the split, so older runs keep their streams
        x1, cond = batch["x1"].astype(jnp.float32), models.condition(batch)
        x0 = batch_x0(batch, source_fn, key_x0)
        if cond is not None and cond_dropout:
            cond = drop_condition(key_cond, cond, null_cond, cond_dropout)
        frozen = frozen or {}

        def compute_loss(params):
            params = {k: jax.lax.stop_gradient(v) if k in freeze else v for k, v in params.items()}
            variables = {"params": {**params, **{k: frozen[k] for k in models.frozen_keys(model)}}}
            apply = lambda x, t: model.apply(variables, x, t, cond, train=True, rngs={"dropout": key_dropout})
            if objective == "distill":
                pred, target = x0 + apply(x0, jnp.zeros((x0.shape[0],))), x1
            elif objective == "diffusion":  # x0 is the noise eps
                tau = jax.random.randint(key_t, (x0.shape[0],), 0, len(schedule.alphas_cumprod))
                pred = apply(diffusion.noised(alphas_cumprod, x1, x0, tau), diffusion.model_time(tau))
                target = diffusion.prediction_target(schedule.prediction_type, alphas_cumprod, x1, x0, tau)
            else:
                t = time_sampler(key_t, x0.shape[0])
                pred, target = apply(flow.interpolate(x0, x1, t), t), flow.target_velocity(x0, x1)
            return jnp.mean(loss(pred.astype(jnp.float32), target.astype(jnp.float32), frozen))

        loss_value, grads = jax.value_and_grad(compute_loss)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # Zero, not just zero-gradient: weight decay would still move a frozen part.
        updates = {k: jax.tree_util.tree_map(jnp.zeros_like, v) if k in freeze else v for k, v in updates.items()}
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step.astype(jnp.float32))
        ema = {k: v if k in freeze else jax.tree_util.tree_map(  # frozen: exact, not averaged to rounding
                   lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), v, params[k])
               for k, v in state.ema_params.items()}
        new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        finite = jnp.isfinite(loss_value) & _all_finite((params, ema, opt_state))
        return new_state, {"loss": loss_value, "grad_norm": optax.tree.norm(grads), "finite": finite}

    return train_step


@dataclasses.dataclass
class Stage:
    """What one run of the loop needs beyond the config."""

    name: str                       # '1rf', '2rf', 'distill', ...
    objective: str                  # 'flow' | 'distill' | 'diffusion'
    model: nn.Module
    shape: tuple[int, ...]
    num_classes: int
    source_fn: Callable             # (key, n) -> x0, used when batches carry no x0
    batches: Callable[..., Iterator[dict]]  # (local batch size, seed, start step, shard=(index, count))
    init_params: Any = None         # a teacher's params, or None for a fresh init
    meta: dict = dataclasses.field(default_factory=dict)   # saved beside every checkpoint
    sample_fn: Callable | None = None   # params (frozen parts merged in) -> image (H, W, 3) uint8 for TensorBoard
    # Params read but never trained: the model's frozen parts (models.frozen_keys) and what
    # extra losses need (a VAE decoder, LPIPS); passed to every step, sharded by the rules.
    frozen_params: dict = dataclasses.field(default_factory=dict)
    extra_losses: dict = dataclasses.field(default_factory=dict)  # name -> LossFn beyond flow.LOSSES
    null_cond: dict | None = None   # the condition that condition dropout substitutes (batch of 1)
    # Where the stage's inputs come from beyond the config (JSON values), e.g. {'kind':
    # 'reflow', 'teacher_run_hash': ...}: part of the run hash and of the random streams.
    identity: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r} of stage {self.name!r}; "
                             f"choose one of {OBJECTIVES}")


def abstract_params(model: nn.Module, shape, num_classes, mesh=None, rules=None):
    """Shape/dtype (and sharding, given a mesh) of the params, without allocating them."""
    boxed = models.abstract_params_boxed(model, tuple(shape), num_classes)
    shapes = nn.unbox(boxed)
    if mesh is None:
        return shapes
    shardings = parallel.param_shardings(boxed, mesh, rules)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, shardings)


def frozen_shardings(stage: Stage, mesh, rules) -> dict:
    """The model's frozen parts sharded by the logical rules, like the params; loss models replicated."""
    boxed = models.abstract_frozen_boxed(stage.model, tuple(stage.shape), stage.num_classes)
    by_rules = parallel.param_shardings(boxed, mesh, rules) if boxed else {}
    return {k: by_rules[k] if k in by_rules else jax.tree_util.tree_map(lambda _: parallel.replicated(mesh), v)
            for k, v in stage.frozen_params.items()}


def plain_loss(name: str) -> LossFn:
    """A loss of flow.LOSSES as a LossFn (it reads no frozen params)."""
    plain = flow.loss_fn(name)
    return lambda pred, target, frozen: plain(pred, target)


def _loss(name: str, stage: Stage) -> LossFn:
    if name in stage.extra_losses:
        return stage.extra_losses[name]
    if name not in flow.LOSSES:
        raise configlib.ConfigError(f"loss {name!r} is not available to stage {stage.name} (it has "
                                    f"{sorted(flow.LOSSES) + sorted(stage.extra_losses)})")
    return plain_loss(name)


def loss_schedule(config) -> list[tuple[int, str]]:
    """[(first step, loss name), ...]: flow.loss, then flow.loss_switch.loss from flow.loss_switch.step
    (InstaFlow's L2 first, then LPIPS)."""
    schedule = [(0, config.flow.loss)]
    switch = config.flow.get("loss_switch")
    if switch and switch.get("loss"):
        schedule.append((int(switch.step), switch.loss))
    return schedule


def _state_shardings(model, tx, stage: Stage, mesh, rules):
    params = abstract_params(model, stage.shape, stage.num_classes, mesh, rules)
    param_shardings = jax.tree_util.tree_map(lambda a: a.sharding, params)
    abstract_opt = jax.eval_shape(tx.init, params)
    # Optimizer moments are laid out like the params; scalars (counts) are replicated.
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: parallel.replicated(mesh))
    return TrainState(step=parallel.replicated(mesh), params=param_shardings,
                      ema_params=param_shardings, opt_state=opt_shardings)


def _check_finite(pending: list[tuple[int, Any]]) -> None:
    steps = [s for s, _ in pending]
    values = jax.device_get([(m["loss"], m["finite"]) for _, m in pending])
    for step, (loss, finite) in zip(steps, values):
        if not math.isfinite(float(loss)):
            raise TrainingDiverged(f"loss became {float(loss)} at step {step}")
        if not bool(finite):
            raise TrainingDiverged(f"the parameters or optimizer state became non-finite at step {step} "
                                   f"(loss {float(loss):.4g})")


def run_definition(config, stage: Stage) -> dict[str, Any]:
    """What makes two runs of a stage the same run: hashed, and kept in the meta to diff.

    Step counts, intervals, the mesh and the other stages' settings may change on resume;
    of the time samplers' arguments only the chosen one's count.
    """
    sampler = config.flow.time_sampler
    flow_run = {"time_sampler": sampler, sampler: config.flow[sampler].to_dict(), "loss": config.flow.loss}
    # Keys added after run hashes existed count only when set, so older runs keep their hash.
    if config.flow.get("cond_dropout"):
        flow_run["cond_dropout"] = config.flow.cond_dropout
    if len(loss_schedule(config)) > 1:
        flow_run["loss_switch"] = config.flow.loss_switch.to_dict()
    if stage.objective == "diffusion":
        flow_run["diffusion"] = config.flow.diffusion.to_dict()
    train_run = {"batch_size": config.train.batch_size}
    if config.train.get("freeze"):
        train_run["freeze"] = sorted(config.train.freeze)
    return checkpoint.jsonable({
        "seed": config.seed, "objective": stage.objective, "shape": list(stage.shape),
        "num_classes": stage.num_classes, "model": config.model.to_dict(), "data": config.data.to_dict(),
        "flow": flow_run,
        "optim": config.optim.to_dict(), "train": train_run,
        "identity": stage.identity,
    })


def stage_key(seed: int, stage: Stage) -> jax.Array:
    """The stage's base key: the seed with the objective and identity folded in.

    1-RF, 2-RF and distillation stages of one seed draw independent t, x0 and dropout
    streams; the same stage inputs always give the same stream.
    """
    stream = checkpoint.json_hash({"objective": stage.objective, "identity": stage.identity})
    return jax.random.fold_in(jax.random.key(seed), int(stream[:8], 16))


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict]     # the metrics at each log step of this run, with 'step'


def train(config, stage_dir: str | Path, stage: Stage, *, mesh=None, progress: bool = True) -> TrainResult:
    """Runs (or resumes) one stage to config.train.num_steps.

    `config` is the stage's merged config (rectflow_jax.configlib.stage_config).
    Checkpoints go to stage_dir/checkpoints, TensorBoard logs to stage_dir/tensorboard.
    """
    stage_dir = Path(stage_dir)
    mesh = mesh or parallel.make_mesh(config.mesh.to_dict())
    rules = parallel.logical_rules(config.sharding_rules.to_dict())
    local_batch = parallel.check_batch_size(config.train.batch_size, mesh)
    num_steps = int(config.train.num_steps)
    tx = make_optimizer(config.optim, num_steps)
    state_shardings = _state_shardings(stage.model, tx, stage, mesh, rules)

    def fresh_state(key, params):
        if params is None:
            params = models.trainable(stage.model, nn.unbox(stage.model.init(
                key, *models.example_inputs(stage.model, stage.shape, stage.num_classes))["params"]))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=tx.init(params))

    run = run_definition(config, stage)
    run_hash = checkpoint.json_hash(run)
    init_key, step_key = jax.random.split(stage_key(config.seed, stage))
    create = jax.jit(fresh_state, out_shardings=state_shardings)
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), jax.eval_shape(create, init_key, stage.init_params),
        state_shardings)

    ckpt = checkpoint.Checkpointer(stage_dir, save_every=config.train.checkpoint_every,
                                   keep=config.train.keep_checkpoints)
    try:
        if ckpt.latest_step() is not None:
            _check_same_run(stage_dir, run, run_hash)
        restored = ckpt.restore_latest(abstract_state)
        state, start = restored if restored else (create(init_key, stage.init_params), 0)
        if start >= num_steps:
            return TrainResult(state, [])
        meta = dict(stage.meta, stage=stage.name, objective=stage.objective, shape=list(stage.shape),
                    num_classes=stage.num_classes, model=config.model.to_dict(), data=config.data.to_dict(),
                    num_steps=num_steps, run=run, run_hash=run_hash, config=config.to_dict())
        sampler = config.flow.time_sampler
        freeze = _checked_freeze(config, state.params)
        schedule = diffusion.training_schedule(config.flow.diffusion) if stage.objective == "diffusion" else None
        frozen_sharding = frozen_shardings(stage, mesh, rules)
        frozen = jax.device_put(stage.frozen_params, frozen_sharding)
        compile_step = lambda loss_name: jax.jit(
            make_train_step(stage.model, tx, objective=stage.objective, loss=_loss(loss_name, stage),
                            time_sampler=flow.time_sampler(sampler, **config.flow[sampler]),
                            source_fn=stage.source_fn,
                            ema_decay=ema_decay_schedule(config.optim.ema_decay, config.optim.ema_warmup),
                            cond_dropout=float(config.flow.get("cond_dropout", 0.0)), null_cond=stage.null_cond,
                            schedule=schedule, freeze=freeze),
            in_shardings=(state_shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh),
                          frozen_sharding),
            out_shardings=(state_shardings, parallel.replicated(mesh)),
            donate_argnums=0)
        losses = loss_schedule(config)
        step_fns = {name: compile_step(name) for _, name in losses}
        loss_at = lambda step: [name for first, name in losses if step > first][-1]
        with_frozen = lambda params: {**params, **{k: frozen[k] for k in models.frozen_keys(stage.model)}}
        writer = _summary_writer(stage_dir / "tensorboard")
        batches = stage.batches(local_batch, config.seed, start, shard=(jax.process_index(), jax.process_count()))
        pending: list[tuple[int, Any]] = []
        history: list[dict] = []
        bar = tqdm(total=num_steps, initial=start, desc=stage.name, unit="step", dynamic_ncols=True,
                   disable=not progress or jax.process_index() != 0)
        last_time, last_step = time.perf_counter(), start
        for step in range(start + 1, num_steps + 1):
            state, metrics = step_fns[loss_at(step)](state, parallel.global_batch(next(batches), mesh), step_key,
                                                     frozen)
            pending.append((step, metrics))
            log_now = step % config.train.log_every == 0 or step == num_steps
            save_now = step % config.train.checkpoint_every == 0 or step == num_steps
            if log_now or save_now:
                _check_finite(pending)  # raises before a diverged state can be saved
                host = {k: float(v) for k, v in jax.device_get(pending[-1][1]).items() if k != "finite"}
                now = time.perf_counter()
                rate = (step - last_step) / max(now - last_time, 1e-9)
                last_time, last_step, pending = now, step, []
                history.append(dict(host, step=step, steps_per_s=rate))
                bar.set_postfix(loss=f"{host['loss']:.4f}", steps_per_s=f"{rate:.1f}")
                if writer:
                    with writer.as_default(step=step):
                        _write_scalars(dict(host, steps_per_s=rate))
            if save_now:
                ckpt.save(step, state, meta, force=step == num_steps)
            if writer and stage.sample_fn and (step == num_steps or (
                    config.train.sample_every and step % config.train.sample_every == 0)):
                with writer.as_default(step=step):
                    _write_image("samples", stage.sample_fn(with_frozen(state.ema_params)))
            bar.update(1)
        bar.close()
        return TrainResult(state, history)
    except TrainingDiverged as err:
        ckpt.wait()
        kept = ckpt.latest_step()
        where = (f"the last good checkpoint (step {kept}) is kept in {stage_dir}" if kept is not None
                 else "no checkpoint had been saved yet")
        raise TrainingDiverged(f"{err} of stage {stage.name}: stopped; {where}") from None
    finally:
        ckpt.wait()
        ckpt.close()


def _checked_freeze(config, params: Mapping[str, Any]) -> tuple[str, ...]:
    freeze = tuple(config.train.get("freeze", ()))
    unknown = sorted(set(freeze) - set(params))
    if unknown:
        raise configlib.ConfigError(f"train.freeze names {unknown}, which are not top-level params of this model "
                                    f"(it has {sorted(params)})")
    return freeze


def _check_same_run(stage_dir: Path, run: dict, run_hash: str) -> None:
    """Refuses to resume a checkpoint of another run (nothing is overwritten), naming what differs."""
    meta, step = checkpoint.read_meta(stage_dir)
    advice = "use a new --workdir or remove the old one"
    if "run_hash" not in meta:
        raise checkpoint.CheckpointError(
            f"{stage_dir} holds a checkpoint (step {step}) written by an older rectflow_jax without a run hash, "
            f"so it cannot be checked to be this run; {advice}")
    if meta["run_hash"] != run_hash:
        differ = "; ".join(_differences(meta.get("run", {}), run)[:8]) or "its run hash differs"
        raise checkpoint.CheckpointError(
            f"{stage_dir} holds a checkpoint (step {step}) of a different run: {differ}; {advice}")


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """'key: old -> new' for each differing leaf of two JSON trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new))
                for line in _differences(old.get(key, "<unset>"), new.get(key, "<unset>"),
                                         f"{path}.{key}" if path else key)]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _summary_writer(directory: Path):
    if jax.process_index() != 0:
        return None
    import tensorflow as tf

    return tf.summary.create_file_writer(str(directory))


def _write_scalars(values: Mapping[str, float]) -> None:
    import tensorflow as tf

    for name, value in values.items():
        tf.summary.scalar(name, value)


def _write_image(name: str, image: np.ndarray) -> None:
    import tensorflow as tf

    tf.summary.image(name, np.asarray(image)[None])
