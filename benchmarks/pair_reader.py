"""Speed of the pair reader: time to the first batch at step 0 and at a late step, and steady batches/s,
against the tf.data reader it replaced.

What it measures: `rectflow_jax.data.pairs.pair_batches` on a pair set shaped like SD-style
text triplets at 32x32 latents: --shards shards of --per_shard pairs, each x1 (4, 32, 32)
float16 plus noise_seed and noise_index (uint32), as `rectflow pairs` writes them (np.savez,
uncompressed; about 1 GB with the defaults). It is written once with write_pair_shards
under /tmp and reused while it is there. Per reader:
  - first batch: from the call to `next` returning, at start_step 0 and at a late step
    (--late_epochs epochs and a half into the stream), each --repeats times, the median
    reported. The call includes validating the directory (every shard's header).
  - steady: --steady batches after the first, as fast as the consumer takes them (a trainer
    takes them slower, so this is the most the reader can give).
The old reader is the tf.data pipeline of rectflow_jax before issue #11, copied below as
`old_pair_batches` (so the benchmark still runs once it is gone from the package): it
resumes with `.skip(start_step)`, which makes every batch before the step, and loads each
shard once per array. Its late resume is timed once (it is the slow side).

    python benchmarks/pair_reader.py --out benchmarks/results/pair_reader.json
    python benchmarks/pair_reader.py --shards 8 --per_shard 500 --steady 50 --repeats 1   # a smoke run

Both readers read from the page cache: the set is small beside the machine's memory and
every timing follows an untimed read of the same files, so this compares the work of the
readers, not of the disk. With `--processes P` the new reader is also timed as process 0 of P
(its share of the global batch, the files of its own lanes only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from rectflow_jax.data import pairs

ROOT = Path(__file__).resolve().parents[1]


def old_pair_batches(pair_dir, batch_size, seed, start_step=0, shard=(0, 1), *, shuffle_buffer=65536):
    """rectflow_jax.data.pairs.pair_batches before issue #11 (tf.data), verbatim but for the loader."""
    import tensorflow as tf

    def load_shard(path):
        with np.load(path) as arrays:
            return {k: arrays[k] for k in arrays.files}

    info = pairs.inspect_pairs(pair_dir)
    keys = [k for k in info["keys"] if k not in pairs.TEXT_KEYS]
    first = load_shard(info["files"][0])
    specs = {k: tf.TensorSpec((None,) + first[k].shape[1:], tf.as_dtype(first[k].dtype)) for k in keys}

    def shard_dataset(path):
        arrays = tf.numpy_function(lambda p: tuple(load_shard(p.decode())[k] for k in keys), [path],
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--per_shard", type=int, default=2000, help="pairs per shard")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--late_epochs", type=float, default=5.5, help="where the late resume starts, in epochs")
    parser.add_argument("--steady", type=int, default=500, help="batches timed for the steady rate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=4, help="also time process 0 of this many (1: skip)")
    parser.add_argument("--no_old", action="store_true", help="skip the tf.data reader")
    parser.add_argument("--dir", help="where the pair set goes [/tmp/rectflow_pair_reader_<shards>x<per_shard>]")
    parser.add_argument("--out", help="JSON list to add this run's rows to")
    parser.add_argument("--note", default="")
    return parser.parse_args()


def write_set(root: Path, shards: int, per_shard: int) -> None:
    def make_shard(index):
        rng = np.random.default_rng(index)
        return {"x1": rng.standard_normal((per_shard, 4, 32, 32), np.float32).astype(np.float16),
                "noise_seed": np.full(per_shard, 7, np.uint32),
                "noise_index": np.arange(index * per_shard, (index + 1) * per_shard, dtype=np.uint32)}

    pairs.write_pair_shards(root, make_shard, shards, {"shape": [4, 32, 32], "benchmark": "pair_reader"},
                            progress=True)


def first_batch_s(make) -> float:
    start = time.perf_counter()
    reader = make()
    next(reader)
    seconds = time.perf_counter() - start
    close = getattr(reader, "close", None)
    if close:
        close()
    return seconds


def steady_batches_per_s(reader, batches: int) -> float:
    next(reader)
    start = time.perf_counter()
    for _ in range(batches):
        next(reader)
    rate = batches / (time.perf_counter() - start)
    getattr(reader, "close", lambda: None)()
    return rate


def measure(name, make, late: int, args, repeats: int, late_repeats: int) -> dict:
    first_batch_s(lambda: make(0))  # untimed: the files into the page cache, imports done
    at_0 = [first_batch_s(lambda: make(0)) for _ in range(repeats)]
    at_late = [first_batch_s(lambda: make(late)) for _ in range(late_repeats)]
    rate = steady_batches_per_s(make(0), args.steady)
    row = {"reader": name, "first_batch_s": statistics.median(at_0), "late_first_batch_s": statistics.median(at_late),
           "first_batch_times_s": at_0, "late_first_batch_times_s": at_late, "steady_batches_per_s": rate}
    row["late_over_first"] = row["late_first_batch_s"] / row["first_batch_s"]
    print(f"{name:24s} first batch {row['first_batch_s']:8.3f} s   at step {late}: {row['late_first_batch_s']:8.3f} s "
          f"({row['late_over_first']:.2f}x)   steady {rate:8.1f} batches/s", flush=True)
    return row


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "cpu_cores": len(os.sched_getaffinity(0))}
    try:
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
    except ImportError:
        pass
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    info["cpu"] = models[0] if models else platform.processor()
    return info


def main(args: argparse.Namespace) -> None:
    root = Path(args.dir or f"/tmp/rectflow_pair_reader_{args.shards}x{args.per_shard}")
    try:
        info = pairs.inspect_pairs(root)
    except pairs.PairDataError:
        print(f"writing {args.shards} shards of {args.per_shard} pairs to {root}", flush=True)
        write_set(root, args.shards, args.per_shard)
        info = pairs.inspect_pairs(root)
    size_gb = sum(Path(f).stat().st_size for f in info["files"]) / 1e9
    epoch = info["num_pairs_found"] // args.batch
    late = int(args.late_epochs * epoch)
    print(f"{root}: {info['num_pairs_found']} pairs in {len(info['files'])} shards, {size_gb:.2f} GB; "
          f"batch {args.batch}, {epoch} steps an epoch, late step {late}", flush=True)
    load_before = list(os.getloadavg())
    readers = [("numpy (this)", lambda s: pairs.pair_batches(root, args.batch, 0, s), args.repeats, args.repeats)]
    if args.processes > 1:
        share = args.batch // args.processes
        readers.append((f"numpy, process 0 of {args.processes}",
                        lambda s: pairs.pair_batches(root, share, 0, s, (0, args.processes)), args.repeats,
                        args.repeats))
    if not args.no_old:
        readers.append(("tf.data (before #11)", lambda s: old_pair_batches(root, args.batch, 0, s), args.repeats, 1))
    results = [measure(name, make, late, args, repeats, late_repeats) for name, make, repeats, late_repeats in readers]
    ours = results[0]
    claim = ours["late_first_batch_s"] <= 2 * ours["first_batch_s"]
    print(f"\n| reader | first batch, step 0 (s) | first batch, step {late} (s) | late / step 0 | steady batches/s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['reader']} | {r['first_batch_s']:.3f} | {r['late_first_batch_s']:.3f} | "
              f"{r['late_over_first']:.2f} | {r['steady_batches_per_s']:.1f} |")
    print(f"\nThe pair reader resumed at a late step reaches its first batch as fast as at step 0 (within 2x): "
          f"{'yes' if claim else 'NO'} ({ours['late_over_first']:.2f}x)")
    if len(results) > 1 and not args.no_old:
        old = results[-1]
        print(f"tf.data reader at step {late}: {old['late_first_batch_s']:.1f} s, "
              f"{old['late_first_batch_s'] / ours['late_first_batch_s']:.0f}x the new reader's")
    row = {"part": "pair reader: first batch at step 0 and late, steady batches/s",
           "shards": len(info["files"]), "per_shard": args.per_shard, "pairs": info["num_pairs_found"],
           "set_gb": size_gb, "sample": "x1 (4, 32, 32) float16 + noise_seed, noise_index uint32",
           "batch": args.batch, "steps_per_epoch": epoch, "late_step": late, "steady_batches": args.steady,
           "readers": results, "late_within_2x": claim, "load_before": load_before,
           "load_after": list(os.getloadavg()),
           "command": " ".join(["python", "benchmarks/pair_reader.py", *sys.argv[1:]]),
           "machine": machine(), "note": args.note, "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if args.out:
        out = Path(args.out)
        key = lambda r: (r["part"], r["shards"], r["per_shard"], r["batch"])
        rows = json.loads(out.read_text()) if out.exists() else []
        rows = sorted([r for r in rows if key(r) != key(row)] + [row], key=key)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"rows -> {out}")


if __name__ == "__main__":
    main(parse_args())
