"""Pairs, sampling and evaluation through the one driver, on any mesh: the outputs of one device.

Params are sharded by the logical rules (an 'fsdp' or 'tensor' axis splits the weights),
teachers are restored straight into those shardings, and the stages give the same
results on one device and on eight.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from rectflow_jax import checkpoint, models, parallel, pipeline, sampling, teachers, train
from rectflow_jax.batch_runner import BatchRunner
from rectflow_jax.configlib import load_config
from rectflow_jax.data import datasets

ROOT = Path(__file__).resolve().parents[1]
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest fakes 8 CPUs)")
MESHES = {"8x1x1": {"data": 8}, "2x4x1": {"data": 2, "fsdp": 4}, "1x2x4": {"data": 1, "fsdp": 2, "tensor": 4}}
MLP = {"name": "mlp", "hidden": 64, "depth": 2, "time_embed_dim": 16}  # widths divide by fsdp x tensor = 8


def mlp_solver(model, num_steps=4):
    apply = train.velocity_apply(model)
    return lambda params, x0, cond: sampling.integrate(lambda x, t: apply(params, x, t, cond), x0, num_steps).x1


def rule_shardings(model, shape, num_classes, mesh):
    abstract = train.abstract_params(model, shape, num_classes, mesh, parallel.logical_rules())
    return jax.tree.map(lambda leaf: leaf.sharding, abstract)


@pytest.fixture(scope="module")
def labelled():
    """An MLP on 2-D data with 3 classes, 37 rows (ragged for any chunk here), the one-device outputs."""
    model = models.build_velocity_model(MLP, (2,), 3)
    params = models.init_params(model, jax.random.key(0), (2,), 3)
    x0 = np.asarray(jax.random.normal(jax.random.key(1), (37, 2)), np.float32)
    labels = (np.arange(37) % 3).astype(np.int32)
    one = BatchRunner(mlp_solver(model), 8, mesh=parallel.make_mesh({"data": 1}))
    return model, params, x0, labels, one(params, x0, {"label": labels})


@needs_8
@pytest.mark.parametrize("name", MESHES)
def test_sharded_params_on_any_mesh_give_the_one_device_outputs(labelled, name):
    model, params, x0, labels, expected = labelled
    mesh = parallel.make_mesh(MESHES[name])
    runner = BatchRunner(mlp_solver(model), 16, mesh=mesh)
    placed = runner.place(params, rule_shardings(model, (2,), 3, mesh))
    split = [leaf for leaf in jax.tree.leaves(placed) if not leaf.sharding.is_fully_replicated]
    assert bool(split) == (name != "8x1x1")  # the weights are split wherever the mesh has fsdp or tensor
    np.testing.assert_allclose(runner(placed, x0, {"label": labels}), expected, rtol=1e-6, atol=1e-6)
    assert runner.fn._cache_size() == 1  # 3 chunks, the last one padded: one compilation


def fake_stage(stage: Path, config, *, seed: int = 0) -> Path:
    """A finished stage directory of config's model at random params: what a teacher load reads."""
    dataset = datasets.get_dataset(config.data)
    model = models.build_velocity_model(config.model, dataset.shape, dataset.num_classes)
    params = models.init_params(model, jax.random.key(seed), dataset.shape, dataset.num_classes)
    meta = {"shape": list(dataset.shape), "num_classes": dataset.num_classes, "model": config.model.to_dict(),
            "data": config.data.to_dict(), "num_steps": 1, "run_hash": f"fake{seed}"}
    saver = checkpoint.Checkpointer(stage, save_every=1, keep=1)
    saver.save(1, {"ema_params": params}, meta, force=True)
    saver.wait()
    saver.close()
    return stage


def toy(mesh: dict) -> "ml_collections.ConfigDict":  # noqa: F821
    config = load_config(str(ROOT / "configs" / "toy_2gmm.py"))
    config.model = dict(MLP)
    config.mesh.update(mesh)
    # Batches that one device and the meshes here chunk differently (rounded to whole rows per row shard).
    config.sample.update(num_samples=50, num_steps=3, batch_size=20)
    config.eval.update(num_samples=120, steps=(1, 3))
    config.pairs.update(num_pairs=50, shard_size=30, num_steps=3, batch_size=15)
    return config


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    return fake_stage(tmp_path_factory.mktemp("toy") / "stage", toy({}))


@needs_8
def test_teacher_restores_into_its_fsdp_shardings(stage):
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    teacher = teachers.load_velocity_teacher(stage, mesh=mesh)
    plain = teachers.load_velocity_teacher(stage)
    targets = rule_shardings(teacher.model, teacher.shape, teacher.num_classes, mesh)
    leaves, wanted = jax.tree.leaves(teacher.params), jax.tree.leaves(targets)
    assert all(leaf.sharding == want for leaf, want in zip(leaves, wanted))
    assert any(not leaf.sharding.is_fully_replicated for leaf in leaves)  # split over fsdp, not copied
    for leaf, ref in zip(leaves, jax.tree.leaves(plain.params)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))
    runner = BatchRunner(lambda params, x: x, 8, mesh=mesh)
    assert all(a is b for a, b in zip(jax.tree.leaves(runner.place(teacher.params)), leaves))  # no re-upload


@needs_8
def test_sd_folder_teacher_loads_sharded(tmp_path):
    from rectflow_jax.models.clip_text import CLIPTextModel
    from rectflow_jax.models.sd_unet import UNet2DConditionModel
    from rectflow_jax.random_folder import write_random_folder

    folder = write_random_folder(tmp_path / "sd")
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    teacher = teachers.load_sd_teacher(folder, mesh=mesh)
    for name, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        wanted = teachers.folder_shardings(cls, folder, name, mesh, parallel.logical_rules(), np.float32)
        leaves = jax.tree.leaves(teacher.params[name])
        assert all(leaf.sharding == want for leaf, want in zip(leaves, jax.tree.leaves(wanted))), name
        assert any(not leaf.sharding.is_fully_replicated for leaf in leaves), name


@needs_8
def test_sample_and_evaluate_stage_on_one_device_and_on_eight(stage, tmp_path):
    one, eight = toy({"data": 1}), toy({"data": 2, "fsdp": 4})
    a = pipeline.sample(one, stage, tmp_path / "one")
    b = pipeline.sample(eight, stage, tmp_path / "eight")
    np.testing.assert_array_equal(a["x0"], b["x0"])
    np.testing.assert_allclose(a["x1"], b["x1"], rtol=1e-6, atol=1e-6)
    assert a["x1"].shape == (50, 2) and (tmp_path / "eight" / "trajectories.png").stat().st_size > 0
    with np.load(tmp_path / "eight" / "samples.npz") as written:
        np.testing.assert_array_equal(written["x1"], b["x1"])

    a, b = pipeline.evaluate_stage(one, stage), pipeline.evaluate_stage(eight, stage)
    assert a["steps"].keys() == b["steps"].keys() == {"1", "3"}
    for steps in a["steps"]:
        np.testing.assert_allclose(a["outputs"][int(steps)], b["outputs"][int(steps)], rtol=1e-6, atol=1e-6)
        for metric, value in a["steps"][steps].items():
            assert b["steps"][steps][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), metric
    assert b["straightness"] == pytest.approx(a["straightness"], rel=1e-5) and a["straightness"] > 0
    assert a["trajectory"].shape == b["trajectory"].shape == (4, 120, 2)
    np.testing.assert_allclose(a["trajectory"], b["trajectory"], rtol=1e-6, atol=1e-6)


def test_straightness_is_the_mean_over_rows_without_the_padding(stage):
    """evaluate_velocity's per-row straightness, padded tail dropped, is flow.straightness of all rows."""
    from rectflow_jax import evaluate, flow

    config = toy({"data": 1})
    teacher = teachers.load_velocity_teacher(stage)
    dataset = datasets.get_dataset(config.data)
    x0 = np.asarray(dataset.sample_source(jax.random.key(3), 37), np.float32)
    result = evaluate.evaluate_velocity(teacher.apply_velocity, teacher.params, dataset, x0, None, steps=(1, 5),
                                        batch_size=16, mesh=parallel.make_mesh({"data": 1}))
    sol = sampling.make_sampler(teacher.apply_velocity, 5, return_trajectory=True)(teacher.params, x0)
    assert result["straightness"] == pytest.approx(float(flow.straightness(sol.trajectory, sol.times,
                                                                           sol.velocities)), rel=1e-5)
    np.testing.assert_allclose(result["trajectory"], np.asarray(sol.trajectory), rtol=1e-6, atol=1e-6)


@needs_8
def test_pairs_on_a_sharded_mesh_are_those_of_one_device(stage, tmp_path):
    with_run = toy({"data": 1})
    pipeline.generate_pairs(with_run, stage, tmp_path / "one", progress=False)
    pipeline.generate_pairs(toy({"data": 1, "fsdp": 2, "tensor": 4}), stage, tmp_path / "sharded", progress=False)
    files = sorted(p.name for p in (tmp_path / "one").glob("pairs-*.npz"))
    assert len(files) == 2 and files == sorted(p.name for p in (tmp_path / "sharded").glob("pairs-*.npz"))
    for name in files:
        with np.load(tmp_path / "one" / name) as a, np.load(tmp_path / "sharded" / name) as b:
            np.testing.assert_array_equal(a["x0"], b["x0"])
            np.testing.assert_allclose(a["x1"], b["x1"], rtol=1e-6, atol=1e-6)
            assert len(a["x1"]) == (30 if name == files[0] else 20)
