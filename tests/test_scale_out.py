"""Scale is a tested property: meshes, accumulation and restore onto another mesh change nothing.

On the 8 fake CPU devices of conftest:
- every mesh (data x fsdp x tensor) trains the digits UNet and a tiny text-conditioned SD
  UNet with the per-step losses of one device, and its per-device state falls as 1/fsdp;
- 4 microbatches of 8 make the step of one batch of 32;
- a checkpoint of a 4-device run continues on 2x2 FSDP or on 1 device as on 4.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rectflow_jax import checkpoint, configlib, models, parallel, pipeline, train
from rectflow_jax.data import datasets


pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest fakes 8 CPUs)")

TRAIN = train.train  # before any test patches it
MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "1x8x1": (1, 8, 1), "2x2x2": (2, 2, 2)}


def mesh_of(sizes, devices=None):
    data, fsdp, tensor = sizes
    return parallel.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor},
                              devices=devices or jax.devices()[: data * fsdp * tensor])


def digits_config():
    config = configlib.load_config("configs/digits.py")
    config.model = dict(name="unet", ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    return config


def tiny_sd_config():
    """digits_text's recipe with a smaller UNet (cross-attention, 4 heads) and text encoder."""
    config = configlib.load_config("configs/digits_text.py")
    config.model.unet.update(block_out_channels=(16, 32), attention_head_dim=4, norm_num_groups=8,
                             cross_attention_dim=16)
    config.model.text_encoder.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=4)
    return config


def short_run(config, num_steps=20):
    config.optim.update(warmup_steps=0, lr=1e-3)
    config.train.update(batch_size=16, num_steps=num_steps, log_every=1, checkpoint_every=num_steps)
    return config


def train_on_mesh(config, stage_dir, mesh, monkeypatch):
    """pipeline.train_stage's 1-RF (or teacher) stage on `mesh`: (losses, compiled stats)."""
    results = []

    def on_mesh(config, stage_dir, stage, *, mesh=None, progress=True):
        results.append(TRAIN(config, stage_dir, stage, mesh=chosen, progress=False))
        return results[-1]

    chosen = mesh
    monkeypatch.setattr(train, "train", on_mesh)
    pipeline.train_stage(config, stage_dir, "rf", progress=False)
    stats = json.loads((stage_dir / "compiled.json").read_text())
    return np.asarray([h["loss"] for h in results[-1].history]), stats


@pytest.mark.slow
@pytest.mark.parametrize("model", ["digits_unet", "tiny_sd_unet"])
def test_every_mesh_trains_like_one_device_and_fsdp_divides_the_state(model, tmp_path, monkeypatch):
    make = {"digits_unet": digits_config, "tiny_sd_unet": tiny_sd_config}[model]
    one, one_stats = train_on_mesh(short_run(make()), tmp_path / "one", mesh_of((1, 1, 1)), monkeypatch)
    assert len(one) == 20 and np.all(np.isfinite(one))
    state_bytes = {"1x1x1": one_stats["argument_bytes"]}
    for name, sizes in MESHES.items():
        losses, stats = train_on_mesh(short_run(make()), tmp_path / name, mesh_of(sizes), monkeypatch)
        print(f"{model} {name}: max relative loss difference {np.max(np.abs(losses - one) / np.abs(one)):.2e}")
        np.testing.assert_allclose(losses, one, rtol=1e-5, atol=1e-6, err_msg=f"mesh {name}")
        assert stats["mesh"] == dict(zip(parallel.MESH_AXES, sizes))
        state_bytes[name] = stats["argument_bytes"]
    # Arguments: params, EMA and Adam moments (4 copies), the batch and the key. Replicated over
    # 'data'; FSDP divides them by its size (small biases and norms stay whole: "about").
    print(model, "per-device argument bytes:", state_bytes)
    assert state_bytes["8x1x1"] == pytest.approx(state_bytes["1x1x1"], rel=0.05)
    assert 0.2 < state_bytes["2x4x1"] / state_bytes["8x1x1"] < 0.35
    assert 0.1 < state_bytes["1x8x1"] / state_bytes["8x1x1"] < 0.2
    assert state_bytes["2x2x2"] / state_bytes["8x1x1"] < 0.6


def _accumulation_setup(microbatches):
    dataset = datasets.get_dataset(digits_config().data)
    model = models.build_velocity_model(digits_config().model, dataset.shape, dataset.num_classes)
    tx = optax.adamw(1e-3)
    step = train.make_train_step(
        model, tx, objective="flow", loss=train.plain_loss("l2"), time_sampler=lambda k, n: jax.random.uniform(k, (n,)),
        source_fn=dataset.sample_source, ema_decay=lambda t: jnp.asarray(0.99), microbatches=microbatches)
    params = models.init_params(model, jax.random.key(0), dataset.shape, dataset.num_classes)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                             opt_state=tx.init(params))
    batches = [next(dataset.batches(32, 0, i)) for i in range(3)]
    return step, state, batches


@pytest.mark.slow
@pytest.mark.parametrize("devices", [4])  # one device: the same program without the sharding (CI time)
def test_four_microbatches_of_8_make_the_step_of_one_batch_of_32(devices):
    mesh = mesh_of((devices, 1, 1))
    finals = {}
    for microbatches in (1, 4):
        step, state, batches = _accumulation_setup(microbatches)
        jitted = jax.jit(step, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh),
                                             parallel.replicated(mesh)))
        losses = []
        for batch in batches:
            state, metrics = jitted(state, batch, jax.random.key(1))
            losses.append(float(metrics["loss"]))
        finals[microbatches] = (np.asarray(losses), jax.device_get(state.params))
    (losses_1, params_1), (losses_4, params_4) = finals[1], finals[4]
    np.testing.assert_allclose(losses_4, losses_1, rtol=1e-5)
    # Adam divides by the gradient's own scale, so summation-order rounding in a near-zero
    # gradient moves a parameter by up to ~1e-6 after three steps: compared to 1e-5.
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(params_4),
                                                            jax.tree_util.tree_leaves(params_1))]
    print(f"{devices} devices: loss diff {np.max(np.abs(losses_4 - losses_1)):.2e}, param diff {max(diffs):.2e}")
    assert max(diffs) < 1e-5
    # Changed params: the comparison is not of three no-op steps.
    _, start, _ = _accumulation_setup(1)
    assert max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(
        jax.tree_util.tree_leaves(params_1), jax.tree_util.tree_leaves(start.params))) > 1e-4


def test_a_batch_that_does_not_split_into_the_microbatches_is_refused():
    step, state, batches = _accumulation_setup(5)
    with pytest.raises(configlib.ConfigError, match="train.microbatches=5"):
        jax.jit(step)(state, batches[0], jax.random.key(1))


def _final_params(stage_dir):
    dataset = datasets.get_dataset(digits_config().data)
    model = models.build_velocity_model(digits_config().model, dataset.shape, dataset.num_classes)
    abstract = train.abstract_params(model, dataset.shape, dataset.num_classes)
    return {which: jax.device_get(checkpoint.restore_params(stage_dir, abstract, which=which))
            for which in ("params", "ema_params")}


@pytest.mark.slow
def test_a_4_device_checkpoint_continues_on_2x2_fsdp_and_on_1_device_as_on_4(tmp_path, monkeypatch):
    four = jax.devices()[:4]

    def continued(num_steps):
        config = short_run(digits_config(), num_steps=num_steps)
        config.optim.ema_decay = 0.9  # the EMA moves visibly in 12 steps
        # Biases just before a GroupNorm have a zero gradient up to rounding; Adam's default eps
        # (1e-8) turns that noise into steps of ~1e-6 whose sign any change of summation order
        # flips. A larger eps keeps them still, so the comparison sees the restore, not the noise.
        config.optim.eps = 1e-6
        return config

    config = continued(6)
    train_on_mesh(config, tmp_path / "first", mesh_of((4, 1, 1), four), monkeypatch)
    finals = {}
    for name, sizes in {"4x1x1": (4, 1, 1), "2x2x1": (2, 2, 1), "1x1x1": (1, 1, 1)}.items():
        stage = tmp_path / name
        shutil.copytree(tmp_path / "first", stage)
        more = continued(12)
        losses, _ = train_on_mesh(more, stage, mesh_of(sizes, four[: int(np.prod(sizes))]), monkeypatch)
        assert len(losses) == 6, name  # resumed at step 6, not retrained
        finals[name] = _final_params(stage)
    reference = finals.pop("4x1x1")
    for name, params in finals.items():
        for which in reference:
            pairs = list(zip(jax.tree_util.tree_leaves(params[which]), jax.tree_util.tree_leaves(reference[which])))
            print(f"{name} {which}: max |diff| {max(float(np.max(np.abs(a - b))) for a, b in pairs):.2e}")
            for a, b in pairs:
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"{name} {which}")
