"""The train loop on a mesh: sharding invariance, divergence, EMA, schedules, resume, random streams."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rectflow_jax import checkpoint, configlib, models, parallel, train
from rectflow_jax.models import MLPVelocity


def toy_config(num_steps=50, **train_overrides):
    config = configlib.base_config()
    config.data.name = "toy"
    config.model = dict(name="mlp", hidden=32, depth=2, time_embed_dim=16)
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 5
    config.train.batch_size = 32
    config.train.num_steps = num_steps
    config.train.log_every = 1
    config.train.checkpoint_every = 25
    config.train.update(train_overrides)
    return config


def toy_batches(nan_at=None, with_x0=False):
    def batches(batch_size, seed, start_step, shard=(0, 1)):
        step = start_step
        while True:
            rng = np.random.default_rng((seed, step))
            batch = {"x1": rng.normal(size=(batch_size, 2)).astype(np.float32) + 3.0}
            if nan_at is not None and step + 1 == nan_at:
                batch["x1"][0, 0] = np.nan
            if with_x0:  # the stage's keys then only draw t (the MLP has no dropout)
                batch["x0"] = rng.normal(size=(batch_size, 2)).astype(np.float32)
            step += 1
            yield batch
    return batches


def toy_stage(*, identity=None, init_params=None, **kwargs):
    return train.Stage(name="toy", objective="flow", model=MLPVelocity(hidden=32, depth=2, time_embed_dim=16),
                       shape=(2,), num_classes=0, source_fn=lambda key, n: jax.random.normal(key, (n, 2)),
                       batches=toy_batches(**kwargs), init_params=init_params, identity=identity or {})


def one_device():
    return parallel.make_mesh({}, devices=jax.devices()[:1])


def need_devices(n):
    if len(jax.devices()) < n:
        pytest.skip(f"needs {n} devices, XLA_FLAGS gives {len(jax.devices())} "
                    "(tests/conftest.py asks for 8 unless XLA_FLAGS is already set)")


def tree_leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_losses_match_across_meshes(tmp_path):
    """Equal global batch on 1 and 4 devices gives the same losses (to 1e-5) over 50 steps."""
    need_devices(4)
    config = toy_config()
    runs = {}
    for n in (1, 4):
        mesh = parallel.make_mesh({"data": -1}, devices=jax.devices()[:n])
        result = train.train(config, tmp_path / f"mesh{n}", toy_stage(), mesh=mesh, progress=False)
        runs[n] = np.array([h["loss"] for h in result.history])
        assert len(runs[n]) == 50
        if n == 4:
            leaf = jax.tree_util.tree_leaves(result.state.params)[0]
            assert len(leaf.sharding.device_set) == 4
    np.testing.assert_allclose(runs[4], runs[1], rtol=1e-5, atol=1e-6)
    assert runs[1][-1] < runs[1][0]  # it learns


def test_fsdp_mesh_shards_params_and_matches(tmp_path):
    need_devices(4)
    config = toy_config(num_steps=10)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
    sharded = train.train(config, tmp_path / "fsdp", toy_stage(), mesh=mesh, progress=False)
    single = train.train(config, tmp_path / "one", toy_stage(), mesh=one_device(), progress=False)
    kernels = [p for p in jax.tree_util.tree_leaves(sharded.state.params) if p.ndim == 2 and p.shape[1] % 2 == 0]
    assert any(not p.sharding.is_fully_replicated for p in kernels)
    np.testing.assert_allclose([h["loss"] for h in sharded.history], [h["loss"] for h in single.history], rtol=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = toy_config(num_steps=40, checkpoint_every=10, log_every=5)
    stage = toy_stage(nan_at=23)
    with pytest.raises(train.TrainingDiverged, match=r"at step 23 .*last good checkpoint \(step 20\)"):
        train.train(config, tmp_path / "nan", stage, mesh=one_device(), progress=False)
    assert checkpoint.latest_step(tmp_path / "nan") == 20
    meta, step = checkpoint.read_meta(tmp_path / "nan")
    assert step == 20 and meta["stage"] == "toy"


def test_non_finite_update_with_finite_loss_is_never_saved(tmp_path):
    """lr = inf: step 1's loss (of the init) is finite, its updated params are not."""
    config = toy_config(num_steps=5, checkpoint_every=1, log_every=1)
    config.optim.lr, config.optim.warmup_steps = float("inf"), 0
    with pytest.raises(train.TrainingDiverged, match="non-finite at step 1 .*no checkpoint had been saved"):
        train.train(config, tmp_path / "inf", toy_stage(), mesh=one_device(), progress=False)
    assert checkpoint.latest_step(tmp_path / "inf") is None


def test_resume_continues_where_it_stopped(tmp_path):
    """Training 30 steps, then to 60, equals training 60 steps at once."""
    run = lambda steps, name: train.train(toy_config(num_steps=steps), tmp_path / name, toy_stage(),
                                          mesh=one_device(), progress=False)
    straight = run(60, "straight")
    run(30, "resumed")
    resumed = run(60, "resumed")
    assert resumed.history[0]["step"] == 31
    for a, b in zip(tree_leaves(straight.state), tree_leaves(resumed.state)):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def five_step_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("five_steps")
    train.train(toy_config(num_steps=5), workdir, toy_stage(), mesh=one_device(), progress=False)
    return workdir


@pytest.mark.parametrize("key, value", [
    ("seed", 1), ("model.hidden", 64), ("optim.lr", 2e-3), ("optim.ema_warmup", "none"),
    ("flow.time_sampler", "u_shaped"), ("flow.uniform.eps", 0.01), ("flow.loss", "pseudo_huber"),
    ("data.name", "toy2"), ("train.batch_size", 16),
])
def test_resuming_a_different_run_is_refused(five_step_run, key, value):
    config = toy_config(num_steps=10)
    config.update_from_flattened_dict({key: value})
    stage = toy_stage()
    stage.model = models.build_velocity_model(config.model, (2,), 0)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"different run: {key}: ")) as refused:
        train.train(config, five_step_run, stage, mesh=one_device(), progress=False)
    assert f"-> {value!r}" in str(refused.value)
    assert checkpoint.latest_step(five_step_run) == 5


def test_stage_identity_draws_independent_streams(tmp_path):
    """Fixed init and x0 in the batches: only the t stream differs between the two stages."""
    model = MLPVelocity(hidden=32, depth=2, time_embed_dim=16)
    init = models.init_params(model, jax.random.key(5), (2,), 0)
    config = toy_config(num_steps=3)
    teacher_a, teacher_b = {"kind": "reflow", "teacher_run_hash": "abc"}, {"kind": "reflow", "teacher_run_hash": "def"}

    def losses(name, identity):
        stage = toy_stage(identity=identity, init_params=init, with_x0=True)
        result = train.train(config, tmp_path / name, stage, mesh=one_device(), progress=False)
        return [h["loss"] for h in result.history], checkpoint.read_meta(tmp_path / name)[0]["run_hash"]

    (first, first_hash), (other, other_hash) = losses("a", teacher_a), losses("b", teacher_b)
    assert all(a != b for a, b in zip(first, other)) and first_hash != other_hash
    same = [jax.random.key_data(train.stage_key(0, toy_stage(identity=dict(teacher_a)))) for _ in range(2)]
    np.testing.assert_array_equal(*same)
    distill = toy_stage(identity=teacher_a)
    distill.objective = "distill"
    assert not np.array_equal(same[0], jax.random.key_data(train.stage_key(0, distill)))


# ----------------------------------------------------------------------------- the step itself


def _state(model, tx, params):
    return train.TrainState(step=jnp.int32(0), params=params, ema_params=params, opt_state=tx.init(params))


def _zeroing_optimizer():
    """Sets every param to 0 on its first update: the EMA's weight on the init is then its value / init."""
    return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                        lambda grads, state, params: (jax.tree_util.tree_map(jnp.negative, params),
                                                                      state))


@pytest.mark.parametrize("warmup, low, high", [("none", 0.7, 0.8), ("ramp", 0.0, 1e-3),
                                               ("bias_correction", 0.0, 1e-6)])
def test_ema_weight_left_on_the_init_after_300_steps(warmup, low, high):
    model = MLPVelocity(hidden=8, depth=1, time_embed_dim=8)
    params = jax.tree_util.tree_map(lambda a: jnp.ones(a.shape, a.dtype), train.abstract_params(model, (2,), 0))
    tx = _zeroing_optimizer()
    step = jax.jit(train.make_train_step(model, tx, objective="flow", loss=train.plain_loss("l2"),
                                         time_sampler=lambda k, n: jnp.full((n,), 0.5),
                                         source_fn=lambda k, n: jnp.zeros((n, 2)),
                                         ema_decay=train.ema_decay_schedule(0.999, warmup)))
    state = _state(model, tx, params)
    for _ in range(300):
        state, metrics = step(state, {"x1": jnp.ones((4, 2))}, jax.random.key(0))
    weight = np.concatenate([np.ravel(e) for e in tree_leaves(state.ema_params)])
    assert np.all(weight == weight[0]) and low <= weight[0] <= high, weight[0]  # 0.999^300 = 0.741 for 'none'
    assert int(state.step) == 300 and bool(metrics["finite"])


def test_default_ema_forgets_the_teacher(tmp_path):
    """300 steps at decay 0.999: the EMA must have moved most of the way the params moved.

    A fixed decay keeps 74% of the initial (teacher's) weights in the EMA after 300 steps.
    """
    model = MLPVelocity(hidden=32, depth=2, time_embed_dim=16)
    init = models.init_params(model, jax.random.key(3), (2,), 0)
    config = toy_config(num_steps=300, log_every=100, checkpoint_every=300)
    config.optim.ema_decay = 0.999
    result = train.train(config, tmp_path / "ema", toy_stage(init_params=init), mesh=one_device(), progress=False)
    flat = lambda tree: np.concatenate([np.ravel(x) for x in tree_leaves(tree)])
    moved_params = np.linalg.norm(flat(result.state.params) - flat(init))
    moved_ema = np.linalg.norm(flat(result.state.ema_params) - flat(init))
    assert moved_ema > 0.6 * moved_params, (moved_ema, moved_params)


def test_cosine_schedule_keeps_learning_and_resume_may_change_steps_and_intervals(tmp_path):
    """optim.schedule=cosine with the default decay_steps=0 decays over the stage, not to 0 after warm-up.

    The second call resumes the run with more steps and other intervals: the same run.
    """
    config = toy_config(num_steps=10, checkpoint_every=10)
    config.optim.schedule = "cosine"
    first = train.train(config, tmp_path / "cos", toy_stage(), mesh=one_device(), progress=False)
    config.train.update(num_steps=20, log_every=5, checkpoint_every=5, keep_checkpoints=3, sample_every=2)
    config.mesh.data = 1
    second = train.train(config, tmp_path / "cos", toy_stage(), mesh=one_device(), progress=False)
    assert [h["step"] for h in second.history] == [15, 20]
    moved = [np.abs(a - b).max() for a, b in zip(tree_leaves(first.state.params), tree_leaves(second.state.params))]
    assert max(moved) > 1e-4, moved  # steps 11..20 still update the params
    meta, step = checkpoint.read_meta(tmp_path / "cos")
    assert step == 20 and meta["config"]["train"]["num_steps"] == 20
    schedule = train.learning_rate_schedule(config.optim, 20)
    assert float(schedule(12)) > 0.5 * config.optim.lr and float(schedule(20)) == pytest.approx(0.0, abs=1e-9)


def test_distill_step_matches_the_loss_and_gradient_by_hand():
    """objective 'distill': loss = mean ||x0 + v(x0, 0) - x1||^2 (per coordinate), an SGD step follows its gradient."""
    model = MLPVelocity(hidden=16, depth=2, time_embed_dim=8)
    params = models.init_params(model, jax.random.key(0), (2,), 0)
    x0 = jax.random.normal(jax.random.key(1), (8, 2))
    x1 = x0 * 2.0 + 1.0
    lr = 0.05
    tx = optax.sgd(lr)
    step = jax.jit(train.make_train_step(model, tx, objective="distill", loss=train.plain_loss("l2"),
                                         time_sampler=lambda k, n: jnp.full((n,), 0.7),  # unused by distill
                                         source_fn=lambda k, n: jnp.zeros((n, 2)),
                                         ema_decay=train.ema_decay_schedule(0.9, "none")))

    @jax.jit
    def by_hand(p):
        v = model.apply({"params": p}, x0, jnp.zeros((8,)), None, train=False)
        return jnp.mean(jnp.sum(jnp.square(x0 + v - x1), axis=1)) / 2  # mean over examples and the 2 coordinates

    new, metrics = step(_state(model, tx, params), {"x0": x0, "x1": x1}, jax.random.key(2))
    np.testing.assert_allclose(float(metrics["loss"]), float(by_hand(params)), rtol=1e-6)
    expected = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, jax.jit(jax.grad(by_hand))(params))
    for got, want in zip(tree_leaves(new.params), tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert float(by_hand(new.params)) < float(by_hand(params))


def test_stage_with_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="unknown objective 'flw'"):
        train.Stage(name="x", objective="flw", model=None, shape=(2,), num_classes=0, source_fn=None, batches=None)


def test_condition_dropout_swaps_in_the_null_condition_at_its_rate():
    ids = jnp.tile(jnp.arange(77, dtype=jnp.int32)[None], (4000, 1))
    null = {"input_ids": np.full((1, 77), 7, np.int32)}
    dropped = train.drop_condition(jax.random.key(0), {"input_ids": ids}, null, 0.25)["input_ids"]
    is_null = np.all(np.asarray(dropped) == 7, axis=1)
    kept = np.all(np.asarray(dropped) == np.asarray(ids), axis=1)
    assert np.all(is_null | kept) and 0.22 < is_null.mean() < 0.28  # whole examples, at about the rate
    labels = train.drop_condition(jax.random.key(1), {"label": jnp.arange(8)}, {"label": np.array([10])}, 0.0)
    np.testing.assert_array_equal(labels["label"], np.arange(8))


def test_frozen_params_stay_exactly_put_under_weight_decay_and_ema():
    """train.freeze: neither gradient, nor AdamW's decay, nor EMA rounding moves a frozen part."""
    model = MLPVelocity(hidden=16, depth=2, time_embed_dim=8)
    params = models.init_params(model, jax.random.key(0), (2,), 0)
    frozen_name = sorted(params)[0]
    tx = optax.adamw(1e-2, weight_decay=0.1)
    step = jax.jit(train.make_train_step(model, tx, objective="flow", loss=train.plain_loss("l2"),
                                         time_sampler=lambda k, n: jnp.full((n,), 0.5),
                                         source_fn=lambda k, n: jax.random.normal(k, (n, 2)),
                                         ema_decay=train.ema_decay_schedule(0.999, "ramp"), freeze=(frozen_name,)))
    state = _state(model, tx, params)
    for _ in range(5):
        state, _ = step(state, {"x1": jnp.ones((8, 2))}, jax.random.key(1))
    for tree in (state.params, state.ema_params):
        for got, want in zip(tree_leaves(tree[frozen_name]), tree_leaves(params[frozen_name])):
            np.testing.assert_array_equal(got, want)
    moved = [k for k in params if k != frozen_name
             and any(not np.array_equal(a, b) for a, b in zip(tree_leaves(state.params[k]), tree_leaves(params[k])))]
    assert moved == [k for k in params if k != frozen_name]


def test_freeze_names_must_be_params(tmp_path):
    config = toy_config(num_steps=2, log_every=1, checkpoint_every=2)
    config.train.freeze = ("text_encoder",)
    with pytest.raises(configlib.ConfigError, match="train.freeze names \\['text_encoder'\\]"):
        train.train(config, tmp_path / "s", toy_stage(), mesh=one_device(), progress=False)
