"""Reflow couplings on disk: sharded .npz files plus pairs.json.

A shard holds x1 and either x0 (float32) or, for text triplets, the (noise_seed,
noise_index) that regenerate x0 exactly (sampling.noise_from_seeds), with its condition
(label, or input_ids and the prompt text). Text triplets store x1 in float16.

Writing is collective over processes and atomic per shard (temporary name, then rename),
so a shard that exists is complete and a rerun makes only the missing ones. Reading
(`pair_batches`) is plain numpy: the global batch of a step is a function of the files,
the seed and the step alone, each process reads the files behind its own rows, and a
resumed reader goes straight to its step; see `pair_batches` for the order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import queue
import struct
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from rectflow_jax import storage
from rectflow_jax.preemption import Preempted

META_FILE = "pairs.json"
# Every shard has x1 and one of these ways to its x0.
SOURCE_KEYS = (("x0",), ("noise_seed", "noise_index"))
TEXT_KEYS = ("prompt",)  # kept for people and evaluation; not batched for training


class PairDataError(ValueError):
    """Pair shards are missing, empty, corrupt or of the wrong shape."""


def shard_name(index: int, num_shards: int) -> str:
    return f"pairs-{index:05d}-of-{num_shards:05d}.npz"


# ----------------------------------------------------------------------------- writing

def write_pair_shards(out_dir: str | Path, make_shard: Callable[[int], Mapping[str, np.ndarray]],
                      num_shards: int, meta: Mapping[str, Any], *, shard_indices: Sequence[int] | None = None,
                      notes: Mapping[str, Any] | None = None, progress: bool = True,
                      stop_requested: Callable[[int], bool] | None = None,
                      process_index: int | None = None, process_count: int | None = None) -> list[Path]:
    """Makes the shards `shard_indices` (default all) of a pair set that are not on disk yet.

    Collective: every process calls it with the same arguments. `make_shard(i)` is called
    by every process for the same i in the same order (it may run one computation sharded
    over all of them) and returns the whole shard on each; process i % process_count
    writes shard i. It must be deterministic in i (the caller folds i into its seed), so a
    resumed run writes exactly what an uninterrupted one would have.

    Process 0 alone checks `meta` against what an earlier run wrote to the same directory
    and writes pairs.json; `notes` go into it too but are not compared (e.g. the teacher's
    path, which may move). Process 0 also lists the shards still to make and every process
    works from that list, so they agree on it even where a shared file system is slow to
    show new files; the others then check that they see the same pairs.json (one directory
    shared by all), and all refuse together when one differs. `stop_requested(position)` (collective too, e.g. preemption.requested)
    is asked after each shard but the last; on True every process waits until the shards
    written so far are on disk and raises Preempted, and a rerun makes only the rest.
    Every shard exists before any process returns.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} is not one of process_count={count} processes")
    out = storage.path(out_dir)
    meta = dict(meta, num_shards=num_shards)
    indices = list(range(num_shards)) if shard_indices is None else sorted({int(i) for i in shard_indices})
    if any(not 0 <= i < num_shards for i in indices):
        raise ValueError(f"shard_indices {indices} are not all in 0..{num_shards - 1}")
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps([num_shards, meta, notes, indices, count], sort_keys=True,
                                       default=str).encode()).digest()
    refusal = _meta_refusal(out, meta, notes)
    if index == 0 and refusal is None and not (out / META_FILE).exists():
        _write_meta(out, dict(notes or {}, **meta))
    missing = [int(not (out / shard_name(i, num_shards)).exists()) for i in range(num_shards)]
    # One exchange: process 0's verdict and listing, and everyone's digest of its arguments.
    rows = _gather(np.concatenate([np.frombuffer(digest[:8], np.int32), [int(refusal is None)], missing]))
    processes = np.arange(len(rows)) if len(rows) > 1 else np.asarray([index])  # who each row is from
    differ = np.any(rows[:, :2] != rows[0, :2], axis=1)
    if np.any(differ):
        raise PairDataError(f"processes {processes[differ].tolist()} called write_pair_shards with other arguments "
                            "than process 0: it is collective, every process makes every shard (shard_indices is "
                            "a subset all of them share)")
    if not rows[0, 2]:
        raise PairDataError(refusal or f"process 0 refused {str(out)!r}: it holds pairs made with other settings")
    sees_meta = index == 0 or ((out / META_FILE).exists() and _meta_refusal(out, meta, notes) is None)
    blind = processes[_gather(np.asarray([int(sees_meta)], np.int32))[:, 0] == 0]
    if len(blind):
        raise PairDataError(f"process(es) {blind.tolist()} do not see the {META_FILE} that process 0 wrote to "
                            f"{str(out)!r}: pairs must go to one directory that every process shares")
    todo = [i for i in indices if rows[0, 3 + i]]
    for position, shard_index in enumerate(tqdm(todo, desc=f"pairs -> {out.name}", unit="shard",
                                                disable=not progress or not todo or index != 0)):
        arrays = make_shard(shard_index)
        if shard_index % count == index:
            storage.save_npz(out / shard_name(shard_index, num_shards), arrays)  # as .tmp, then renamed
        if stop_requested is not None and position < len(todo) - 1 and stop_requested(position):
            _barrier("write_pair_shards:stop")  # the owners have renamed their shards: all are complete
            raise Preempted(f"stopped after {position + 1} of {len(todo)} pair shards to make in {str(out)!r}; "
                            "rerunning makes the rest")
    _barrier("write_pair_shards:done")
    return [out / shard_name(i, num_shards) for i in indices]


def _meta_refusal(out: Path, meta: Mapping[str, Any], notes: Mapping[str, Any] | None) -> str | None:
    """Why `out` cannot take pairs of `meta` (its pairs.json says other settings), or None."""
    meta_path = out / META_FILE
    if not meta_path.exists():
        return None
    try:
        stored = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        return f"{str(meta_path)!r} is corrupt: {err}"
    previous = {k: v for k, v in stored.items() if k not in (notes or {})}
    wanted = json.loads(json.dumps(meta))
    if previous == wanted:
        return None
    changed = [f"{k}: {previous.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(previous) | set(wanted))
               if previous.get(k) != wanted.get(k)]
    return (f"{str(out)!r} already holds pairs made with other settings ({'; '.join(changed)}); "
            "use a new directory or remove it")


def _write_meta(out: Path, meta: Mapping[str, Any]) -> None:
    storage.write_json(out / META_FILE, meta)


def _gather(row: np.ndarray) -> np.ndarray:
    """Every process's int32 `row`, stacked in process order: (processes, n); just ours on one process."""
    row = np.asarray(row, np.int32)
    if jax.process_count() == 1:
        return row[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), -1)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- validation

def _read_npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(member)
    return tuple(shape), fortran_order, np.dtype(dtype)


def _member_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.open(f"{key}.npy") as member:
        shape, _, dtype = _read_npy_header(member)
    return shape, dtype


def inspect_pairs(pair_dir: str | Path) -> dict[str, Any]:
    """Validates a pair directory from shard headers alone; returns its metadata.

    Raises PairDataError naming the first bad shard: unreadable, missing arrays,
    disagreeing lengths, shapes or dtypes, or fewer shards than pairs.json promises.
    Besides pairs.json's entries: files (sorted), shard_lengths (pairs in each),
    num_pairs_found and keys.
    """
    root = storage.path(pair_dir)
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
    shape, lengths_found, keys, batched = tuple(meta["shape"]), [], None, None
    for file in files:
        try:
            with file.open("rb") as handle, zipfile.ZipFile(handle) as archive:
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
        # Batches join rows of several shards: a dtype that changed would be cast silently.
        rows = {k: (headers[k][0][1:], headers[k][1].str) for k in names if k not in TEXT_KEYS}
        if batched is not None and rows != batched:
            k = next(k for k in rows if rows[k] != batched[k])
            raise PairDataError(f"shard {file.name}: {k} has rows of shape {rows[k][0]} and dtype {rows[k][1]}, "
                                f"other shards {batched[k][0]} and {batched[k][1]}")
        keys, batched = names, rows
        lengths_found.append(lengths["x1"])
    return dict(meta, files=[str(f) for f in files], shard_lengths=lengths_found,
                num_pairs_found=sum(lengths_found), keys=sorted(keys))


# ----------------------------------------------------------------------------- reading

def _load_shard(path: str, keys: Sequence[str] | None = None,
                rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The arrays `keys` (default all) of a shard, rows [start, stop) only (default all), in one open.

    np.savez stores its members uncompressed, so a row range is read straight from its
    place in the file, not the rows before it; a compressed member is read whole.
    """
    try:
        with storage.path(path).open("rb") as handle, zipfile.ZipFile(handle) as archive:
            names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")] if keys is None else keys
            return {k: _read_rows(handle, archive, archive.getinfo(f"{k}.npy"), rows) for k in names}
    except Exception as err:  # a truncated or overwritten file shows only here
        raise PairDataError(f"shard {str(path)!r} is corrupt ({type(err).__name__}: {err})") from err


def _read_rows(handle, archive: zipfile.ZipFile, info: zipfile.ZipInfo, rows: tuple[int, int] | None) -> np.ndarray:
    with archive.open(info) as member:
        shape, fortran_order, dtype = _read_npy_header(member)
        header_size = member.tell()
    if not shape:
        with archive.open(info) as member:
            return np.lib.format.read_array(member)
    start, stop = (0, shape[0]) if rows is None else rows
    if not 0 <= start <= stop <= shape[0]:
        raise ValueError(f"rows [{start}, {stop}) of {info.filename}, which has {shape[0]}")
    if info.compress_type != zipfile.ZIP_STORED or fortran_order or dtype.hasobject:
        with archive.open(info) as member:
            return np.lib.format.read_array(member)[start:stop]
    # The member's bytes start after its local header, whose extra field (zip64) the directory does not give.
    handle.seek(info.header_offset)
    local = handle.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"no local header for {info.filename}")
    name_size, extra_size = struct.unpack("<HH", local[26:30])
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    handle.seek(info.header_offset + 30 + name_size + extra_size + header_size + start * row_bytes)
    out = np.empty((stop - start,) + shape[1:], dtype)
    wanted = out.nbytes
    if wanted and _read_into(handle, out.reshape(-1).view(np.uint8)) != wanted:
        raise ValueError(f"{info.filename} is cut short")
    return out


def _read_into(handle, buffer: np.ndarray) -> int:
    """handle.readinto(buffer) where the file has it (local files); a gs:// file (tf.io.gfile) has only read."""
    if hasattr(handle, "readinto"):
        return handle.readinto(buffer)
    data = handle.read(len(buffer))
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
    return len(data)


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Rows [start, stop) of file `file` (an index into the sorted shard files)."""

    file: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def num_lanes(num_files: int, global_batch: int, lanes: int = 8) -> int:
    """How many lanes a global batch is made of: a divisor of it, never dependent on the process count."""
    return math.gcd(min(lanes, num_files), global_batch)


def _rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, *words])


_DEAL, _ORDER, _ROWS = 0, 1, 2  # what a seeded permutation is for, so no two share a stream


def deal_lanes(lengths: Sequence[int], num: int, seed: int) -> list[tuple[_Piece, ...]]:
    """The files in a seeded order, end to end, cut into `num` lanes of equal rows (to one row).

    A lane is a run of whole files, plus parts of the files its boundaries cut: cutting by
    rows, not by files, keeps every pair equally often seen whatever the files' count and
    sizes (a short last shard, 12 files in 8 lanes).
    """
    total = int(sum(lengths))
    order = _rng(seed, _DEAL).permutation(len(lengths))
    starts = np.concatenate([[0], np.cumsum([lengths[f] for f in order])])
    lanes = []
    for j in range(num):
        lo, hi = total * j // num, total * (j + 1) // num
        pieces = []
        for slot, file in enumerate(order):
            a, b = max(lo, starts[slot]), min(hi, starts[slot + 1])
            if a < b:
                pieces.append(_Piece(int(file), int(a - starts[slot]), int(b - starts[slot])))
        lanes.append(tuple(pieces))
    return lanes


class _LaneReader:
    """Lane `lane`'s stream, by position: epoch after epoch, its pieces in a seeded order, each
    piece's rows in a seeded permutation. It keeps only the piece it is in (a lane no longer
    than `width`, what one step takes of it, is kept whole: it is read at every step)."""

    def __init__(self, lane: int, pieces: tuple[_Piece, ...], files: Sequence[str], keys: Sequence[str],
                 seed: int, width: int):
        self.lane, self.pieces, self.files, self.keys, self.seed = lane, pieces, files, list(keys), seed
        self.size = sum(p.size for p in pieces)
        self.keep_all = self.size <= width
        self.loaded: dict[int, dict[str, np.ndarray]] = {}
        self.epoch_order: tuple[int, np.ndarray, np.ndarray] | None = None
        self.rows: tuple[tuple[int, int], np.ndarray] | None = None

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self.epoch_order is None or self.epoch_order[0] != epoch:
            order = _rng(self.seed, _ORDER, self.lane, epoch).permutation(len(self.pieces))
            self.epoch_order = (epoch, order, np.cumsum([self.pieces[p].size for p in order]))
        return self.epoch_order[1:]

    def _rows(self, epoch: int, piece: int) -> np.ndarray:
        if self.rows is None or self.rows[0] != (epoch, piece):
            file = self.pieces[piece].file
            self.rows = ((epoch, piece), _rng(self.seed, _ROWS, self.lane, epoch, file).permutation(
                self.pieces[piece].size))
        return self.rows[1]

    def _data(self, piece: int) -> dict[str, np.ndarray]:
        if piece not in self.loaded:
            if not self.keep_all:
                self.loaded.clear()
            p = self.pieces[piece]
            self.loaded[piece] = _load_shard(self.files[p.file], self.keys, (p.start, p.stop))
        return self.loaded[piece]

    def read(self, position: int, count: int) -> list[dict[str, np.ndarray]]:
        """Positions [position, position + count) of the stream, as runs of rows from one piece each."""
        runs = []
        while count > 0:
            epoch, offset = divmod(position, self.size)
            order, ends = self._order(epoch)
            slot = int(np.searchsorted(ends, offset, side="right"))
            piece, begin = int(order[slot]), int(ends[slot]) - self.pieces[order[slot]].size
            take = min(count, int(ends[slot]) - offset)
            rows = self._rows(epoch, piece)[offset - begin:offset - begin + take]
            data = self._data(piece)
            runs.append({k: data[k][rows] for k in self.keys})
            position, count = position + take, count - take
        return runs


def pair_batches(pair_dir: str | Path, batch_size: int, seed: int, start_step: int = 0,
                 shard: tuple[int, int] = (0, 1), *, lanes: int = 8, prefetch: int = 4) -> "PairBatches":
    """Infinite shuffled batches of pairs: {key: (batch_size, ...)} of every array but the text.

    `shard=(index, count)`: this is process `index` of `count`, and `batch_size` its share
    of the global batch of G = batch_size * count rows. The order:
      - The global batch of step k depends on the pair files, seed, k, G and `lanes` only,
        never on the number of processes; process i gets its rows [i * batch_size,
        (i + 1) * batch_size).
      - It is L = gcd(min(lanes, files), G) lanes side by side, G / L rows each. The files,
        in a seeded order, are laid end to end and cut into L lanes of equal rows (to one
        row; see `deal_lanes`). A lane walks its files epoch after epoch, in a seeded
        order each epoch and each file's rows in a seeded permutation: every pair once per
        lane epoch, with its x0/x1/condition together. With L dividing the number of pairs
        N and G dividing N, each N / G steps hold every pair exactly once.
      - Step k of a lane is positions [k G/L, (k+1) G/L) of its stream, found by arithmetic
        on the shard lengths (headers only): a reader started at step s yields batch s of
        one started at 0, reading nothing before it.
      - A process reads only the lanes behind its rows, each of its files once per lane
        epoch, all arrays in one read; with L % count == 0 these are its own whole lanes,
        so processes share at most the files cut by a lane boundary.
    A daemon thread reads `prefetch` batches ahead; its errors surface at `next` as
    PairDataError naming the shard. Close the iterator (or use it in a `with`) to stop it.
    """
    index, count = shard
    if batch_size < 1 or lanes < 1 or prefetch < 1 or start_step < 0 or not 0 <= index < count:
        raise ValueError(f"pair_batches needs batch_size, lanes, prefetch >= 1, start_step >= 0 and "
                         f"0 <= index < count; got {batch_size}, {lanes}, {prefetch}, {start_step}, {shard}")
    info = inspect_pairs(pair_dir)
    keys = [k for k in info["keys"] if k not in TEXT_KEYS]
    global_batch = batch_size * count
    num = num_lanes(len(info["files"]), global_batch, lanes)
    per_lane = global_batch // num
    first, last = index * batch_size, (index + 1) * batch_size
    work = []  # (lane reader, where this process's rows start in the lane's block, how many)
    for j, pieces in enumerate(deal_lanes(info["shard_lengths"], num, seed)):
        lo, hi = max(first, j * per_lane), min(last, (j + 1) * per_lane)
        if lo < hi:
            work.append((_LaneReader(j, pieces, info["files"], keys, seed, hi - lo), lo - j * per_lane, hi - lo))

    def produce() -> Iterator[dict[str, np.ndarray]]:
        step = start_step
        while True:
            runs = [run for reader, offset, width in work for run in reader.read(step * per_lane + offset, width)]
            yield {k: np.concatenate([run[k] for run in runs]) if len(runs) > 1 else runs[0][k] for k in keys}
            step += 1

    return PairBatches(produce, prefetch, f"pairs from {str(pair_dir)!r}")


class PairBatches:
    """An iterator of batches that a daemon thread makes ahead; `close()` or a `with` stops it."""

    def __init__(self, produce: Callable[[], Iterator[dict[str, np.ndarray]]], prefetch: int, what: str):
        self._queue: queue.Queue = queue.Queue(prefetch)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._what = what
        # The thread holds the queue and the event, not self: an iterator dropped unclosed still stops it.
        self._thread = threading.Thread(target=_fill, args=(produce, self._queue, self._stop, what),
                                        name="pair_batches", daemon=True)
        self._thread.start()

    def __iter__(self) -> "PairBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._error is not None:
            raise self._error
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._error = PairDataError(f"the reader of {self._what} stopped without a word")
                    raise self._error
                continue
            if isinstance(item, BaseException):
                self._error = item
                self._stop.set()
                raise item
            return item
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> "PairBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()


def _fill(produce: Callable[[], Iterator[dict[str, np.ndarray]]], out: queue.Queue, stop: threading.Event,
          what: str) -> None:
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        for batch in produce():
            if not put(batch):
                return
    except PairDataError as err:
        put(err)
    except Exception as err:  # anything else still reaches the consumer, as a PairDataError
        wrapped = PairDataError(f"reading {what} failed ({type(err).__name__}: {err})")
        wrapped.__cause__ = err
        put(wrapped)
