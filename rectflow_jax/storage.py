"""Paths that may be local or on an object store (gs://...), through etils.epath as Orbax does.

`pathlib.Path("gs://bucket/run")` is the local relative path "gs:/bucket/run": a run
meant for a bucket would quietly write to a directory named "gs:" wherever it was
started. Every path a stage writes or reads (checkpoints, pairs, reports, logs) goes
through `path` instead, and files are written by the helpers below, never by
`open` or `os.replace` on a path that may be remote. epath sends gs:// to tf.io.gfile
and anything else to the local file system, unchanged.

Pretrained diffusers folders and measuring networks (weights, tokenizers, Inception)
are read by libraries that take local folders only; `local_copy` fetches a small
remote folder for them, and their loaders refuse a remote one with a clear error.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import re
import tempfile
from typing import Any, Iterator, Mapping

import numpy as np
from etils import epath

PathLike = str | os.PathLike

# What pathlib makes of a URL: "gs://b/x" -> "gs:/b/x". Such a path was mangled before it got here.
_MANGLED_URL = re.compile(r"^(gs|s3|az|hf):/(?!/)")


def path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path: gs://... stays a URL, a local path stays as it is (relative or not)."""
    if _MANGLED_URL.match(os.fspath(p)):
        raise ValueError(f"{os.fspath(p)!r} is a URL that went through pathlib.Path (it collapses '//'); "
                         "pass the URL string, or rectflow_jax.storage.path of it")
    return epath.Path(p)


def is_remote(p: PathLike) -> bool:
    """Whether `p` names an object store (gs://, s3://, ...) rather than the local file system."""
    return "://" in os.fspath(path(p))


def write_bytes_atomic(p: PathLike, data: bytes, *, tmp_suffix: str = ".tmp") -> epath.Path:
    """Writes `data` under a temporary name beside `p`, then renames it: `p` exists whole or not at all.

    Locally the rename is atomic. On an object store (tf.io.gfile on GCS) it is a copy plus
    a delete, so the data is stored twice and the two steps are not atomic together; an
    object there appears only once its upload is complete anyway, so readers never see
    half a file on either.
    """
    target = path(p)
    tmp = target.with_name(target.name + tmp_suffix)
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def write_text_atomic(p: PathLike, text: str, *, tmp_suffix: str = ".tmp") -> epath.Path:
    return write_bytes_atomic(p, text.encode("utf-8"), tmp_suffix=tmp_suffix)


def write_json(p: PathLike, payload: Mapping[str, Any], *, tmp_suffix: str = ".tmp", **dumps: Any) -> epath.Path:
    """`payload` as JSON (indent 2, sorted keys unless `dumps` says otherwise), atomically."""
    options = dict(indent=2, sort_keys=True) | dumps
    return write_text_atomic(p, json.dumps(payload, **options), tmp_suffix=tmp_suffix)


def save_npz(p: PathLike, arrays: Mapping[str, Any], *, tmp_suffix: str = ".tmp") -> epath.Path:
    """np.savez of `arrays` (uncompressed), made in memory and written atomically in one piece."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return write_bytes_atomic(p, buffer.getvalue(), tmp_suffix=tmp_suffix)


def copy_tree(src: PathLike, dst: PathLike) -> epath.Path:
    """Copies the folder `src` to `dst` (which must not exist yet), local or remote on either side."""
    source, target = path(src), path(dst)
    if target.exists():
        raise FileExistsError(f"{os.fspath(target)!r} exists already")
    for root, _, files in source.walk():
        here = target / root.relative_to(source)
        here.mkdir(parents=True, exist_ok=True)
        for name in files:
            (root / name).copy(here / name)
    return target


def remove_tree(p: PathLike) -> None:
    """Removes a folder if it is there, ignoring errors (as shutil.rmtree(ignore_errors=True))."""
    with contextlib.suppress(OSError):
        path(p).rmtree()


@contextlib.contextmanager
def local_copy(folder: PathLike) -> Iterator[PathLike]:
    """`folder` itself when local; else a temporary local copy of it, for libraries that read local
    folders only (transformers' tokenizers). Meant for small folders: it is fetched whole."""
    if not is_remote(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="rectflow-") as tmp:
        local = pathlib.Path(tmp) / path(folder).name
        copy_tree(folder, local)
        yield local


def require_local(folder: PathLike, what: str, error: type[Exception] = ValueError) -> None:
    """Refuses a remote `folder` for a reader that takes local files only, saying what to do."""
    if is_remote(folder):
        raise error(f"{what} {os.fspath(folder)!r} is remote, and is read from a local folder only: copy it "
                         "locally (e.g. gcloud storage cp -r) and pass that path")
