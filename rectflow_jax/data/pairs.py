"""Reflow couplings on disk: sharded .npz files plus pairs.json.

A shard holds x1 and either x0 (float32) or, for text triplets, the (noise_seed,
noise_index) that regenerate x0 exactly (sampling.noise_from_seeds), with its condition
(label, or input_ids and the prompt text). Text triplets store x1 in float16.

Writing is atomic per shard (temporary name, then rename), so a shard that exists is
complete and a rerun skips it. Reading goes through a seeded tf.data pipeline that
shuffles across and within shards and is deterministic for a (seed, start_step).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from tqdm.auto import tqdm

META_FILE = "pairs.json"
# Every shard has x1 and one of these ways to its x0.
SOURCE_KEYS = (("x0",), ("noise_seed", "noise_index"))
TEXT_KEYS = ("prompt",)  # kept for people and evaluation; not batched for training


class PairDataError(ValueError):
    """Pair shards are missing, empty, corrupt or of the wrong shape."""


def shard_name(index: int, num_shards: int) -> str:
    return f"pairs-{index:05d}-of-{num_shards:05d}.npz"


def write_pair_shards(out_dir: str | Path, make_shard: Callable[[int], Mapping[str, np.ndarray]],
                      num_shards: int, meta: Mapping[str, Any], *, shard_indices=None,
                      notes: Mapping[str, Any] | None = None, progress: bool = True) -> list[Path]:
    """Writes shards `shard_indices` (default all) of a pair set; existing shards are kept.

    `make_shard(i)` must be deterministic in i (the caller folds i into its seed), so
    a resumed run writes exactly what an uninterrupted one would have. `meta` must
    match what an earlier run wrote to the same directory. `notes` go into pairs.json
    too but are not compared (e.g. the teacher's path, which may move).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, num_shards=num_shards)
    meta_path = out / META_FILE
    if meta_path.exists():
        previous = {k: v for k, v in json.loads(meta_path.read_text()).items() if k not in (notes or {})}
        wanted = json.loads(json.dumps(meta))
        if previous != wanted:
            changed = [f"{k}: {previous.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(previous) | set(wanted))
                       if previous.get(k) != wanted.get(k)]
            raise PairDataError(f"{str(out)!r} already holds pairs made with other settings ({'; '.join(changed)}); "
                                "use a new directory or remove it")
    else:
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dict(notes or {}, **meta), indent=2, sort_keys=True))
        os.replace(tmp, meta_path)
    indices = range(num_shards) if shard_indices is None else shard_indices
    todo = [i for i in indices if not (out / shard_name(i, num_shards)).exists()]
    for index in tqdm(todo, desc=f"pairs -> {out.name}", unit="shard", disable=not progress or not todo):
        arrays = {k: np.asarray(v) for k, v in make_shard(index).items()}
        path = out / shard_name(index, num_shards)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    return [out / shard_name(i, num_shards) for i in indices]


def _member_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(member)
    return tuple(shape), np.dtype(dtype)


def inspect_pairs(pair_dir: str | Path) -> dict[str, Any]:
    """Validates a pair directory from shard headers alone; returns its metadata.

    Raises PairDataError naming the first bad shard: unreadable, missing arrays,
    disagreeing lengths or shapes, or fewer shards than pairs.json promises.
    """
    root = Path(pair_dir)
    if not root.is_dir():
        raise PairDataError(f"pair directory {str(root)!r} does not exist")
    meta_path = root / META_FILE
    if not meta_path.exists():
        raise PairDataError(f"{str(root)!r} has no {META_FILE}: it is not a pair directory (run `rectflow pairs`)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise PairDataError(f"{str(meta_path)!r} is corrupt: {err}") from err
    files = sorted(root.glob("pairs-*-of-*.npz"))
    if not files:
        raise PairDataError(f"{str(root)!r} holds no pair shards")
    if len(files) != meta["num_shards"]:
        raise PairDataError(f"{str(root)!r} holds {len(files)} of {meta['num_shards']} shards: "
                            "finish it with `rectflow pairs` first")
    shape, count, keys = tuple(meta["shape"]), 0, None
    for file in files:
        try:
            with zipfile.ZipFile(file) as archive:
                names = {n[:-4] for n in archive.namelist() if n.endswith(".npy")}
                if "x1" not in names or not any(set(keys) <= names for keys in SOURCE_KEYS):
                    raise PairDataError(f"shard {file.name} lacks arrays: it has {sorted(names)}, needs x1 and "
                                        f"one of {' or '.join('+'.join(k) for k in SOURCE_KEYS)}")
                headers = {k: _member_header(archive, k) for k in names}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            if isinstance(err, PairDataError):
                raise
            raise PairDataError(f"shard {str(file)!r} is corrupt ({type(err).__name__}: {err})") from err
        lengths = {k: h[0][0] if h[0] else -1 for k, h in headers.items()}
        if len(set(lengths.values())) != 1 or lengths["x1"] <= 0:
            raise PairDataError(f"shard {file.name} is empty or its arrays disagree in length: {lengths}")
        for k in ("x0", "x1"):
            if k in headers and headers[k][0][1:] != shape:
                raise PairDataError(f"shard {file.name}: {k} has sample shape {headers[k][0][1:]}, "
                                    f"pairs.json says {shape}")
        if keys is not None and names != keys:
            raise PairDataError(f"shard {file.name} has arrays {sorted(names)}, other shards {sorted(keys)}")
        keys = names
        count += lengths["x1"]
    return dict(meta, files=[str(f) for f in files], num_pairs_found=count, keys=sorted(keys))


def _load_shard(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as shard:
            return {k: shard[k] for k in shard.files}
    except Exception as err:  # a zip CRC or truncation error only shows on a full read
        raise PairDataError(f"shard {path!r} is corrupt ({type(err).__name__}: {err})") from err


def pair_batches(pair_dir: str | Path, batch_size: int, seed: int, start_step: int = 0,
                 shard: tuple[int, int] = (0, 1), *, shuffle_buffer: int = 65536) -> Iterator[dict[str, np.ndarray]]:
    """Infinite shuffled batches of pairs, deterministic for (seed, start_step).

    tf.data streams the shards (interleaved, then a seeded shuffle buffer) so a pair
    set need not fit in memory. Batch k of a run started at step s equals batch s + k
    of a run started at 0: resumed training sees the same data. `shard=(index, count)`
    gives process `index` of `count` its own batches of the one global stream.
    """
    import tensorflow as tf

    info = inspect_pairs(pair_dir)
    keys = [k for k in info["keys"] if k not in TEXT_KEYS]
    first = _load_shard(info["files"][0])
    specs = {k: tf.TensorSpec((None,) + first[k].shape[1:], tf.as_dtype(first[k].dtype)) for k in keys}

    def shard_dataset(path):
        arrays = tf.numpy_function(lambda p: tuple(_load_shard(p.decode())[k] for k in keys), [path],
                                   [specs[k].dtype for k in keys])
        arrays = {k: tf.ensure_shape(a, specs[k].shape) for k, a in zip(keys, arrays)}
        return tf.data.Dataset.from_tensor_slices(arrays)

    files = tf.data.Dataset.from_tensor_slices(info["files"])
    ds = files.shuffle(len(info["files"]), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.interleave(shard_dataset, cycle_length=min(4, len(info["files"])),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.shuffle(min(shuffle_buffer, info["num_pairs_found"]), seed=seed + 1, reshuffle_each_iteration=True)
    index, count = shard
    ds = ds.batch(batch_size, drop_remainder=True).shard(count, index).skip(start_step).prefetch(2)
    yield from ds.as_numpy_iterator()
