"""Sweeps: one rectflow command over a grid of config overrides, one workdir per run.

    python launch/sweep.py --sweep sweeps/lr.py --root runs/lr_sweep --mode local \
        -- train --config configs/toy_2gmm.py

A sweep file is Python defining SWEEP, a list of override dicts; `product` and `chain`
are there without an import:

    SWEEP = chain(product({"optim.lr": [1e-3, 3e-4], "train.batch_size": [64, 128]}),
                  [{"optim.lr": 1e-4, "optim.schedule": "cosine"}])

or JSON: {"product": {"optim.lr": [0.001, 0.0003]}} or {"runs": [{"seed": 0}, {"seed": 1}]}.

Run i is the command plus `--workdir ROOT/<name> --config.<key>=<value>...`, its name
made of its overrides (`optim.lr=0.001,train.batch_size=64`). ROOT/manifest.json lists
every run: name, overrides, workdir, argv and, once run here, exit status and seconds.
Rerunning the same sweep into the same ROOT skips the runs recorded with status 0 (local
and tpu modes record them; SLURM array tasks do not write back, see sacct), and the
others resume from their checkpoints; a ROOT holding another sweep is refused.

Modes:
  local  the runs one after another here (`python -m rectflow_jax.cli`), past failures;
         the exit status is 1 when any run failed
  slurm  one array job, `sbatch --array=0-(N-1) launch/slurm.sbatch --from_manifest
         ROOT/manifest.json`: array task i reads run i's argv from the manifest
         (`--run_from_manifest ROOT/manifest.json --index i`, NUL-separated)
  tpu    `launch/tpu_pod.sh TPU ZONE ...` per run, one after another (--tpu, --zone);
         ROOT is then a path on the workers (gs://...), so a URL root needs --manifest
--dry_run writes the manifest and prints the commands instead of running them.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

LAUNCH_DIR = Path(__file__).resolve().parent
MANIFEST_FORMAT = "rectflow_sweep/1"
MODES = ("local", "slurm", "tpu")
# A config key as `--config.<key>` takes it: names joined by dots (optim.lr, seed).
_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]+")
_MAX_NAME = 120  # well under the 255 bytes of a file name, with room for the hash suffix


class SweepError(ValueError):
    """A sweep that cannot be run as asked: a bad sweep file, key or value, clashing names, a foreign ROOT."""


def product(axes: Mapping[str, Iterable[Any]] | None = None, /, **more: Iterable[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis slowest.

    product({"optim.lr": [1e-3, 3e-4], "train.batch_size": [64, 128]}) -> 4 dicts;
    keywords work for keys without dots: product(seed=[0, 1]).
    """
    axes = {**(axes or {}), **more}
    for key, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise SweepError(f"sweep axis {key!r}: give a list of values, not {values!r}")
    axes = {key: list(values) for key, values in axes.items()}
    for key, values in axes.items():
        if not values:
            raise SweepError(f"sweep axis {key!r} has no values")
    return [dict(zip(axes, combination)) for combination in itertools.product(*axes.values())]


def chain(*lists: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The runs of several lists, in order: chain(product(...), [{"optim.lr": 1e-4}])."""
    return [dict(run) for runs in lists for run in runs]


def load_sweep(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The runs (override dicts) of a sweep file: Python defining SWEEP, or JSON."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"no sweep file {str(path)!r}")
    if path.suffix == ".json":
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SweepError(f"{path}: not JSON ({err})") from None
    else:
        namespace = runpy.run_path(str(path), init_globals={"product": product, "chain": chain})
        if "SWEEP" not in namespace:
            raise SweepError(f"{path} defines no SWEEP (a list of override dicts, e.g. product({{...}}))")
        spec = namespace["SWEEP"]
    return _runs_of(spec, path)


def _runs_of(spec: Any, path: Path) -> list[dict[str, Any]]:
    if isinstance(spec, Mapping):
        if set(spec) == {"product"} and isinstance(spec["product"], Mapping):
            return product(spec["product"])
        if set(spec) == {"runs"}:
            spec = spec["runs"]
        else:
            raise SweepError(f"{path}: a sweep is {{\"product\": {{KEY: [VALUES]}}}} or {{\"runs\": [{{...}}]}}, "
                             f"not a dict with keys {sorted(spec)}")
    if not isinstance(spec, (list, tuple)) or not all(isinstance(run, Mapping) for run in spec):
        raise SweepError(f"{path}: a sweep is a list of override dicts, got {type(spec).__name__}")
    return [dict(run) for run in spec]


def format_value(value: Any) -> str:
    """A value as `--config.key=` reads it (repr for floats: 0.001, not 1e-03)."""
    return repr(value) if isinstance(value, float) else str(value)


def check_overrides(runs: list[dict[str, Any]]) -> None:
    """Keys must be dotted config keys and values plain scalars; an empty sweep runs nothing."""
    if not runs:
        raise SweepError("the sweep has no runs")
    for run in runs:
        for key, value in run.items():
            if not isinstance(key, str) or not _KEY.fullmatch(key):
                raise SweepError(f"sweep key {key!r} is not a config key like 'optim.lr' or 'seed' (what --config.<key> takes)")
            if key.startswith("config."):
                raise SweepError(f"sweep key {key!r}: leave out 'config.' ('optim.lr', not 'config.optim.lr')")
            if not isinstance(value, (str, int, float)):  # bool is an int
                raise SweepError(f"sweep value {key}={value!r}: give a str, int, float or bool")


def run_name(overrides: Mapping[str, Any]) -> str:
    """A readable folder name made of the overrides, safe on any file system."""
    if not overrides:
        return "base"
    name = _UNSAFE.sub("_", ",".join(f"{key}={format_value(value)}" for key, value in overrides.items()))
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:_MAX_NAME]}-{digest}"
    return name


def expand(runs: list[dict[str, Any]], root: str, command: list[str]) -> list[dict[str, Any]]:
    """One record per run: index, name, overrides, workdir ROOT/<name> and the rectflow arguments."""
    check_overrides(runs)
    check_command(command, runs)
    names: dict[str, int] = {}
    records = []
    for index, overrides in enumerate(runs):
        name = run_name(overrides)
        if name in names:
            raise SweepError(f"runs {names[name]} and {index} both get the name {name!r} "
                             f"({runs[names[name]]} and {overrides}): make their overrides differ")
        names[name] = index
        workdir = f"{root.rstrip('/')}/{name}"
        args = [*command, "--workdir", workdir,
                *(f"--config.{key}={format_value(value)}" for key, value in overrides.items())]
        records.append({"index": index, "name": name, "overrides": overrides, "workdir": workdir, "args": args})
    return records


def check_command(command: list[str], runs: list[dict[str, Any]]) -> None:
    if not command:
        raise SweepError("give the rectflow command after --, e.g. -- train --config configs/toy_2gmm.py")
    if command[0] == "rectflow" or command[0].startswith("-"):
        raise SweepError(f"the words after -- start with a rectflow command (train, pipeline, ...), not "
                         f"{command[0]!r}: e.g. -- train --config configs/toy_2gmm.py")
    flags = {arg.split("=", 1)[0] for arg in command if arg.startswith("--")}
    if "--workdir" in flags:
        raise SweepError("leave --workdir out of the command: each run gets ROOT/<name>")
    for key in sorted({key for run in runs for key in run}):
        if f"--config.{key}" in flags:
            raise SweepError(f"--config.{key} is both in the command and in the sweep; keep one")


def _identity(manifest: Mapping[str, Any]) -> tuple:
    """What makes two manifests the same sweep: the command and each run's name and overrides."""
    return (manifest["base_command"], [(run["name"], run["overrides"]) for run in manifest["runs"]])


def prepare_manifest(path: Path, records: list[dict[str, Any]], command: list[str], sweep_file: str) -> dict:
    """The manifest for these runs, keeping the statuses of an earlier pass of the same sweep."""
    fresh = {"format": MANIFEST_FORMAT, "sweep_file": sweep_file, "base_command": command,
             "runs": [{**record, "command": None, "status": None, "seconds": None} for record in records]}
    fresh = json.loads(json.dumps(fresh))  # as it will read back: tuples become lists
    if not path.exists():
        return fresh
    try:
        old = json.loads(path.read_text())
        old_command, old_runs = _identity(old)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise SweepError(f"{path} is not a sweep manifest: give another --root") from None
    new_command, new_runs = _identity(fresh)
    if old.get("format") != MANIFEST_FORMAT or (old_command, old_runs) != (new_command, new_runs):
        what = (f"the command {shlex.join(old_command)!r}" if old_command != new_command
                else f"other runs: {len(old_runs)} there, {len(new_runs)} here")
        raise SweepError(f"{path} belongs to a different sweep ({what}): give another --root, or delete the "
                         "manifest to start over")
    for run, before in zip(fresh["runs"], old["runs"]):
        run.update(status=before.get("status"), seconds=before.get("seconds"), command=before.get("command"))
    return fresh


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Atomically, so that a killed sweep leaves the last complete manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def run_from_manifest(path: str | os.PathLike, index: int) -> list[str]:
    """The rectflow arguments of run `index` (what a SLURM array task runs)."""
    path = Path(path)
    try:
        runs = json.loads(path.read_text())["runs"]
    except FileNotFoundError:
        raise SweepError(f"no manifest {str(path)!r}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SweepError(f"{path} is not a sweep manifest ({err})") from None
    if not 0 <= index < len(runs):
        raise SweepError(f"{path} has runs 0-{len(runs) - 1}, not {index}")
    return list(runs[index]["args"])


def array_spec(indices: list[int]) -> str:
    """SLURM's --array list, with ranges: [0, 1, 2, 5] -> '0-2,5'."""
    parts = []
    for _, group in itertools.groupby(enumerate(indices), key=lambda pair: pair[1] - pair[0]):
        group = [index for _, index in group]
        parts.append(str(group[0]) if len(group) == 1 else f"{group[0]}-{group[-1]}")
    return ",".join(parts)


def local_command(args: list[str]) -> list[str]:
    # sys.executable: works without the `rectflow` entry point on PATH, in this environment.
    return [sys.executable, "-m", "rectflow_jax.cli", *args]


def tpu_command(args: list[str], tpu: str, zone: str) -> list[str]:
    return [str(LAUNCH_DIR / "tpu_pod.sh"), tpu, zone, *args]


def run_in_sequence(manifest: dict, manifest_path: Path, make_command, dry_run: bool) -> int:
    """Runs each unfinished run (status != 0) and records its status; 1 when any failed."""
    failed = []
    for run in manifest["runs"]:
        if run["status"] == 0:
            print(f"sweep: skip {run['name']} (done)", flush=True)
            continue
        run["command"] = make_command(run["args"])
        if dry_run:
            print(shlex.join(run["command"]), flush=True)
            continue
        write_manifest(manifest_path, manifest)
        print(f"sweep: run {run['index']} {run['name']}", flush=True)
        start = time.monotonic()
        status = subprocess.run(run["command"]).returncode
        run.update(status=status, seconds=round(time.monotonic() - start, 1))
        write_manifest(manifest_path, manifest)
        if status != 0:
            print(f"sweep: run {run['index']} {run['name']} exited with {status}", file=sys.stderr, flush=True)
            failed.append(run)
    write_manifest(manifest_path, manifest)
    if failed:
        names = ", ".join(f"{run['name']} ({run['status']})" for run in failed)
        print(f"sweep: {len(failed)} of {len(manifest['runs'])} runs failed: {names}; rerun the same command to "
              f"retry them (see {manifest_path})", file=sys.stderr)
        return 1
    return 0


def submit_slurm(manifest: dict, manifest_path: Path, sbatch_args: list[str], dry_run: bool) -> int:
    """One array job over the unfinished runs; each task reads its argv from the manifest."""
    todo = [run["index"] for run in manifest["runs"] if run["status"] != 0]
    for index in todo:
        run = manifest["runs"][index]
        run["command"] = ["rectflow", *run["args"]]  # slurm_task.sh adds the distributed flags
    write_manifest(manifest_path, manifest)
    if not todo:
        print("sweep: every run is done; nothing to submit")
        return 0
    command = ["sbatch", f"--array={array_spec(todo)}", *sbatch_args, str(LAUNCH_DIR / "slurm.sbatch"),
               "--from_manifest", str(manifest_path)]
    # The job runs a copy of slurm.sbatch: tell it where launch/ is (sbatch exports the environment).
    env = dict(os.environ, RECTFLOW_LAUNCH_DIR=str(LAUNCH_DIR))
    if dry_run:
        print(shlex.join([f"RECTFLOW_LAUNCH_DIR={LAUNCH_DIR}", *command]))
        return 0
    return subprocess.run(command, env=env).returncode


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(our flags, the rectflow command after --)."""
    parser = argparse.ArgumentParser(prog="python launch/sweep.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", help="sweep file: Python defining SWEEP, or JSON")
    parser.add_argument("--root", help="folder of the runs' workdirs and manifest.json")
    parser.add_argument("--mode", choices=MODES, default="local")
    parser.add_argument("--dry_run", action="store_true", help="write the manifest, print the commands, run nothing")
    parser.add_argument("--tpu", help="tpu mode: the TPU VM's name")
    parser.add_argument("--zone", help="tpu mode: its zone")
    parser.add_argument("--manifest", help="where to write the manifest (default ROOT/manifest.json)")
    parser.add_argument("--sbatch_arg", action="append", default=[],
                        help="slurm mode: an sbatch option, e.g. --sbatch_arg=--nodes=2 (repeat for several)")
    parser.add_argument("--run_from_manifest", metavar="MANIFEST",
                        help="print run --index's rectflow arguments, NUL-separated (SLURM array tasks)")
    parser.add_argument("--index", type=int)
    split = argv.index("--") if "--" in argv else len(argv)
    return parser.parse_args(argv[:split]), argv[split + 1:]


def main(argv: list[str] | None = None) -> int:
    flags, command = parse_args(sys.argv[1:] if argv is None else argv)
    if flags.run_from_manifest:
        if flags.index is None:
            raise SweepError("--run_from_manifest needs --index")
        args = run_from_manifest(flags.run_from_manifest, flags.index)
        sys.stdout.buffer.write(b"".join(arg.encode() + b"\0" for arg in args))
        sys.stdout.flush()
        return 0
    if not flags.sweep or not flags.root:
        raise SweepError("give --sweep FILE and --root DIR, then -- and the rectflow command")
    if flags.mode == "tpu" and not (flags.tpu and flags.zone):
        raise SweepError("--mode tpu needs --tpu NAME and --zone ZONE")
    remote_root = "://" in flags.root
    if remote_root and flags.mode != "tpu":
        raise SweepError(f"--root {flags.root}: a URL root works only with --mode tpu (the runs write it there)")
    if remote_root and not flags.manifest:
        raise SweepError(f"--root {flags.root} is not a local folder: give --manifest FILE for the manifest")
    # Local and SLURM runs get absolute workdirs (array tasks start elsewhere); on a pod
    # ROOT is the workers' path, kept as given.
    root = flags.root if flags.mode == "tpu" else str(Path(flags.root).resolve())
    manifest_path = Path(flags.manifest or Path(flags.root) / "manifest.json").resolve()
    records = expand(load_sweep(flags.sweep), root, command)
    manifest = prepare_manifest(manifest_path, records, command, str(flags.sweep))
    print(f"sweep: {len(records)} runs, manifest {manifest_path}", flush=True)
    if flags.mode == "slurm":
        return submit_slurm(manifest, manifest_path, flags.sbatch_arg, flags.dry_run)
    if flags.mode == "tpu":
        make = lambda args: tpu_command(args, flags.tpu, flags.zone)
    else:
        make = local_command
    return run_in_sequence(manifest, manifest_path, make, flags.dry_run)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SweepError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        sys.exit(2)
