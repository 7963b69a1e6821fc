"""diffusers/transformers folders <-> Flax params.

One naming rule serves every ported model: a Flax module names its submodules after
the PyTorch attributes, with list indices written as `_N` (`down_blocks_0`,
`to_out_0`), so the PyTorch tensor name of a Flax leaf is the path joined by dots,
`_N` turned into `.N`, and the leaf renamed (`kernel`/`scale`/`embedding` ->
`weight`). Layout differences (conv OIHW <-> HWIO, linear (out, in) <-> (in, out))
follow from the leaf name and rank. Loading is strict: every missing, unexpected or
mis-shaped tensor is reported by name.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from rectflow_jax import parallel

# Segments that end in `_<digit>` but are plain attribute names in PyTorch.
LITERAL_SEGMENTS = frozenset({"linear_1", "linear_2"})
_INDEXED = re.compile(r"^(.+)_(\d+)$")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NUMPY_TO_SAFETENSORS = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


class WeightLoadError(ValueError):
    """A pretrained folder could not be read into (or written from) Flax params."""


class UnsupportedConfigError(WeightLoadError, NotImplementedError):
    """A model config sets a key this port does not implement (also a NotImplementedError:
    the value is valid for diffusers/transformers, the port lacks the feature)."""


def _comparable(value: Any) -> Any:
    return tuple(_comparable(v) for v in value) if isinstance(value, (list, tuple)) else value


def check_config(model: str, config: Mapping[str, Any], accepted: Iterable[str],
                 only: Mapping[str, tuple]) -> None:
    """Refuses every config key that the port would otherwise silently ignore.

    Keys in `only` pass at the listed values; `accepted` keys at any value (implemented
    ones, metadata, and keys that only reach features refused elsewhere); keys starting
    with '_' are the libraries' own bookkeeping. Any other key is unknown to
    the port: a newer library may give it a meaning, so it is refused too.
    """
    accepted = set(accepted)
    for key, value in config.items():
        if key in only:
            if _comparable(value) not in only[key]:
                allowed = " or ".join(repr(v) for v in only[key])
                raise UnsupportedConfigError(f"{model} config {key}={value!r} is not supported (only {allowed})")
        elif not (key.startswith("_") or key in accepted):
            raise UnsupportedConfigError(
                f"{model} config key {key}={value!r} is unknown to this port, which cannot tell whether it "
                "changes the model; remove it from config.json if it does not")


# ----------------------------------------------------------------------------- names


def torch_name(flax_path: tuple[str, ...]) -> str:
    """PyTorch state-dict name of the Flax leaf at `flax_path` (without 'params')."""
    *modules, leaf = flax_path
    parts = []
    for segment in modules:
        match = _INDEXED.match(segment)
        if match and segment not in LITERAL_SEGMENTS:
            parts.extend(match.groups())
        else:
            parts.append(segment)
    if leaf not in _LEAF_TO_TORCH:
        raise WeightLoadError(f"no PyTorch name for Flax leaf {'/'.join(flax_path)}")
    parts.append(_LEAF_TO_TORCH[leaf])
    return ".".join(parts)


def _to_flax_layout(leaf: str, value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4 and len(flax_shape) == 4:  # conv OIHW -> HWIO
            return value.transpose(2, 3, 1, 0)
        if value.ndim == 4 and len(flax_shape) == 2 and value.shape[2:] == (1, 1):
            return value[:, :, 0, 0].T  # 1x1 conv stored where we use a Dense
        if value.ndim == 2:
            return value.T
    return value


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)
        if value.ndim == 2:
            return value.T
    return value


# ----------------------------------------------------------------------------- files


def resolve_folder(folder: str | os.PathLike, subfolder: str | None = None) -> Path:
    from rectflow_jax import storage

    storage.require_local(folder, "pretrained folder", WeightLoadError)
    root = Path(folder)
    if not root.is_dir():
        raise WeightLoadError(f"pretrained folder {str(root)!r} does not exist or is not a directory")
    path = root / subfolder if subfolder else root
    if not path.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise WeightLoadError(
            f"subfolder {subfolder!r} is missing from {str(root)!r} (it has: {', '.join(present) or 'no subfolders'})")
    if not (path / "config.json").is_file():
        raise WeightLoadError(f"{str(path)!r} has no config.json; is it a diffusers/transformers model folder?")
    return path


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise WeightLoadError(f"{str(path / 'config.json')!r} is not valid JSON: {err}") from err


def read_safetensors(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a .safetensors file to numpy, bf16 included (ml_dtypes), without torch."""
    with open(file, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
        # Memory-mapped: a multi-GB checkpoint is paged in as tensors are converted.
        data = memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise WeightLoadError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = array.reshape(info["shape"])
    return tensors


def write_safetensors(file: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        raw = array.tobytes()
        header[name] = {"dtype": _NUMPY_TO_SAFETENSORS[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    tmp = Path(str(file) + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for raw in chunks:
            handle.write(raw)
    os.replace(tmp, file)


PICKLE_SUFFIXES = (".pth", ".pt", ".bin")


def read_weight_file(file: str | os.PathLike, *, what: str, where: str = "", allow_pickle: bool = False,
                     pickle_hint: str = "allow_pickle=True", convert: str = "") -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, or of a PyTorch pickle (.pth/.pt/.bin) if allowed.

    For the errors: `what` names the weights ("LPIPS", "FID Inception"), `where` the config
    key that names the file, `pickle_hint` how a user allows pickles, `convert` the command
    that turns one into safetensors.
    """
    path = Path(file)
    at = f" ({where})" if where else ""
    if not path.is_file():
        hint = f"; set {where} to an existing file" if where else ""
        raise WeightLoadError(f"{what} weight file {str(path)!r} does not exist{hint}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return read_safetensors(path)
        except (OSError, ValueError, KeyError, struct.error) as err:
            raise WeightLoadError(f"{str(path)!r} is not a readable safetensors file{at}: {err}") from err
    if suffix not in PICKLE_SUFFIXES:
        raise WeightLoadError(f"{str(path)!r}{at} is neither .safetensors nor a PyTorch "
                              f"{'/'.join(PICKLE_SUFFIXES)} file")
    convert = f" with `{convert}`" if convert else ""
    if not allow_pickle:
        raise WeightLoadError(f"{str(path)!r}{at} is a PyTorch pickle and pickles can run code, so pass "
                              f"{pickle_hint} to read it, or convert it once to safetensors{convert}")
    try:
        import torch
    except ImportError as err:
        raise WeightLoadError(f"reading the PyTorch pickle {str(path)!r}{at} needs torch, which is not installed "
                              f"(pip install torch==2.13.0); or convert it once, where torch is{convert}") from err
    try:
        # map_location: some released pickles (lpips' vgg.pth) hold CUDA tensors.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad or foreign file; all are bad input here
        raise WeightLoadError(f"torch.load(weights_only=True) cannot read {str(path)!r}{at}: {err}") from err
    if not isinstance(state, Mapping):
        raise WeightLoadError(f"{str(path)!r}{at} holds a {type(state).__name__}, not a state dict of tensors")
    odd = sorted(str(name) for name, value in state.items() if not isinstance(value, torch.Tensor))
    if odd:
        raise WeightLoadError(f"{str(path)!r}{at} is not a plain state dict; these entries are not tensors: "
                              f"{', '.join(odd)}")
    return {name: t.float().numpy() if t.is_floating_point() else t.numpy() for name, t in state.items()}


def _weight_files(path: Path, suffix: str) -> list[Path]:
    files = sorted(p for p in path.glob(f"*{suffix}"))
    # Prefer full-precision files over variants such as model.fp16.safetensors.
    plain = [p for p in files if p.name.count(".") == 1]
    return plain or files


def read_state_dict(path: Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a model folder: safetensors first, a PyTorch .bin only if allowed."""
    safetensors_files = _weight_files(path, ".safetensors")
    if safetensors_files:
        state: dict[str, np.ndarray] = {}
        for file in safetensors_files:
            state.update(read_safetensors(file))
        return state
    bin_files = _weight_files(path, ".bin")
    if not bin_files:
        raise WeightLoadError(f"{str(path)!r} holds no weights (*.safetensors or *.bin)")
    if not allow_pickle:
        raise WeightLoadError(
            f"{str(path)!r} has only PyTorch pickle weights ({bin_files[0].name}); pickles can run code, "
            "so pass allow_pickle=True to read them, or convert the folder to safetensors")
    try:
        import torch
    except ImportError as err:
        raise WeightLoadError(
            f"{str(path)!r} has only PyTorch .bin weights and reading them needs torch, which is not "
            "installed (pip install torch==2.13.0), or convert the folder to safetensors") from err
    state = {}
    for file in bin_files:
        for name, tensor in torch.load(file, map_location="cpu", weights_only=True).items():
            state[name] = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    return state


# ----------------------------------------------------------------------------- params


def params_from_state_dict(
    template: Mapping[str, Any],
    state_dict: Mapping[str, np.ndarray],
    *,
    ignore: Iterable[str] = (),
    dtype: Any = np.float32,
    source: str = "checkpoint",
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
    name_of: Callable[[tuple[str, ...]], str] | None = None,
) -> dict[str, Any]:
    """Fills a Flax param template (shapes, e.g. from jax.eval_shape) from a state dict.

    `ignore` lists regexes of PyTorch names that are not parameters (buffers such as
    CLIP's position_ids). Any mismatch raises one WeightLoadError naming every tensor.
    `place(path, array)` turns each converted leaf into what is returned (e.g. a jax.Array
    on a device); leaves are converted one at a time, after every name and shape checked.
    `name_of(path)` is the PyTorch name of a Flax leaf (default `torch_name`).
    """
    name_of = name_of or torch_name
    flat_template = traverse_util.flatten_dict(template)
    ignore_patterns = [re.compile(p) for p in ignore]
    used, missing, misshaped, views = set(), [], [], {}
    for path, leaf in flat_template.items():
        name = name_of(path)
        shape = tuple(leaf.shape)
        if name not in state_dict:
            missing.append(name)
            continue
        used.add(name)
        value = _to_flax_layout(path[-1], np.asarray(state_dict[name]), shape)
        if value.shape != shape:
            misshaped.append(f"{name} {tuple(state_dict[name].shape)} (expected {shape} in Flax layout)")
            continue
        views[path] = value
    unexpected = sorted(n for n in state_dict if n not in used and not any(p.search(n) for p in ignore_patterns))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)}: {', '.join(misshaped)}")
    if problems:
        raise WeightLoadError(f"{source} does not match the model: " + "; ".join(problems))
    # One leaf at a time: at most one converted host copy exists beside the placed params.
    flat_params = {}
    for path in list(views):
        value = np.asarray(views.pop(path), dtype=dtype)
        flat_params[path] = value if place is None else place(path, value)
    return traverse_util.unflatten_dict(flat_params)


def state_dict_from_params(params: Mapping[str, Any], dtype: Any = np.float32,
                           name_of: Callable[[tuple[str, ...]], str] | None = None) -> dict[str, np.ndarray]:
    """Inverse of params_from_state_dict: PyTorch names and layouts."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    name_of = name_of or torch_name
    return {name_of(path): np.asarray(_to_torch_layout(path[-1], np.asarray(v)), dtype=dtype)
            for path, v in flat.items()}


def save_pretrained(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    params: Mapping[str, Any],
    weights_name: str,
) -> Path:
    """Writes config.json and `weights_name` (safetensors) in PyTorch names and layouts."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    write_safetensors(out / weights_name, state_dict_from_params(params))
    return out


def placement(template: Mapping[str, Any], shardings: Any = None,
              on_host: bool = False) -> Callable[[tuple[str, ...], np.ndarray], Any] | None:
    """The `place` of params_from_state_dict for from_pretrained's `shardings` / `on_host`.

    None: jax.Arrays on the default device. A Sharding: every leaf placed by it. A pytree
    of Shardings shaped like the params (e.g. parallel.param_shardings): each leaf by its own.
    """
    if on_host:
        if shardings is not None:
            raise ValueError("on_host=True returns numpy arrays on the host; it takes no shardings")
        return None
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        by_path = lambda path: shardings
    else:
        flat = traverse_util.flatten_dict(shardings)
        wanted = set(traverse_util.flatten_dict(template))
        if set(flat) != wanted:
            odd = sorted("/".join(p) for p in set(flat) ^ wanted)
            raise ValueError(f"shardings must mirror the params tree; these paths differ: {', '.join(odd[:5])}"
                             + (f" and {len(odd) - 5} more" if len(odd) > 5 else ""))
        bad = sorted("/".join(p) for p, s in flat.items() if not isinstance(s, jax.sharding.Sharding))
        if bad:
            raise ValueError(f"shardings must be jax.sharding.Sharding objects; not at {', '.join(bad[:5])}")
        by_path = flat.__getitem__

    def place(path: tuple[str, ...], value: np.ndarray) -> jax.Array:
        # A private host copy of views into the memory-mapped file: on CPU, device_put would
        # alias an aligned view, and the params would then change or fault with the file.
        if not value.flags.owndata:
            value = value.copy()
        sharding = by_path(path)
        # Across processes each takes its own shards of its own read (parallel.put).
        return jax.device_put(value) if sharding is None else parallel.put(value, sharding)

    return place


def load_pretrained(
    folder: str | os.PathLike,
    subfolder: str | None,
    build: Callable[[dict[str, Any]], Any],
    init_inputs: Callable[[Any], tuple],
    *,
    ignore: Iterable[str] = (),
    rename: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    allow_pickle: bool = False,
    dtype: Any = np.float32,
    shardings: Any = None,
    on_host: bool = False,
    name_of: Callable[[tuple[str, ...]], str] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Shared body of every `from_pretrained`: config -> module, tensors -> params.

    `build(config)` returns the Flax module; `init_inputs(module)` returns example
    inputs for module.init (only their shapes matter: init is traced, not run);
    `rename` maps legacy tensor names onto current ones. The params are jax.Arrays on
    the default device, or placed by `shardings` (see `placement`); `on_host=True` gives
    numpy arrays instead (views into the file where no conversion was needed), for
    conversion work. `name_of` overrides the PyTorch naming rule (`torch_name`).
    """
    path = resolve_folder(folder, subfolder)
    module = build(read_config(path))
    state = read_state_dict(path, allow_pickle=allow_pickle)
    if rename is not None:
        state = rename(state)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *init_inputs(module)))
    from flax import linen as nn

    template = nn.unbox(abstract)["params"]
    return module, params_from_state_dict(template, state, ignore=ignore, dtype=dtype, source=str(path),
                                          place=placement(template, shardings, on_host), name_of=name_of)


def parse_scaled_path(text: str, what: str, default: float | None = None) -> tuple[str, float | None]:
    """'PATH' or 'PATH:SCALE' -> (path, scale), `default` without a scale: how --lora and --controlnet
    name an adapter and its weight.

    Only a suffix after the last ':' that reads as a number is a scale, so gs://bucket/x.safetensors
    stays whole (and gs://bucket/x.safetensors:0.5 scales it).
    """
    if not text:
        raise ValueError(f"a {what} is PATH or PATH:SCALE; got an empty string")
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            return text, default
        if not math.isfinite(scale):
            raise ValueError(f"{what} {text!r}: the scale {tail!r} is not a finite number")
        return head, scale
    return text, default
