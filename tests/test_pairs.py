"""Pair shards: atomic, deterministic per shard, resumable, validated, read back shuffled."""

import os

import numpy as np
import pytest

from rectflow_jax.data import pairs


def make_shard_fn(calls):
    def make_shard(index):
        calls.append(index)
        rng = np.random.default_rng(index)
        return {"x0": rng.normal(size=(10, 2)).astype(np.float32),
                "x1": rng.normal(size=(10, 2)).astype(np.float32) + 5,
                "label": np.full(10, index, np.int32)}
    return make_shard


META = {"shape": [2], "num_pairs": 40, "teacher": "t"}


def test_write_is_resumable_and_skips_finished_shards(tmp_path):
    calls = []
    pairs.write_pair_shards(tmp_path, make_shard_fn(calls), 4, META, shard_indices=[0, 2], progress=False)
    assert calls == [0, 2]
    assert not list(tmp_path.glob("*.tmp"))  # written under a temporary name, then renamed
    with pytest.raises(pairs.PairDataError, match="holds 2 of 4 shards"):
        pairs.inspect_pairs(tmp_path)
    pairs.write_pair_shards(tmp_path, make_shard_fn(calls), 4, META, progress=False)
    assert calls == [0, 2, 1, 3]
    info = pairs.inspect_pairs(tmp_path)
    assert info["num_pairs_found"] == 40 and info["keys"] == ["label", "x0", "x1"]


def test_other_settings_in_same_directory_are_refused(tmp_path):
    pairs.write_pair_shards(tmp_path, make_shard_fn([]), 1, META, progress=False)
    with pytest.raises(pairs.PairDataError, match="other settings .*num_pairs: 40 -> 99"):
        pairs.write_pair_shards(tmp_path, make_shard_fn([]), 1, dict(META, num_pairs=99), progress=False)
    # Notes (a teacher's path, which may move) are written but not compared.
    noted = tmp_path / "noted"
    pairs.write_pair_shards(noted, make_shard_fn([]), 1, META, notes={"where": "a"}, progress=False)
    pairs.write_pair_shards(noted, make_shard_fn([]), 1, META, notes={"where": "b"}, progress=False)
    assert pairs.inspect_pairs(noted)["where"] == "a"


def test_reader_is_deterministic_and_resumes(tmp_path):
    pairs.write_pair_shards(tmp_path, make_shard_fn([]), 4, META, progress=False)
    first = pairs.pair_batches(tmp_path, 8, seed=3)
    batches = [next(first) for _ in range(6)]
    again = pairs.pair_batches(tmp_path, 8, seed=3)
    np.testing.assert_array_equal(next(again)["x0"], batches[0]["x0"])
    resumed = pairs.pair_batches(tmp_path, 8, seed=3, start_step=4)
    np.testing.assert_array_equal(next(resumed)["x1"], batches[4]["x1"])
    # Shuffled across shards, and x0, x1, label stay aligned.
    assert len(np.unique(batches[0]["label"])) > 1
    for batch in batches:
        for x1, label in zip(batch["x1"], batch["label"]):
            shard = make_shard_fn([])(int(label))
            assert any(np.array_equal(x1, row) for row in shard["x1"])
    # Processes get disjoint halves of the global batch, which one process reading it all would get.
    a = next(pairs.pair_batches(tmp_path, 4, seed=3, shard=(0, 2)))
    b = next(pairs.pair_batches(tmp_path, 4, seed=3, shard=(1, 2)))
    np.testing.assert_array_equal(np.concatenate([a["x0"], b["x0"]]), batches[0]["x0"])


def test_empty_and_corrupt_shards_are_named(tmp_path):
    with pytest.raises(pairs.PairDataError, match="does not exist"):
        pairs.inspect_pairs(tmp_path / "nowhere")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(pairs.PairDataError, match="no pairs.json"):
        pairs.inspect_pairs(tmp_path / "empty")

    root = tmp_path / "p"
    pairs.write_pair_shards(root, make_shard_fn([]), 2, META, progress=False)
    victim = root / pairs.shard_name(1, 2)
    victim.write_bytes(victim.read_bytes()[:100])  # truncated mid-write by someone else
    with pytest.raises(pairs.PairDataError, match="pairs-00001-of-00002.npz.* corrupt"):
        pairs.inspect_pairs(root)

    np.savez(victim, x0=np.zeros((0, 2), np.float32), x1=np.zeros((0, 2), np.float32))
    with pytest.raises(pairs.PairDataError, match="pairs-00001-of-00002.npz is empty"):
        pairs.inspect_pairs(root)

    np.savez(victim, x0=np.zeros((5, 3), np.float32), x1=np.zeros((5, 3), np.float32))
    with pytest.raises(pairs.PairDataError, match="sample shape \\(3,\\)"):
        pairs.inspect_pairs(root)

    np.savez(victim, x0=np.zeros((5, 2), np.float32))
    with pytest.raises(pairs.PairDataError, match=r"lacks arrays: it has \['x0'\], needs x1"):
        pairs.inspect_pairs(root)

    for shard in root.glob("*.npz"):
        os.remove(shard)
    with pytest.raises(pairs.PairDataError, match="holds no pair shards"):
        pairs.inspect_pairs(root)
    (root / "pairs.json").write_text("{not json")
    with pytest.raises(pairs.PairDataError, match="pairs.json' is corrupt"):
        pairs.inspect_pairs(root)
