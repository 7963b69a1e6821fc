"""Pairs from a teacher: their own x0 stream, the teacher's source, provenance, and the ODE itself."""

import json
import shutil

import numpy as np
import pytest

from rectflow_jax import checkpoint, configlib, models, pipeline, sampling, teachers, train
from rectflow_jax.data import datasets, pairs


def tiny(data="moons", num_steps=4, **data_options):
    config = configlib.base_config()
    config.data = dict(name=data, **data_options)
    config.model = dict(name="mlp", hidden=16, depth=1, time_embed_dim=8)
    config.optim.warmup_steps = 0
    config.train.update(batch_size=16, num_steps=num_steps, log_every=num_steps, checkpoint_every=num_steps)
    config.pairs.update(num_pairs=40, shard_size=20, num_steps=3, batch_size=20)
    config.mesh.data = 1  # fake devices only slow a 2-core CPU down
    return config


def x0_of(pair_dir):
    return np.concatenate([np.load(f)["x0"] for f in sorted(pair_dir.glob("*.npz"))])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="module")
def moons_1rf(work):
    return pipeline.train_stage(tiny(), work / "moons_1rf", "rf", progress=False)


@pytest.fixture(scope="module")
def moons_pairs(moons_1rf, work):
    return pipeline.generate_pairs(tiny(), moons_1rf, work / "moons_pairs", progress=False)


@pytest.fixture(scope="module")
def moons_2rf(moons_1rf, moons_pairs, work):
    return pipeline.train_stage(tiny(), work / "moons_2rf", "reflow", pairs_dir=moons_pairs,
                                teacher_dir=moons_1rf, progress=False)


def test_each_teacher_draws_its_own_x0(moons_1rf, moons_pairs, moons_2rf, tmp_path):
    """1-RF and 2-RF pairs of one seed used to share x0: the 2-RF coupling re-paired the same noise."""
    again = pipeline.generate_pairs(tiny(), moons_1rf, tmp_path / "again", progress=False)
    np.testing.assert_array_equal(x0_of(again), x0_of(moons_pairs))  # same teacher: same x0
    reflow = moons_2rf
    pairs_2rf = pipeline.generate_pairs(tiny(), reflow, tmp_path / "pairs_2rf", progress=False)
    assert not np.allclose(x0_of(pairs_2rf), x0_of(moons_pairs), atol=0.1)
    # The student's stream is its own too: it records where its inputs came from.
    meta, _ = checkpoint.read_meta(reflow)
    teacher_meta, teacher_step = checkpoint.read_meta(moons_1rf)
    assert meta["run_hash"] != teacher_meta["run_hash"]
    assert meta["run"]["identity"]["pairs_teacher_run_hash"] == teacher_meta["run_hash"]
    assert meta["run"]["identity"]["teacher_step"] == teacher_step


def test_pairs_start_from_the_teachers_own_source(moons_1rf, work, tmp_path):
    """A moons teacher (pi0 = N(0, I)) given a 2-GMM config used to integrate from 2-GMM noise."""
    with pytest.raises(teachers.IncompatibleTeacher, match="source .*standard normal.*mixture"):
        pipeline.generate_pairs(tiny("2gmm"), moons_1rf, tmp_path / "wrong", progress=False)
    assert not (tmp_path / "wrong").exists()
    with pytest.raises(teachers.IncompatibleTeacher, match="source"):
        pipeline.sample(tiny("2gmm"), moons_1rf, tmp_path / "samples")

    gmm_1rf = pipeline.train_stage(tiny("2gmm"), work / "gmm_1rf", "rf", progress=False)
    with pytest.raises(teachers.IncompatibleTeacher, match="source .*mixture.*standard normal"):
        pipeline.generate_pairs(tiny("moons"), gmm_1rf, tmp_path / "wrong", progress=False)
    x0 = x0_of(pipeline.generate_pairs(tiny("2gmm"), gmm_1rf, tmp_path / "gmm", progress=False))
    assert np.all(np.abs(x0[:, 0] + 5) < 2.5) and np.all(np.abs(np.abs(x0[:, 1]) - 5) < 2.5)
    assert 0 < np.mean(x0[:, 1] > 0) < 1  # both source modes
    # Another data set with the same source is fine: pairs come from the teacher's flow.
    x0 = x0_of(pipeline.generate_pairs(tiny("8gaussians"), moons_1rf, tmp_path / "same", progress=False))
    assert np.abs(x0).max() < 5 and 0.6 < x0.std() < 1.4


def test_pairs_name_their_teacher_checkpoint_and_refuse_another(moons_1rf, moons_pairs, moons_2rf, tmp_path):
    written = json.loads((moons_pairs / pairs.META_FILE).read_text())
    meta, step = checkpoint.read_meta(moons_1rf)
    assert (written["teacher_run_hash"], written["teacher_step"]) == (meta["run_hash"], step) == (meta["run_hash"], 4)
    # Copies of the stages, as a workdir would hold them, so that the teacher can train on.
    teacher, pair_dir, student = (shutil.copytree(d, tmp_path / d.name) for d in (moons_1rf, moons_pairs, moons_2rf))
    pipeline.generate_pairs(tiny(), teacher, pair_dir, progress=False)  # finds its pairs there

    # The teacher trains on (a longer run of the same config): its pairs are stale, even
    # though every shard exists, and so is the finished student made from them.
    pipeline.train_stage(tiny(num_steps=6), teacher, "rf", progress=False)
    with pytest.raises(pairs.PairDataError, match="teacher_step: 4 -> 6"):
        pipeline.generate_pairs(tiny(), teacher, pair_dir, progress=False)
    fresh = pipeline.generate_pairs(tiny(), teacher, tmp_path / "fresh", progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="different run.*teacher_step"):
        pipeline.train_stage(tiny(), student, "reflow", pairs_dir=fresh, teacher_dir=teacher, progress=False)


class Killed(Exception):
    pass


def stopped_after(config, stage_dir, steps):
    """A stage whose run stopped (killed) after `steps` steps of config.train.num_steps."""
    dataset = datasets.get_dataset(config.data)

    def batches(batch_size, seed, start, shard=(0, 1)):
        stream = dataset.batches(batch_size, seed, start, shard)
        for _ in range(steps - start):
            yield next(stream)
        raise Killed

    stage = train.Stage(name="stopped", objective="flow", shape=dataset.shape, num_classes=0,
                        model=models.build_velocity_model(config.model, dataset.shape, 0),
                        source_fn=dataset.sample_source, batches=batches)
    with pytest.raises(Killed):
        train.train(configlib.stage_config(config, "rf"), stage_dir, stage, progress=False)
    return stage_dir


def test_unfinished_or_untraceable_teachers_are_refused(moons_pairs, moons_1rf, tmp_path, monkeypatch):
    config = tiny()
    config.train.checkpoint_every = 2
    stopped = stopped_after(config, tmp_path / "stopped", steps=2)
    assert checkpoint.latest_step(stopped) == 2
    with pytest.raises(teachers.IncompatibleTeacher, match="stopped' is at step 2 of 4"):
        pipeline.generate_pairs(tiny(), stopped, tmp_path / "pairs", progress=False)
    with pytest.raises(teachers.IncompatibleTeacher, match="step 2 of 4"):
        pipeline.train_stage(tiny(), tmp_path / "distill", "distill", pairs_dir=moons_pairs, teacher_dir=stopped)
    assert not (tmp_path / "pairs").exists() and not (tmp_path / "distill").exists()

    # Pairs from before pairs.json named the teacher's checkpoint cannot be traced.
    old_pairs = shutil.copytree(moons_pairs, tmp_path / "old_pairs")
    written = json.loads((old_pairs / pairs.META_FILE).read_text())
    for key in ("teacher_run_hash", "teacher_step", "source"):
        del written[key]
    (old_pairs / pairs.META_FILE).write_text(json.dumps(written))
    with pytest.raises(pairs.PairDataError, match="older rectflow_jax .*teacher_run_hash"):
        pipeline.train_stage(tiny(), tmp_path / "2rf", "reflow", pairs_dir=old_pairs, teacher_dir=moons_1rf)

    # Nor can a teacher from before run hashes.
    read_meta = checkpoint.read_meta

    def without_run_hash(stage_dir):
        meta, step = read_meta(stage_dir)
        return {k: v for k, v in meta.items() if k != "run_hash"}, step

    monkeypatch.setattr(checkpoint, "read_meta", without_run_hash)
    with pytest.raises(teachers.IncompatibleTeacher, match="moons_1rf' was written by an older rectflow_jax"):
        pipeline.generate_pairs(tiny(), moons_1rf, tmp_path / "pairs", progress=False)


@pytest.mark.slow  # a UNet teacher: ~40 s on 2 cores
def test_pair_x1_is_the_teachers_ode_from_x0(tmp_path):
    """Class-conditional digits; 13 pairs in shards of 11 and 2, chunks of 8 rows over 8 devices."""
    config = tiny("digits", num_steps=1, class_conditional=True)
    config.model = dict(name="unet", ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    config.optim.lr = 3e-2  # one step moves the zero-initialised blocks far enough for the labels to matter
    config.pairs.update(num_pairs=13, shard_size=11, batch_size=6, num_steps=3, method="heun")
    stage = pipeline.train_stage(config, tmp_path / "1rf", "rf", progress=False)
    pair_dir = pipeline.generate_pairs(config, stage, tmp_path / "pairs", progress=False)
    teacher = teachers.load_velocity_teacher(stage)
    ode = sampling.make_sampler(teacher.apply_velocity, 3, method="heun")
    shards = [dict(np.load(f)) for f in sorted(pair_dir.glob("*.npz"))]
    assert [len(s["x0"]) for s in shards] == [11, 2]
    for shard in shards:
        assert len(shard["x1"]) == len(shard["label"]) == len(shard["x0"])
        expected = np.asarray(ode(teacher.params, shard["x0"], {"label": shard["label"]}).x1)
        np.testing.assert_allclose(shard["x1"], expected, rtol=1e-5, atol=1e-5)
    # The labels matter to this teacher, so the check above is also one of their alignment.
    first = shards[0]
    shifted = np.asarray(ode(teacher.params, first["x0"], {"label": (first["label"] + 1) % 10}).x1)
    assert np.abs(shifted - first["x1"]).max() > 1e-3
