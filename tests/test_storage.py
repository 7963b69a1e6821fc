"""Paths through rectflow_jax.storage: every stage's files land where a local path or a gs:// URL says.

The gs:// cases run on a fake bucket: etils' path class is made to send gs://fake-bucket/...
to a backend that maps it onto a local directory and hands out file objects with only
what tf.io.gfile.GFile has (no fileno, no readinto; a write appears when it is closed, as
a GCS object does). The old bug, pathlib turning "gs://b/run" into the local directory
"gs:/b/run", cannot pass: the tests run in an empty working directory and fail if
anything named "gs:" appears under it, and they look for the files in the bucket.
"""

import contextlib
import io
import json
import os
import pathlib
import types

import jax
import ml_collections
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from PIL import Image

from rectflow_jax import checkpoint, configlib, parallel, pipeline, plots, sd_folder, storage, teachers, text_eval, train
from rectflow_jax.data import pairs
from rectflow_jax.models import MLPVelocity
from rectflow_jax.weights import WeightLoadError

BUCKET = "gs://fake-bucket"


class FakeGFile:
    """A file of the fake bucket, with tf.io.gfile.GFile's methods only."""

    def __init__(self, local: str, mode: str):
        if mode.replace("b", "") not in ("r", "w"):
            raise ValueError(f"the fake bucket opens files for 'r' or 'w', not {mode!r}")
        self.mode, self._local, self._binary = mode, local, "b" in mode
        if "r" in mode:
            self._file = open(local, "rb") if self._binary else open(local, encoding="utf-8")
        else:  # an object is uploaded whole when closed
            self._file = io.BytesIO() if self._binary else io.StringIO()

    def read(self, n=-1):
        return self._file.read(n)

    def readline(self):
        return self._file.readline()

    def readlines(self):
        return self._file.readlines()

    def write(self, data):
        return self._file.write(data)

    def seek(self, offset, whence=0):
        return self._file.seek(offset, whence)

    def tell(self):
        return self._file.tell()

    def seekable(self):
        return True

    def size(self):
        return os.path.getsize(self._local)

    def flush(self):
        pass

    def close(self):
        if self._file.closed:
            return
        if "w" in self.mode:
            os.makedirs(os.path.dirname(self._local), exist_ok=True)  # a bucket has no directories to make first
            data = self._file.getvalue()
            with open(self._local, "wb") as handle:
                handle.write(data if self._binary else data.encode("utf-8"))
        self._file.close()


class BucketBackend(epath_backend._OsPathBackend):
    """gs://fake-bucket/... on the local directory `root`/fake-bucket; local paths (the other side of a
    copy) pass as they are. What it returns (glob, walk) is in URLs again."""

    def __init__(self, root: pathlib.Path):
        self.root = str(root)

    def local(self, p) -> str:
        p = os.fspath(p)
        if not p.startswith("gs://"):
            return p
        assert p == BUCKET or p.startswith(BUCKET + "/"), f"only {BUCKET} exists, not {p}"
        return os.path.join(self.root, p[len("gs://"):])

    def url(self, local: str) -> str:
        return "gs://" + os.path.relpath(local, self.root)

    def open(self, path, mode):
        return contextlib.closing(FakeGFile(self.local(path), mode))  # as tf's backend: use it in a `with`

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):
        return super().listdir(self.local(path))

    def glob(self, path):
        return [self.url(p) for p in super().glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.url(os.fspath(root)), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        return super().rmtree(self.local(path))

    def remove(self, path):
        return super().remove(self.local(path))

    def rename(self, path, dst):
        return super().rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        return super().replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        return super().copy(self.local(path), self.local(dst), overwrite)

    def stat(self, path):
        return super().stat(self.local(path))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The fake bucket's directory (gs://fake-bucket/x is bucket / 'x'); the test runs in an empty cwd."""
    fake = BucketBackend(tmp_path / "store")
    (tmp_path / "store" / "fake-bucket").mkdir(parents=True)
    # Where epath picks a path's backend: gs:// would go to tf.io.gfile, everything else to the os.
    monkeypatch.setattr(gpath._GPath, "_backend",
                        property(lambda self: fake if self._uri_scheme == "gs" else epath_backend.os_backend))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield tmp_path / "store" / "fake-bucket"
    mangled = [str(p) for p in tmp_path.rglob("gs:*")]
    assert not mangled, f"a gs:// URL went through pathlib and was written locally: {mangled}"


@pytest.fixture(params=["local", "gs"])
def where(request, bucket):
    """(path to give, directory where its files must appear): a relative local path, or a URL."""
    if request.param == "local":
        return "runs/x", pathlib.Path.cwd() / "runs" / "x"
    return f"{BUCKET}/runs/x", bucket / "runs" / "x"


@pytest.fixture
def managers(monkeypatch):
    """The directories Orbax's CheckpointManager is given. Orbax writes the arrays through TensorStore's
    own gcs driver, which goes around epath and so cannot be served by the fake bucket: the manager is
    replaced, and what is checked is that it gets the URL unmangled (Orbax takes epath paths and URLs)."""
    seen = []

    class Manager:
        def __init__(self, directory, options=None, item_names=None):
            seen.append(directory)
            if options.create:  # as Orbax does
                storage.path(directory).mkdir(parents=True, exist_ok=True)

        def latest_step(self):
            return None

        def save(self, *args, **kwargs):
            return True

        def wait_until_finished(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", Manager)
    return seen


def test_the_fake_bucket_catches_what_pathlib_does_to_a_url(bucket):
    pathlib.Path(f"{BUCKET}/runs").mkdir(parents=True)  # the old bug: a local directory 'gs:'
    mangled = pathlib.Path.cwd() / "gs:"
    assert (mangled / "fake-bucket" / "runs").is_dir() and not (bucket / "runs").exists()
    for folder in (mangled / "fake-bucket" / "runs", mangled / "fake-bucket", mangled):  # or the fixture fails
        folder.rmdir()
    storage.path(f"{BUCKET}/runs").mkdir(parents=True)
    assert (bucket / "runs").is_dir()
    (bucket / "runs" / "f").write_bytes(b"abc")
    with storage.path(f"{BUCKET}/runs/f").open("rb") as handle:  # what tf.io.gfile offers, no more
        assert handle.read() == b"abc" and not hasattr(handle, "readinto") and not hasattr(handle, "fileno")
    with pytest.raises(ValueError, match="went through pathlib"):
        storage.path(pathlib.Path(f"{BUCKET}/runs"))


def test_the_helpers_write_whole_files_where_the_path_says(where):
    url, disk = where
    storage.path(url).mkdir(parents=True, exist_ok=True)
    assert storage.is_remote(url) == url.startswith("gs://")
    assert str(storage.path(url) / "a.json") == f"{url}/a.json"
    storage.write_json(f"{url}/a.json", {"b": 1, "a": [1, 2]})
    storage.write_text_atomic(storage.path(url) / "t.md", "‖ ∫ text\n")
    storage.save_npz(storage.path(url) / "s.npz", {"x": np.arange(6.0).reshape(2, 3), "n": 3})
    assert json.loads((disk / "a.json").read_text()) == {"a": [1, 2], "b": 1}
    assert (disk / "a.json").read_text().startswith('{\n  "a"')  # indent 2, sorted keys, as before
    assert (disk / "t.md").read_text(encoding="utf-8") == "‖ ∫ text\n"
    with np.load(disk / "s.npz") as stored:
        np.testing.assert_array_equal(stored["x"], np.arange(6.0).reshape(2, 3))
    assert sorted(p.name for p in disk.iterdir()) == ["a.json", "s.npz", "t.md"]  # no temporary left
    storage.copy_tree(url, f"{url}-copy")
    assert sorted(p.name for p in disk.with_name("x-copy").iterdir()) == ["a.json", "s.npz", "t.md"]
    with storage.local_copy(url) as local:
        assert not storage.is_remote(local) and (pathlib.Path(local) / "t.md").read_text(encoding="utf-8")
    storage.remove_tree(f"{url}-copy")
    storage.remove_tree(f"{url}-copy")  # gone already: nothing to do
    assert not disk.with_name("x-copy").exists()


def _shard(index):
    ids = 100 * index + np.arange(7 + index)
    return {"x0": np.stack([ids, -ids], 1).astype(np.float32), "x1": np.stack([ids + 0.5, ids], 1).astype(np.float32),
            "label": (ids % 3).astype(np.int32), "prompt": np.asarray([f"p{i}" for i in ids])}


def test_pairs_written_inspected_and_read_back(where, tmp_path):
    url, disk = where
    meta, notes = {"shape": [2], "teacher_run_hash": "h"}, {"teacher": f"{url}/1rf"}
    made = pairs.write_pair_shards(f"{url}/pairs", _shard, 3, meta, notes=notes, progress=False,
                                   process_index=0, process_count=1)
    assert [str(p) for p in made] == [f"{url}/pairs/{pairs.shard_name(i, 3)}" for i in range(3)]
    assert sorted(p.name for p in (disk / "pairs").iterdir()) == [pairs.shard_name(i, 3) for i in range(3)] + [
        "pairs.json"]
    assert json.loads((disk / "pairs" / "pairs.json").read_text())["teacher"] == f"{url}/1rf"
    info = pairs.inspect_pairs(f"{url}/pairs")
    assert info["files"] == [str(p) for p in made] and info["shard_lengths"] == [7, 8, 9]
    # A rerun finds every shard and makes none; another setting is refused.
    pairs.write_pair_shards(f"{url}/pairs", lambda i: pytest.fail("remade a shard"), 3, meta, notes=notes,
                            progress=False, process_index=0, process_count=1)
    with pytest.raises(pairs.PairDataError, match="other settings"):
        pairs.write_pair_shards(f"{url}/pairs", _shard, 3, dict(meta, shape=[3]), notes=notes, progress=False,
                                process_index=0, process_count=1)
    # Read back (row ranges seeked to in each shard) as the same set on local disk reads.
    pairs.write_pair_shards(tmp_path / "reference", _shard, 3, meta, progress=False, process_index=0, process_count=1)
    with pairs.pair_batches(f"{url}/pairs", 6, 0, start_step=1) as got, \
            pairs.pair_batches(tmp_path / "reference", 6, 0, start_step=1) as want:
        for _ in range(4):
            a, b = next(got), next(want)
            assert sorted(a) == ["label", "x0", "x1"]
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_checkpoints_go_to_the_url_orbax_is_given(where, managers):
    url, disk = where
    ckpt = checkpoint.Checkpointer(f"{url}/1rf", save_every=1, keep=2)
    ckpt.close()
    if url.startswith("gs://"):
        assert str(managers[-1]) == f"{url}/1rf/checkpoints"  # not resolved into a local path
    else:
        assert pathlib.Path(managers[-1]) == (disk / "1rf" / "checkpoints").resolve()  # absolute, as before
    assert checkpoint.latest_step(f"{url}/2rf") is None and not disk.joinpath("2rf").exists()
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.read_meta(f"{url}/2rf")
    assert (disk / "1rf" / "checkpoints").is_dir()  # made by the (fake) manager, through epath
    with pytest.raises(checkpoint.CheckpointError, match="no finished checkpoint"):
        checkpoint.read_meta(f"{url}/1rf")
    assert str(managers[-1]) == str(managers[0])
    checkpoint.write_json(storage.path(url) / "1rf" / "compiled.json", {"flops": 1.0})
    assert json.loads((disk / "1rf" / "compiled.json").read_text()) == {"flops": 1.0}


def test_train_writes_compiled_json_and_tensorboard_under_the_stage(where, managers, monkeypatch):
    import tensorflow as tf

    url, disk = where
    writers = []
    monkeypatch.setattr(tf.summary, "create_file_writer", lambda logdir: writers.append(logdir))  # None: no logs

    def batches(batch_size, seed, start, shard=(0, 1)):
        rng = np.random.default_rng(seed)
        while True:
            yield {"x1": rng.normal(size=(batch_size, 2)).astype(np.float32)}

    config = configlib.base_config()
    config.data.name = "toy"
    config.model = dict(name="mlp", hidden=8, depth=1, time_embed_dim=4)
    config.train.update(batch_size=8, num_steps=2, log_every=1, checkpoint_every=2)
    stage = train.Stage(name="toy", objective="flow", model=MLPVelocity(hidden=8, depth=1, time_embed_dim=4),
                        shape=(2,), num_classes=0, source_fn=lambda key, n: jax.random.normal(key, (n, 2)),
                        batches=batches, init_params=None, identity={})
    result = train.train(config, f"{url}/1rf", stage, mesh=parallel.make_mesh({}, devices=jax.devices()[:1]),
                         progress=False)
    assert len(result.history) == 2
    assert writers == [f"{url}/1rf/tensorboard"]  # the URL string: tf.summary writes gs:// itself
    assert isinstance(json.loads((disk / "1rf" / "compiled.json").read_text()), dict)
    assert str(managers[0]).endswith("1rf/checkpoints") and ("://" in str(managers[0])) == url.startswith("gs://")


def test_the_report_and_its_pictures_go_under_the_workdir(where, monkeypatch):
    url, disk = where
    config = configlib.base_config()
    config.data.name = "2gmm"
    config.eval.num_samples = 64

    def fake_evaluation(config, stage_dir):  # the report's own writing is under test, not the stages
        assert str(stage_dir).startswith(url)
        x1 = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
        row = {"energy_distance": 0.5, "transport_cost": 1.0, "gap_to_finest": 0.1}
        return {"straightness": 0.2, "steps": {"1": row, "4": dict(row, gap_to_finest=0.0)},
                "outputs": {1: x1, 4: x1}, "trajectory": np.stack([x1 * 0, x1 * 0.5, x1])}

    monkeypatch.setattr(pipeline, "evaluate_stage", fake_evaluation)
    report = pipeline.write_report(config, url)
    assert report["stages"]["1rf"]["straightness"] == 0.2
    out = disk / "report"
    assert json.loads((out / "metrics.json").read_text())["metric"] == "energy_distance"
    assert "![1-RF trajectories](1rf_trajectories.png)" in (out / "report.md").read_text(encoding="utf-8")
    pictures = sorted(p.name for p in out.glob("*.png"))
    assert pictures == sorted(f"{s}_{k}.png" for s in ("1rf", "2rf", "distill") for k in ("1step", "4step", "trajectories"))
    with Image.open(out / "1rf_1step.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
    assert plots.save_png(np.zeros((4, 4, 3)), f"{url}/report/small.png") == storage.path(f"{url}/report/small.png")
    with Image.open(out / "small.png") as image:
        assert image.size == (4, 4)


def test_a_stage_tokenizer_is_staged_and_copied_under_the_stage(where):
    url, disk = where
    prompts = ["a photo of a cat", "a drawing of a dog", "a cat and a dog"]
    dataset = types.SimpleNamespace(name="captions", prompt_source=lambda: types.SimpleNamespace(all_prompts=prompts))
    model = types.SimpleNamespace(text_encoder=types.SimpleNamespace(max_position_embeddings=16, vocab_size=10**5))
    first = pipeline.stage_tokenizer(f"{url}/teacher", dataset, model, None)
    assert (disk / "teacher" / "tokenizer" / "vocab.json").is_file()
    assert sorted(p.name for p in (disk / "teacher").iterdir()) == ["tokenizer"]  # the staging folder renamed
    second = pipeline.stage_tokenizer(f"{url}/2rf", dataset, model, f"{url}/teacher")  # the teacher's, copied
    assert sorted(p.name for p in (disk / "2rf" / "tokenizer").iterdir()) == sorted(
        p.name for p in (disk / "teacher" / "tokenizer").iterdir())
    assert second(prompts[2])["input_ids"] == first(prompts[2])["input_ids"]
    again = pipeline.stage_tokenizer(f"{url}/2rf", dataset, model, None)  # there already: loaded, not made
    assert again(prompts[0])["input_ids"] == first(prompts[0])["input_ids"]


def test_text_eval_keeps_its_record_shards_and_metrics_under_out(where, monkeypatch):
    """evaluate_text_to_image with its measuring networks and the model faked: its files are under test."""
    url, disk = where
    captions = [types.SimpleNamespace(caption=f"caption {i}") for i in range(5)]
    protocol = types.SimpleNamespace(name="fake", shard_size=2, fid_resolution=8, grid_size=3, pairs=lambda: captions)
    features = lambda images: images.reshape(len(images), -1)[:, :4].astype(np.float32) + np.arange(4)
    measures = types.SimpleNamespace(features=features, clip_scores=lambda images, prompts: np.full(len(images), 0.3))
    made = []

    class Generator:
        seconds, timed = 1.0, 1

        def __init__(self, config, pipe):
            pass

        def __call__(self, indices, prompts):
            made.extend(indices.tolist())
            return np.random.default_rng(indices).integers(0, 255, (len(indices), 8, 8, 3), dtype=np.uint8)

    monkeypatch.setattr(text_eval.Protocol, "from_config", staticmethod(lambda eval_config: protocol))
    monkeypatch.setattr(text_eval, "Measures", lambda protocol: measures)
    monkeypatch.setattr(text_eval, "run_settings", lambda config, pipe, protocol, measures: {"model": "m"})
    monkeypatch.setattr(text_eval, "reference_statistics", lambda *args: (np.zeros(4), np.eye(4), "stats.npz"))
    monkeypatch.setattr(text_eval, "_Generator", Generator)
    config = types.SimpleNamespace(eval=None)
    metrics = text_eval.evaluate_text_to_image(config, None, f"{url}/eval", progress=False, process_index=0,
                                               process_count=1)
    assert metrics["images"] == 5 and made == [0, 1, 2, 3, 4]
    out = disk / "eval"
    assert json.loads((out / "eval.json").read_text()) == {"model": "m"}
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"shard_{k:05d}.npz" for k in range(3)]
    assert json.loads((out / "metrics.json").read_text())["fid"] == pytest.approx(metrics["fid"])
    assert (out / "grid.txt").read_text().startswith("0: caption 0") and (out / "grid.png").is_file()
    (out / "shards" / "shard_00002.npz").unlink()  # a killed run: only the missing shard is made again
    again = text_eval.evaluate_text_to_image(config, None, f"{url}/eval", progress=False, process_index=0,
                                             process_count=1)
    assert made[5:] == [4] and again["fid"] == pytest.approx(metrics["fid"])
    monkeypatch.setattr(text_eval, "run_settings", lambda *args: {"model": "other"})
    with pytest.raises(text_eval.EvalDataError, match="other settings"):
        text_eval.evaluate_text_to_image(config, None, f"{url}/eval", progress=False, process_index=0, process_count=1)


def test_a_remote_pretrained_folder_is_refused_with_advice(bucket):
    (bucket / "sd").mkdir()
    (bucket / "sd" / "model_index.json").write_text("{}")
    assert sd_folder.is_pipeline_folder(f"{BUCKET}/sd")
    for read in (sd_folder.read_model_index, sd_folder.read_scheduler_config, sd_folder.fingerprint,
                 teachers.teacher_provenance):
        with pytest.raises(WeightLoadError, match="is remote.*copy it locally"):
            read(f"{BUCKET}/sd")
    with pytest.raises(text_eval.EvalDataError, match="eval.clip_model .* is remote"):
        text_eval.Protocol.from_config(ml_collections.ConfigDict(
            {"protocol": "coco", "captions": "c.json", "inception_weights": "w.pth", "clip_model": f"{BUCKET}/clip"}))
