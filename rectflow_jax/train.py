"""One training loop for every stage: 1-RF from data, k-RF from pairs, distillation.

A stage differs only in its batches (data or pair shards), its initial parameters
(fresh or a teacher's) and its objective: 'flow' regresses v(X_t, t) on X1 - X0 at
sampled t; 'distill' trains the one-step map x0 + v(x0, 0) onto x1; 'diffusion' trains a
noise (or v-, or sample-) prediction on a diffusers noise schedule, as Stable Diffusion
was trained: the model sees x_tau at our time 1 - tau / 1000 (rectflow_jax.diffusion).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
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

from rectflow_jax import checkpoint, configlib, diffusion, flow, models, parallel, preemption, sampling, storage

log = logging.getLogger("rectflow")

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
                    freeze: tuple[str, ...] = (), microbatches: int = 1):
    """The pure step (state, batch, key, frozen) -> (state, metrics); jit it with shardings.

    A batch holds x1, and optionally x0 (or the (noise_seed, noise_index) it is regenerated
    from, `sampling.noise_from_seeds`) and condition keys (models.COND_KEYS). `frozen` are
    params the model or loss reads but never trains (a text encoder, a VAE, LPIPS).
    `ema_decay(t)` is the decay of the t-th EMA update (ema_decay_schedule). metrics
    hold the loss (of the params before the update) and `finite`: whether the loss
    and the whole updated state are finite, so a diverged state is never saved.
    `schedule`: the diffusion objective's noise schedule. `freeze`: top-level param names
    that get neither gradient nor update (2-RF keeping its teacher's text encoder).
    `microbatches`: the batch's gradient is accumulated over this many slices in one
    lax.scan, in float32; t, x0 and condition dropout are drawn for the whole batch first,
    so any split gives the step of the whole batch (up to rounding; model dropout masks
    are drawn per slice).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    if cond_dropout and null_cond is None:
        raise ValueError("condition dropout needs the null condition")
    if (objective == "diffusion") != (schedule is not None):
        raise ValueError("the diffusion objective, and only it, takes a noise schedule")
    if microbatches < 1:
        raise configlib.ConfigError(f"train.microbatches must be at least 1, got {microbatches}")
    alphas_cumprod = None if schedule is None else jnp.asarray(schedule.alphas_cumprod, jnp.float32)

    def regression_rows(key_t, x0, x1):
        """Per example: the model's input x and time t, and the target of its prediction."""
        if objective == "distill":  # the one-step map x0 + v(x0, 0) onto x1
            return x0, jnp.zeros((x0.shape[0],)), x1
        if objective == "diffusion":  # x0 is the noise eps
            tau = jax.random.randint(key_t, (x0.shape[0],), 0, len(schedule.alphas_cumprod))
            return (diffusion.noised(alphas_cumprod, x1, x0, tau), diffusion.model_time(tau),
                    diffusion.prediction_target(schedule.prediction_type, alphas_cumprod, x1, x0, tau))
        t = time_sampler(key_t, x0.shape[0])
        return flow.interpolate(x0, x1, t), t, flow.target_velocity(x0, x1)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array], base_key: jax.Array, frozen: Any = None):
        if not jnp.issubdtype(base_key.dtype, jax.dtypes.prng_key):  # raw key data
            base_key = jax.random.wrap_key_data(base_key)
        # Keys derive from the step, so a resumed run draws what an uninterrupted one would.
        step_key = jax.random.fold_in(base_key, state.step)
        key_t, key_x0, key_dropout = jax.random.split(step_key, 3)
        key_cond = jax.random.fold_in(step_key, 3)  # beside the split, so older runs keep their streams
        x1, cond = batch["x1"].astype(jnp.float32), models.condition(batch)
        x0 = batch_x0(batch, source_fn, key_x0)
        if cond is not None and cond_dropout:
            cond = drop_condition(key_cond, cond, null_cond, cond_dropout)
        frozen = frozen or {}
        x, t, target = regression_rows(key_t, x0, x1)
        rows = {"x": x, "t": t, "target": target, "cond": cond}

        def rows_loss(params, rows, key):
            params = {k: jax.lax.stop_gradient(v) if k in freeze else v for k, v in params.items()}
            variables = {"params": {**params, **{k: frozen[k] for k in models.frozen_keys(model)}}}
            v = model.apply(variables, rows["x"], rows["t"], rows["cond"], train=True, rngs={"dropout": key})
            pred = rows["x"] + v if objective == "distill" else v
            return jnp.mean(loss(pred.astype(jnp.float32), rows["target"].astype(jnp.float32), frozen))

        if microbatches == 1:
            loss_value, grads = jax.value_and_grad(rows_loss)(state.params, rows, key_dropout)
        else:
            loss_value, grads = _accumulated(jax.value_and_grad(rows_loss), state.params, rows, key_dropout,
                                             microbatches)
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


def _accumulated(loss_and_grad: Callable, params: Any, rows: Any, key: jax.Array, microbatches: int):
    """Mean loss and gradient over `microbatches` equal slices of `rows`, summed in float32 in one scan.

    Slice m takes rows m, m + M, m + 2M, ...: the batch is split over devices in
    contiguous blocks, so every slice keeps rows on every device and no device idles.
    """
    batch = jax.tree_util.tree_leaves(rows)[0].shape[0]
    if batch % microbatches:
        raise configlib.ConfigError(f"the batch ({batch} rows) does not split into train.microbatches="
                                    f"{microbatches} equal parts")
    strided = jax.tree_util.tree_map(
        lambda a: jnp.swapaxes(a.reshape((batch // microbatches, microbatches) + a.shape[1:]), 0, 1), rows)

    def accumulate(carry, slice_and_index):
        loss_sum, grad_sum = carry
        part, index = slice_and_index
        loss_value, grads = loss_and_grad(params, part, jax.random.fold_in(key, index))
        grad_sum = jax.tree_util.tree_map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
        return (loss_sum + loss_value.astype(jnp.float32), grad_sum), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                           (strided, jnp.arange(microbatches)))
    grads = jax.tree_util.tree_map(lambda g, p: (g / microbatches).astype(p.dtype), grad_sum, params)
    return loss_sum / microbatches, grads


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
    stage_dir = storage.path(stage_dir)  # gs:// stays a URL: checkpoints, compiled.json, TensorBoard
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
    # As raw key data, placed like any replicated host value (a typed key cannot be, across processes).
    step_key = parallel.replicate(np.asarray(jax.random.key_data(step_key)), mesh)
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
        step_fn = lambda loss_name: jax.jit(
            make_train_step(stage.model, tx, objective=stage.objective, loss=_loss(loss_name, stage),
                            time_sampler=flow.time_sampler(sampler, **config.flow[sampler]),
                            source_fn=stage.source_fn,
                            ema_decay=ema_decay_schedule(config.optim.ema_decay, config.optim.ema_warmup),
                            cond_dropout=float(config.flow.get("cond_dropout", 0.0)), null_cond=stage.null_cond,
                            schedule=schedule, freeze=freeze, microbatches=int(config.train.get("microbatches", 1))),
            in_shardings=(state_shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh),
                          frozen_sharding),
            out_shardings=(state_shardings, parallel.replicated(mesh)),
            donate_argnums=0)
        losses = loss_schedule(config)
        loss_at = lambda step: [name for first, name in losses if step > first][-1]
        with_frozen = lambda params: {**params, **{k: frozen[k] for k in models.frozen_keys(stage.model)}}
        writer = _summary_writer(stage_dir / "tensorboard")
        batches = stage.batches(local_batch, config.seed, start, shard=(jax.process_index(), jax.process_count()))
        timer = _StepTimer()
        with timer.waiting():
            first_batch = parallel.global_batch(next(batches), mesh)
        # Ahead of time, once per loss: the memory and FLOPs are known before step 1.
        with parallel.activation_sharding(mesh, rules):
            step_fns = {name: step_fn(name).lower(state, first_batch, step_key, frozen).compile()
                        for name in dict.fromkeys(name for _, name in losses)}
        stats = compiled_stats(step_fns[loss_at(start + 1)], mesh)
        _log_compiled(stage.name, stats, config.train.batch_size)
        if jax.process_index() == 0:
            checkpoint.write_json(stage_dir / "compiled.json", stats)
        timer.restart(start)  # step times leave the compilation out
        check_every = 1 if jax.process_count() == 1 else max(1, int(config.train.get("preemption_check_every", 10)))
        pending: list[tuple[int, Any]] = []
        history: list[dict] = []
        bar = tqdm(total=num_steps, initial=start, desc=stage.name, unit="step", dynamic_ncols=True,
                   disable=not progress or jax.process_index() != 0)
        for step in range(start + 1, num_steps + 1):
            if step == start + 1:
                batch = first_batch
            else:
                with timer.waiting():
                    batch = parallel.global_batch(next(batches), mesh)
            state, metrics = step_fns[loss_at(step)](state, batch, step_key, frozen)
            pending.append((step, metrics))
            log_now = step % config.train.log_every == 0 or step == num_steps
            save_now = step % config.train.checkpoint_every == 0 or step == num_steps
            stop_now = step % check_every == 0 and preemption.requested(step)
            if log_now or save_now or stop_now:
                _check_finite(pending)  # raises before a diverged state can be saved
                host = {k: float(v) for k, v in jax.device_get(pending[-1][1]).items() if k != "finite"}
                pending = []
                host.update(timer.window(step, config.train.batch_size, stats.get("flops_per_step"),
                                         stats.get("peak_flops")))
                history.append(dict(host, step=step))
                bar.set_postfix(loss=f"{host['loss']:.4f}", steps_per_s=f"{host['steps_per_s']:.1f}")
                if writer:
                    with writer.as_default(step=step):
                        _write_scalars(host)
            if save_now or stop_now:
                ckpt.save(step, state, meta, force=True)
            if stop_now:
                ckpt.wait()
                bar.close()
                raise preemption.Preempted(f"stage {stage.name} stopped at step {step} of {num_steps} on request "
                                           f"(SIGTERM); its checkpoint is in {stage_dir}: rerun to resume")
            if stage.sample_fn and (step == num_steps or (
                    config.train.sample_every and step % config.train.sample_every == 0)):
                _preview(stage, writer, step, with_frozen(state.ema_params))
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

    return tf.summary.create_file_writer(str(directory))  # tf writes gs:// itself, given the URL


def _write_scalars(values: Mapping[str, float]) -> None:
    import tensorflow as tf

    for name, value in values.items():
        tf.summary.scalar(name, value)


def _write_image(name: str, image: np.ndarray) -> None:
    import tensorflow as tf

    tf.summary.image(name, np.asarray(image)[None])


def _preview(stage: Stage, writer, step: int, params: Any) -> None:
    """The TensorBoard picture, drawn by every process from the (possibly FSDP-sharded) params:
    sampling is a collective over the mesh, so no process may sit it out. One writes it."""
    image = stage.sample_fn(params)
    if writer:
        with writer.as_default(step=step):
            _write_image("samples", image)


# Dense bf16 peak FLOP/s per device, by jax's device_kind (vendor data sheets; SXM parts).
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "A800": 312e12, "L40S": 362e12, "TPU v2": 45e12, "TPU v3": 123e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device) -> float | None:
    """The device's bf16 peak FLOP/s, or None where unknown (CPUs)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    matches = [name for name in PEAK_BF16_FLOPS if name.lower() in kind.lower()]
    if not matches:
        return None
    if "h100" in kind.lower() and "pcie" in kind.lower():
        return 756e12
    return PEAK_BF16_FLOPS[max(matches, key=len)]  # 'TPU v5 lite' before 'TPU v5'


def compiled_stats(compiled, mesh) -> dict[str, Any]:
    """Per-device memory (memory_analysis) and FLOPs per step (cost_analysis) of a compiled step.

    XLA reports both for one device's partition of the SPMD program, so the FLOPs of the
    whole step are the device count times it.
    """
    stats: dict[str, Any] = {"devices": int(mesh.size), "mesh": dict(mesh.shape),
                             "device_kind": mesh.devices.flat[0].device_kind}
    memory = compiled.memory_analysis()
    if memory is not None:
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                     "alias_size_in_bytes", "generated_code_size_in_bytes"):
            stats[name.replace("_size_in_bytes", "_bytes")] = int(getattr(memory, name, 0) or 0)
        stats["peak_bytes_estimate"] = (stats["argument_bytes"] + stats["output_bytes"] + stats["temp_bytes"]
                                        - stats["alias_bytes"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops"):
        stats["flops_per_device_step"] = float(cost["flops"])
        stats["flops_per_step"] = float(cost["flops"]) * mesh.size
    stats["peak_flops"] = peak_flops(mesh.devices.flat[0])
    return stats


def _log_compiled(name: str, stats: dict, batch_size: int) -> None:
    gib = lambda key: stats.get(key, 0) / 2**30
    log.info("%s: compiled for %d devices %s (%s): per device %.3f GiB arguments (params, optimiser state, batch), "
             "%.3f GiB temporaries, about %.3f GiB at peak", name, stats["devices"], stats["mesh"],
             stats["device_kind"], gib("argument_bytes"), gib("temp_bytes"), gib("peak_bytes_estimate"))
    if stats.get("flops_per_step"):
        log.info("%s: %.4g GFLOPs per step of %d examples (XLA cost analysis)%s", name,
                 stats["flops_per_step"] / 1e9, batch_size,
                 f"; peak {stats['peak_flops'] / 1e12:.0f} TFLOP/s per device (bf16)" if stats["peak_flops"] else "")


class _StepTimer:
    """Steps/s, images/s, the share of time spent waiting for data, and MFU, per log window."""

    def __init__(self):
        self.restart(None)

    def restart(self, step: int | None) -> None:
        self.last_time, self.last_step, self.data_wait = time.perf_counter(), step, 0.0

    @contextlib.contextmanager
    def waiting(self):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.data_wait += time.perf_counter() - begin

    def window(self, step: int, batch_size: int, flops_per_step: float | None, peak: float | None,
               ) -> dict[str, float]:
        now = time.perf_counter()
        steps = step - self.last_step if self.last_step is not None else 1
        seconds = max(now - self.last_time, 1e-9)
        out = {"steps_per_s": steps / seconds, "step_time_s": seconds / steps,
               "images_per_s": steps * batch_size / seconds, "data_wait_fraction": min(self.data_wait / seconds, 1.0)}
        if flops_per_step and peak:
            out["mfu"] = flops_per_step * steps / seconds / (peak * jax.device_count())
        self.last_time, self.last_step, self.data_wait = now, step, 0.0
        return out
