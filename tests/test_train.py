"""The train loop on a mesh: sharding invariance, NaN handling, EMA, resume from a checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rectflow_jax import checkpoint, configlib, parallel, train
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


def toy_batches(nan_at=None):
    def batches(batch_size, seed, start_step, shard=(0, 1)):
        step = start_step
        while True:
            rng = np.random.default_rng((seed, step))
            x1 = rng.normal(size=(batch_size, 2)).astype(np.float32) + 3.0
            if nan_at is not None and step + 1 == nan_at:
                x1[0, 0] = np.nan
            step += 1
            yield {"x1": x1}
    return batches


def toy_stage(**kwargs):
    return train.Stage(name="toy", objective="flow", model=MLPVelocity(hidden=32, depth=2, time_embed_dim=16),
                       shape=(2,), num_classes=0, source_fn=lambda key, n: jax.random.normal(key, (n, 2)),
                       batches=toy_batches(**kwargs))


def test_losses_match_across_meshes(tmp_path):
    """Equal global batch on 1 and 4 devices gives the same losses (to 1e-5) over 50 steps."""
    assert len(jax.devices()) >= 4, "conftest sets --xla_force_host_platform_device_count"
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
    config = toy_config(num_steps=10)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
    sharded = train.train(config, tmp_path / "fsdp", toy_stage(), mesh=mesh, progress=False)
    single = train.train(config, tmp_path / "one", toy_stage(),
                         mesh=parallel.make_mesh({}, devices=jax.devices()[:1]), progress=False)
    kernels = [p for p in jax.tree_util.tree_leaves(sharded.state.params) if p.ndim == 2 and p.shape[1] % 2 == 0]
    assert any(not p.sharding.is_fully_replicated for p in kernels)
    np.testing.assert_allclose([h["loss"] for h in sharded.history], [h["loss"] for h in single.history], rtol=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = toy_config(num_steps=40, checkpoint_every=10, log_every=5)
    stage = toy_stage(nan_at=23)
    with pytest.raises(train.TrainingDiverged, match=r"at step 23 .*last good checkpoint \(step 20\)"):
        train.train(config, tmp_path / "nan", stage, progress=False)
    assert checkpoint.latest_step(tmp_path / "nan") == 20
    meta, step = checkpoint.read_meta(tmp_path / "nan")
    assert step == 20 and meta["stage"] == "toy"


def test_resume_continues_where_it_stopped(tmp_path):
    """Training 30 steps, then to 60, equals training 60 steps at once."""
    straight = train.train(toy_config(num_steps=60), tmp_path / "straight", toy_stage(), progress=False)
    train.train(toy_config(num_steps=30), tmp_path / "resumed", toy_stage(), progress=False)
    resumed = train.train(toy_config(num_steps=60), tmp_path / "resumed", toy_stage(), progress=False)
    assert resumed.history[0]["step"] == 31
    for a, b in zip(jax.tree_util.tree_leaves(straight.state), jax.tree_util.tree_leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resuming_another_model_is_refused(tmp_path):
    train.train(toy_config(num_steps=5), tmp_path / "run", toy_stage(), progress=False)
    other = toy_config(num_steps=10)
    other.model.hidden = 64
    stage = toy_stage()
    stage.model = MLPVelocity(hidden=64, depth=2, time_embed_dim=16)
    with pytest.raises(checkpoint.CheckpointError, match="different run .*model"):
        train.train(other, tmp_path / "run", stage, progress=False)
    assert checkpoint.latest_step(tmp_path / "run") == 5


def test_ema_tracks_params():
    config = toy_config()
    tx = train.make_optimizer(config.optim)
    model = MLPVelocity(hidden=8, depth=1, time_embed_dim=8)
    params = train.abstract_params(model, (2,), 0)
    params = jax.tree_util.tree_map(lambda a: jnp.ones(a.shape, a.dtype), params)
    state = train.TrainState(step=jnp.int32(0), params=params, ema_params=params, opt_state=tx.init(params))
    step = jax.jit(train.make_train_step(model, tx, objective="flow", loss_name="l2",
                                         time_sampler=lambda k, n: jnp.full((n,), 0.5),
                                         source_fn=lambda k, n: jnp.zeros((n, 2)), ema_decay=0.9))
    new, metrics = step(state, {"x1": jnp.ones((4, 2))}, jax.random.key(0))
    for p0, p1, e1 in zip(*(jax.tree_util.tree_leaves(t) for t in (params, new.params, new.ema_params))):
        np.testing.assert_allclose(e1, 0.9 * p0 + 0.1 * p1, rtol=1e-6)
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
