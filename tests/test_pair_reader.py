"""The pair reader and writer across processes: one global order whatever the process count, O(1)
resume, files read by the process whose rows they hold, every pair once per epoch; collective,
owner-only, preemptible writing."""

import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from rectflow_jax import preemption
from rectflow_jax.data import pairs

ROOT = Path(__file__).resolve().parents[1]
SEED = 5


def write_set(root, lengths, **kw):
    """Shards of these lengths; every array of row r of shard s holds the id 1000 s + r, so rows can be traced."""
    def make_shard(index):
        ids = 1000 * index + np.arange(lengths[index])
        return {"id": ids.astype(np.int64), "x0": np.stack([ids, -ids], 1).astype(np.float32),
                "x1": np.stack([ids + 0.5, ids + 0.25], 1).astype(np.float32),
                "label": (ids % 7).astype(np.int32), "prompt": np.asarray([f"pair {i}" for i in ids])}

    pairs.write_pair_shards(root, make_shard, len(lengths), {"shape": [2]}, progress=False, **kw)
    return root


def assert_aligned(batch):
    ids = batch["id"]
    np.testing.assert_array_equal(batch["x0"], np.stack([ids, -ids], 1).astype(np.float32))
    np.testing.assert_array_equal(batch["x1"], np.stack([ids + 0.5, ids + 0.25], 1).astype(np.float32))
    np.testing.assert_array_equal(batch["label"], ids % 7)


def global_batches(root, global_batch, count, steps, start=0, **kw):
    """Steps [start, start + steps) of `count` processes, their batches joined in process order."""
    readers = [pairs.pair_batches(root, global_batch // count, SEED, start, (i, count), **kw) for i in range(count)]
    out = []
    for _ in range(steps):
        parts = [next(reader) for reader in readers]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    for reader in readers:
        reader.close()
    return out


@pytest.fixture
def loads(monkeypatch):
    """Every shard load as (file name, keys, rows)."""
    seen = []
    real = pairs._load_shard

    def spy(path, keys=None, rows=None):
        seen.append((Path(path).name, tuple(keys or ()), rows))
        return real(path, keys, rows)

    monkeypatch.setattr(pairs, "_load_shard", spy)
    return seen


def shard_of(name):
    return int(name.split("-")[1])


def test_the_global_order_does_not_depend_on_the_process_count(tmp_path):
    root = write_set(tmp_path, [12] * 7 + [5])  # 89 pairs: 24 a step crosses epochs at uneven places
    assert pairs.num_lanes(8, 24) == 8
    one = global_batches(root, 24, 1, 12)
    for count in (2, 3, 4):  # 3 splits lanes between processes
        for k, (a, b) in enumerate(zip(one, global_batches(root, 24, count, 12))):
            assert a.keys() == b.keys() == {"id", "x0", "x1", "label"}
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{count} processes, step {k}, {key}")
    for batch in one:
        assert_aligned(batch)
    assert one[0]["x1"].dtype == np.float32 and one[0]["label"].dtype == np.int32 and one[0]["id"].dtype == np.int64
    assert len(np.unique(np.concatenate([b["id"] for b in one]))) == 89  # past three epochs: all of them


def test_a_resumed_reader_yields_the_same_batches_and_reads_nothing_before(tmp_path, loads):
    root = write_set(tmp_path, [10] * 12)  # two lanes of six files; a file lasts five steps of 4
    reference = [b["id"] for b in global_batches(root, 4, 1, 110, lanes=2)]
    for start in (1, 5, 29, 31, 67, 102):  # inside and at the edges of files and of epochs (30 steps)
        del loads[:]
        with pairs.pair_batches(root, 4, SEED, start, lanes=2, prefetch=1) as reader:
            np.testing.assert_array_equal(next(reader)["id"], reference[start], err_msg=f"start {start}")
            if start + 1 < len(reference):
                np.testing.assert_array_equal(next(reader)["id"], reference[start + 1])
        # At most the batches in hand, one queued and one being made were read: their files only, each once.
        needed = {int(i) // 1000 for batch in reference[start:start + 4] for i in batch}
        loaded = [shard_of(name) for name, _, _ in loads]
        assert set(loaded) <= needed and len(loaded) == len(set(loaded)) <= 4, (start, loaded, needed)


def test_each_file_is_loaded_once_a_lane_epoch_with_all_its_arrays(tmp_path, loads):
    root = write_set(tmp_path, [10] * 12)
    with pairs.pair_batches(root, 4, SEED, lanes=2, prefetch=1) as reader:
        for _ in range(60):  # two epochs
            next(reader)
    counts = np.bincount([shard_of(name) for name, _, _ in loads], minlength=12)
    # Twice each, and the first file or two of the third epoch (read ahead), in each lane.
    assert set(counts) <= {2, 3} and (counts == 3).sum() <= 4, counts
    assert all(sorted(keys) == ["id", "label", "x0", "x1"] for _, keys, _ in loads)


def test_processes_load_only_the_files_of_their_own_lanes(tmp_path, loads):
    root = write_set(tmp_path, [10] * 8)
    for count in (2, 4):  # 4 lanes of two files
        per_process = []
        for index in range(count):
            del loads[:]
            with pairs.pair_batches(root, 8 // count, SEED, 0, (index, count), lanes=4) as reader:
                for _ in range(20):  # two epochs
                    next(reader)
            per_process.append({shard_of(name) for name, _, _ in loads})
        assert all(len(files) == 8 // count for files in per_process), per_process
        assert set().union(*per_process) == set(range(8)), per_process
        assert sum(map(len, per_process)) == 8  # disjoint


def test_every_pair_comes_once_an_epoch_with_its_rows_together(tmp_path):
    root = write_set(tmp_path, [12] * 8)  # 96 pairs, 4 steps of 24 an epoch
    batches = global_batches(root, 24, 2, 12)
    epochs = [np.concatenate([b["id"] for b in batches[e * 4:(e + 1) * 4]]) for e in range(3)]
    everyone = sorted(1000 * s + r for s in range(8) for r in range(12))
    for ids in epochs:
        assert sorted(ids) == everyone
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch reshuffled
    for batch in batches:
        assert_aligned(batch)
        assert len({int(i) // 1000 for i in batch["id"]}) > 1  # a batch mixes files


def test_pairs_are_seen_equally_often_whatever_the_files(tmp_path):
    # 12 files in 8 lanes, and a short last one: lanes are cut by rows, not files, so none runs ahead.
    for lengths, batch in (([10] * 12, 8), ([10] * 11 + [3], 8), ([7, 9, 12, 5, 11], 10)):
        root = write_set(tmp_path / f"{len(lengths)}_{lengths[-1]}", lengths)
        n, lanes = sum(lengths), pairs.num_lanes(len(lengths), batch)
        steps_all = math.ceil(math.ceil(n / lanes) / (batch // lanes))  # the longest lane's epoch, in steps
        ids = np.concatenate([b["id"] for b in global_batches(root, batch, 1, steps_all)])
        first = ids[:n // batch * batch]
        assert len(np.unique(first)) == len(first), (lengths, "a pair came twice before the others came once")
        assert len(np.unique(ids)) == n, lengths


def test_small_sets_and_batches_larger_than_a_shard(tmp_path, loads):
    for lengths, batch in (([10], 32), ([5, 5, 5], 32), ([5, 5, 5], 12), ([4, 9], 3)):
        root = write_set(tmp_path / "_".join(map(str, lengths)) / str(batch), lengths)
        n = sum(lengths)
        stream = np.concatenate([b["id"] for b in global_batches(root, batch, 1, 6)])
        lanes = pairs.num_lanes(len(lengths), batch)
        if lanes == 1:  # one lane: the stream is epoch after epoch of all pairs
            for e in range(len(stream) // n):
                assert sorted(stream[e * n:(e + 1) * n]) == sorted(np.concatenate(
                    [1000 * s + np.arange(m) for s, m in enumerate(lengths)])), (lengths, batch, e)
        else:
            assert len(np.unique(stream)) == n
        for b in global_batches(root, batch, 1, 3):
            assert b["id"].shape == (batch,)
            assert_aligned(b)
    # A lane shorter than what a step takes of it stays in memory: read once, not at every step.
    del loads[:]
    global_batches(tmp_path / "5_5_5" / "32", 32, 1, 20)
    assert sorted(name for name, _, _ in loads) == [pairs.shard_name(i, 3) for i in range(3)]


def next_within(reader, seconds=60):
    """next(reader) in a helper thread: (value or exception); fails the test if it hangs."""
    box = []

    def run():
        try:
            box.append(next(reader))
        except BaseException as err:
            box.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert box, "the reader hangs"
    return box[0]


def test_a_corrupt_or_missing_shard_is_named_and_nothing_hangs(tmp_path):
    root = write_set(tmp_path / "cut", [10] * 4)
    reader = pairs.pair_batches(root, 5, SEED, lanes=1, prefetch=1)
    victim = root / pairs.shard_name(3, 4)
    victim.write_bytes(victim.read_bytes()[:200])  # cut short after the reader checked it
    for _ in range(20):
        got = next_within(reader)
        if isinstance(got, BaseException):
            break
    assert isinstance(got, pairs.PairDataError) and "pairs-00003-of-00004.npz" in str(got) and "corrupt" in str(got)
    assert isinstance(next_within(reader), pairs.PairDataError)  # and again, not a hang
    reader._thread.join(5)
    assert not reader._thread.is_alive()
    with pytest.raises(pairs.PairDataError, match="pairs-00003-of-00004.npz.* corrupt"):
        pairs.pair_batches(root, 5, SEED)  # found at once by a new reader

    root = write_set(tmp_path / "shorter", [10] * 4)
    reader = pairs.pair_batches(root, 5, SEED, lanes=1, prefetch=1)
    np.savez(root / pairs.shard_name(2, 4), **{k: v[:4] for k, v in np.load(root / pairs.shard_name(2, 4)).items()})
    for _ in range(20):
        got = next_within(reader)
        if isinstance(got, BaseException):
            break
    assert isinstance(got, pairs.PairDataError) and "pairs-00002-of-00004.npz" in str(got)

    root = write_set(tmp_path / "gone", [10] * 4)
    reader = pairs.pair_batches(root, 5, SEED, lanes=1, prefetch=1)
    os.remove(root / pairs.shard_name(1, 4))
    for _ in range(20):
        got = next_within(reader)
        if isinstance(got, BaseException):
            break
    assert isinstance(got, pairs.PairDataError) and "pairs-00001-of-00004.npz" in str(got)
    with pytest.raises(pairs.PairDataError, match="holds 3 of 4 shards"):
        pairs.pair_batches(root, 5, SEED)


def test_closing_stops_the_reader(tmp_path):
    root = write_set(tmp_path, [10] * 4)
    reader = pairs.pair_batches(root, 4, SEED)
    next(reader)
    reader.close()
    assert not reader._thread.is_alive()
    with pytest.raises(StopIteration):
        next(reader)
    with pairs.pair_batches(root, 4, SEED) as reader:
        next(reader)
    assert not reader._thread.is_alive()
    with pytest.raises(ValueError, match="0 <= index < count"):
        pairs.pair_batches(root, 4, SEED, shard=(2, 2))


def recorder(calls, size=6):
    def make_shard(index):
        calls.append(index)
        return {"x0": np.full((size, 2), index, np.float32), "x1": np.full((size, 2), index + 0.5, np.float32)}
    return make_shard


def test_each_process_writes_its_own_shards_and_only_process_0_the_metadata(tmp_path, monkeypatch):
    written = []
    real = pairs._write_meta
    monkeypatch.setattr(pairs, "_write_meta", lambda out, meta: (written.append(meta), real(out, meta)))
    meta = {"shape": [2], "teacher": "t"}
    with pytest.raises(pairs.PairDataError, match=r"process\(es\) \[1\] do not see the pairs.json"):
        pairs.write_pair_shards(tmp_path, recorder([]), 4, meta, progress=False, process_index=1, process_count=2)
    assert not written and not list(tmp_path.iterdir())  # process 1 wrote nothing, pairs.json included
    calls = []
    pairs.write_pair_shards(tmp_path, recorder(calls), 4, meta, progress=False, process_index=0, process_count=2)
    assert calls == [0, 1, 2, 3]  # making a shard is collective: every process takes part in each
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == [pairs.shard_name(0, 4), pairs.shard_name(2, 4)]
    assert len(written) == 1
    calls = []
    pairs.write_pair_shards(tmp_path, recorder(calls), 4, meta, progress=False, process_index=1, process_count=2)
    assert calls == [1, 3] and len(written) == 1  # (alone here, process 1 saw 0 and 2 done)
    assert pairs.inspect_pairs(tmp_path)["num_pairs_found"] == 24 and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(pairs.PairDataError, match="other settings .*teacher: 't' -> 'u'"):
        pairs.write_pair_shards(tmp_path, recorder([]), 4, dict(meta, teacher="u"), progress=False,
                                process_index=1, process_count=2)


def test_processes_that_disagree_are_refused_together(tmp_path, monkeypatch):
    real = pairs._gather
    monkeypatch.setattr(pairs, "_gather", lambda row: np.stack([real(row)[0], real(row)[0] + 1]))
    with pytest.raises(pairs.PairDataError, match=r"processes \[1\] called write_pair_shards with other arguments"):
        pairs.write_pair_shards(tmp_path, recorder([]), 2, {"shape": [2]}, progress=False)
    assert not list(tmp_path.glob("*.npz"))


def test_a_stop_request_ends_after_a_complete_shard_and_a_rerun_makes_the_rest(tmp_path):
    calls = []
    with pytest.raises(preemption.Preempted, match="after 2 of 5"):
        pairs.write_pair_shards(tmp_path, recorder(calls), 5, {"shape": [2]}, progress=False,
                                stop_requested=lambda position: position == 1)
    assert calls == [0, 1] and sorted(tmp_path.glob("*.npz")) == [tmp_path / pairs.shard_name(i, 5) for i in (0, 1)]
    assert not list(tmp_path.glob("*.tmp"))
    preemption.request()  # the flag SIGTERM sets, through the callable the pipeline passes
    try:
        with pytest.raises(preemption.Preempted):
            pairs.write_pair_shards(tmp_path, recorder(calls), 5, {"shape": [2]}, progress=False,
                                    stop_requested=preemption.requested)
    finally:
        preemption.clear()
    assert calls == [0, 1, 2]
    pairs.write_pair_shards(tmp_path, recorder(calls), 5, {"shape": [2]}, progress=False,
                            stop_requested=lambda position: position == 1)  # after the last shard: no stop
    assert calls == [0, 1, 2, 3, 4] and pairs.inspect_pairs(tmp_path)["num_pairs_found"] == 30


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from rectflow_jax import parallel
    from rectflow_jax.data import pairs
    port, index, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    parallel.initialize_distributed(f"127.0.0.1:{port}", 2, index)
    made = []
    def make_shard(i):
        made.append(i)
        return {"x0": np.full((3, 2), i, np.float32), "x1": np.full((3, 2), i, np.float32)}
    pairs.write_pair_shards(out, make_shard, 5, {"shape": [2]}, progress=False)
    # Every shard is there for every process once it returns.
    assert pairs.inspect_pairs(out)["num_pairs_found"] == 15
    print("made", made)
""")


def test_two_real_processes_write_one_pair_set(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "pairs"
    out.mkdir()
    np.savez(out / pairs.shard_name(1, 5), x0=np.ones((3, 2), np.float32), x1=np.ones((3, 2), np.float32))  # done before: made by neither
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(port), str(i), str(out)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:  # a process that failed leaves the other waiting at a barrier
        for proc in procs:
            proc.kill()
    assert all(proc.returncode == 0 for proc in procs), logs
    assert all("made [0, 2, 3, 4]" in log for log in logs), logs
