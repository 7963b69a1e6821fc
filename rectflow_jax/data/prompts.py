"""Prompt (caption) sources for text-to-image pair generation, read through tfds.

`load_prompts(config.data)` gives a `PromptSource`:
  - `num_prompts`: how many prompts the source holds.
  - `prompts(indices)`: the prompts of examples `indices`. Example k uses prompt
    k % num_prompts, so a pair set may hold more examples than there are prompts; prompt
    i is fixed by the source alone (never by hosts, batch sizes or seeds).
  - `spec`: the source in words, with the file's sha256; equal strings mean equal prompt
    lists, so it belongs in pairs.json. The path is not in it (a moved file is the same
    source); it is kept in `origin`.
`host_indices(num_examples, process_index, process_count)` is one deterministic split of
the examples into disjoint contiguous blocks, one per process.

Config keys (defaults in brackets):
  `data.prompts`            a file, or `coco_captions[:SPLIT]` for the tfds dataset.
  `data.prompts_format`     ['auto'] 'txt', 'jsonl', 'parquet', 'coco' (a COCO annotation
                            JSON) or 'tfds'; 'auto' goes by the extension (.txt, .jsonl,
                            .parquet, .json = COCO) and takes a name `coco_captions...`
                            that is not a file for the tfds dataset.
  `data.prompt_key`         ['prompt'] the text field of jsonl objects and parquet columns;
                            when it is 'prompt' and a file lacks it, 'caption', then 'text'.
  `data.captions_per_image` [1] COCO only: each image's first N captions (by annotation
                            id), images in id order; 0 takes them all.
  `data.data_dir`           [None] where tfds prepares caption files (default
                            $XDG_CACHE_HOME or ~/.cache, then rectflow_jax/tfds) and where
                            a prepared coco_captions lives (default: tfds's own).

Formats: .txt is one prompt a line, stripped, blank lines skipped; .jsonl one JSON object a
line; .parquet one text column (read with pyarrow). jsonl and parquet prompts are kept
exactly, the empty prompt included (it is the unconditional prompt of CFG); COCO captions
are stripped. A source that yields no prompt at all is an error.

A file becomes the 'train' split of a `CaptionFile` tfds dataset whose config name holds
the sha256 of the file's bytes, so an edited file is prepared afresh, never served stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds  # light: TensorFlow itself loads on first read or write

from rectflow_jax.configlib import ConfigError

FILE_FORMATS = ("txt", "jsonl", "parquet", "coco")
_EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet", ".json": "coco"}
DEFAULT_PROMPT_KEY = "prompt"
_FALLBACK_KEYS = ("caption", "text")  # tried in order when the default key is absent
_TFDS_NAME = re.compile(r"^coco_captions(/[\w.]+)?(:\w+)?$")


class PromptFileError(ValueError):
    """A prompt source (data.prompts) is missing, unreadable, empty or lacks its text."""


def _error(origin: str, problem: str) -> PromptFileError:
    return PromptFileError(f"prompt file {origin!r} given as data.prompts {problem}")


def default_data_dir() -> str:
    """Where caption files are prepared when `data.data_dir` is not set."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "rectflow_jax", "tfds")


# ---------------------------------------------------------------------------- parsing


def _choose_key(keys: Sequence[str], prompt_key: str) -> str | None:
    if prompt_key in keys:
        return prompt_key
    if prompt_key == DEFAULT_PROMPT_KEY:
        return next((k for k in _FALLBACK_KEYS if k in keys), None)
    return None


def _wanted(prompt_key: str, what: str = "key") -> str:
    if prompt_key == DEFAULT_PROMPT_KEY:
        return f"{what} {prompt_key!r} (nor {' or '.join(map(repr, _FALLBACK_KEYS))})"
    return f"{what} {prompt_key!r}"


def _text(value: Any, origin: str, where: str) -> str:
    if value is None:
        raise _error(origin, f"has no text at {where} (null)")
    if not isinstance(value, str):
        raise _error(origin, f"has a {type(value).__name__} at {where}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes; tfds could not store them
        raise _error(origin, f"has text at {where} that is not valid Unicode") from None
    return value


def _decode(data: bytes, origin: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a BOM is not part of the first prompt
    except UnicodeDecodeError as err:
        raise _error(origin, f"is not UTF-8 text (bad byte at offset {err.start})") from None


def _parse_txt(data: bytes, origin: str) -> list[str]:
    lines = (line.strip() for line in _decode(data, origin).split("\n"))
    return [line for line in lines if line]


def _parse_jsonl(data: bytes, origin: str, prompt_key: str) -> list[str]:
    prompts, key = [], None
    for number, line in enumerate(_decode(data, origin).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise _error(origin, f"is not valid JSON on line {number} ({err.msg})") from None
        if not isinstance(record, dict):
            raise _error(origin, f"holds a JSON {type(record).__name__} on line {number}, not an object")
        if key is None:  # the first object decides which key the whole file uses
            key = _choose_key(list(record), prompt_key)
            if key is None:
                raise _error(origin, f"has no {_wanted(prompt_key)} on line {number} "
                                     f"(keys there: {sorted(record)}); set data.prompt_key")
        if key not in record:
            raise _error(origin, f"has no key {key!r} on line {number}, which earlier lines use "
                                 f"(keys there: {sorted(record)})")
        prompts.append(_text(record[key], origin, f"line {number}"))
    return prompts


def _parse_parquet(data: bytes, origin: str, prompt_key: str) -> list[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise _error(origin, "is parquet, which needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        names = parquet.schema_arrow.names
        key = _choose_key(names, prompt_key)
        if key is None:
            raise _error(origin, f"has no {_wanted(prompt_key, 'column')} (columns: {names}); set data.prompt_key")
        values = parquet.read(columns=[key]).column(key).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise _error(origin, f"is not a readable parquet file ({err})") from None
    return [_text(value, origin, f"row index {i} of column {key!r}") for i, value in enumerate(values)]


def _sort_key(value: Any) -> tuple[bool, Any]:
    return isinstance(value, str), value  # ints in order, then strings in order


def _coco_order(captions: Sequence[tuple[Any, Any, str]], captions_per_image: int) -> list[str]:
    """(image_id, order, caption) -> prompts: images in id order, each image's first captions."""
    per_image: dict[Any, list[str]] = {}
    for image_id, _, caption in sorted(captions, key=lambda c: (_sort_key(c[0]), _sort_key(c[1]))):
        per_image.setdefault(image_id, []).append(caption.strip())
    take = slice(None) if captions_per_image == 0 else slice(captions_per_image)
    return [caption for texts in per_image.values() for caption in texts[take]]


def _parse_coco(data: bytes, origin: str, captions_per_image: int) -> list[str]:
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        hint = "; one object a line is JSON lines: name it .jsonl" if "Extra data" in str(err) else ""
        raise _error(origin, f"is not valid JSON ({err}){hint}") from None
    if not isinstance(document, dict) or not isinstance(document.get("annotations"), list):
        found = sorted(document) if isinstance(document, dict) else f"a JSON {type(document).__name__}"
        raise _error(origin, 'is not COCO captions ({"annotations": [{"image_id", "caption"}, ...]}; '
                             f"found {found}); for JSON lines use .jsonl or data.prompts_format='jsonl'")
    annotations = document["annotations"]
    for i, entry in enumerate(annotations):
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise _error(origin, f"has annotations[{i}] without 'image_id' and 'caption' (found {keys})")
        if not isinstance(entry["image_id"], (int, str)) or isinstance(entry["image_id"], bool):
            raise _error(origin, f"has annotations[{i}] whose image_id is a {type(entry['image_id']).__name__}")
        _text(entry["caption"], origin, f"annotations[{i}]")
    # An image's first caption is its lowest annotation id (COCO files all have ids), else file order.
    by_id = all(isinstance(a.get("id"), int) and not isinstance(a.get("id"), bool) for a in annotations)
    return _coco_order([(a["image_id"], a["id"] if by_id else i, a["caption"]) for i, a in enumerate(annotations)],
                       captions_per_image)


def parse_prompt_file(data: bytes, file_format: str, origin: str, prompt_key: str = DEFAULT_PROMPT_KEY,
                      captions_per_image: int = 1) -> list[str]:
    """The prompts in a caption file's bytes, in order; `origin` names the file in errors."""
    if file_format == "txt":
        prompts = _parse_txt(data, origin)
    elif file_format == "jsonl":
        prompts = _parse_jsonl(data, origin, prompt_key)
    elif file_format == "parquet":
        prompts = _parse_parquet(data, origin, prompt_key)
    elif file_format == "coco":
        prompts = _parse_coco(data, origin, captions_per_image)
    else:
        raise ValueError(f"unknown caption file format {file_format!r}; valid: {FILE_FORMATS}")
    if not prompts:
        raise _error(origin, f"holds no prompts (read as {file_format})")
    return prompts


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise _error(path, "does not exist") from None
    except IsADirectoryError:
        raise _error(path, "is a directory, not a file") from None
    except OSError as err:
        raise _error(path, f"cannot be read ({err.strerror or err})") from None


# ------------------------------------------------------------------------------- tfds


@dataclasses.dataclass(eq=False)
class CaptionFileConfig(tfds.core.BuilderConfig):
    """One caption file; `name` carries its sha256 (and the options), so content picks the data."""

    path: str = ""
    file_format: str = "txt"
    sha256: str = ""
    prompt_key: str = DEFAULT_PROMPT_KEY
    captions_per_image: int = 1

    @classmethod
    def for_file(cls, path: str, file_format: str, sha256: str, prompt_key: str = DEFAULT_PROMPT_KEY,
                 captions_per_image: int = 1) -> CaptionFileConfig:
        options = {"jsonl": {"prompt_key": prompt_key}, "parquet": {"prompt_key": prompt_key},
                   "coco": {"captions_per_image": captions_per_image}}.get(file_format, {})
        name = f"{file_format}-{sha256[:16]}"
        if options:  # the options change what a file yields, so they are in the name too
            name += "-" + hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
        return cls(name=name, path=str(path), file_format=file_format, sha256=sha256, prompt_key=prompt_key,
                   captions_per_image=captions_per_image,
                   description=f"{file_format} caption file sha256:{sha256} {json.dumps(options, sort_keys=True)}")


class CaptionFile(tfds.core.GeneratorBasedBuilder):
    """A local caption file as a tfds dataset: split 'train', prompt i = the file's i-th prompt."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "txt, jsonl, parquet and COCO annotation JSON caption files."}

    # No code folder to look for checksums in (nothing is downloaded); tfds 4.9's search
    # for one imports importlib_resources, which recent etils no longer installs.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Prompts of one caption file, in file order.",
            features=tfds.features.FeaturesDict({"prompt": tfds.features.Text(), "index": np.int64}),
            disable_shuffling=True,  # file order on disk; readers still sort by 'index'
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the file is local
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        config = self.builder_config
        data = _read_bytes(config.path)
        if hashlib.sha256(data).hexdigest() != config.sha256:  # else stale data would get the new name
            raise _error(config.path, "changed while it was being prepared; run again")
        prompts = parse_prompt_file(data, config.file_format, config.path, config.prompt_key,
                                    config.captions_per_image)
        for index, prompt in enumerate(prompts):
            yield index, {"prompt": prompt, "index": index}


def _prepare(config: CaptionFileConfig, data_dir: str) -> CaptionFile:
    builder = CaptionFile(config=config, data_dir=data_dir)
    download_config = tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP)
    try:
        builder.download_and_prepare(download_config=download_config)  # a no-op once prepared
    except OSError:
        # Another process sharing data_dir may have renamed the same dataset into place first.
        builder = CaptionFile(config=config, data_dir=data_dir)
        if not builder.is_prepared():
            raise
    return builder


def _read_prepared(builder: CaptionFile) -> tuple[str, ...]:
    batch = tfds.as_numpy(builder.as_dataset(split="train", batch_size=-1))  # the whole split at once
    order = np.argsort(batch["index"], kind="stable")
    if not np.array_equal(batch["index"][order], np.arange(len(order))):
        raise ValueError(f"{builder.data_dir} holds prompt indices that are not 0..{len(order) - 1}")
    return tuple(prompt.decode("utf-8") for prompt in batch["prompt"][order])


# ---------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class PromptSource:
    """Prompts addressed by index; see the module docstring."""

    spec: str
    origin: str  # the path or tfds name they came from; not part of `spec`
    all_prompts: tuple[str, ...] = dataclasses.field(repr=False)

    def __post_init__(self):
        if not self.all_prompts:
            raise ValueError("a PromptSource needs at least one prompt")

    @property
    def num_prompts(self) -> int:
        return len(self.all_prompts)

    def prompts(self, indices: Sequence[int]) -> list[str]:
        """The prompts of examples `indices`: example k uses prompt k % num_prompts."""
        out = []
        for k in indices:
            k = operator.index(k)  # numpy integers pass, floats do not
            if k < 0:
                raise ValueError(f"example index {k} is negative")
            out.append(self.all_prompts[k % len(self.all_prompts)])
        return out


def host_indices(num_examples: int, process_index: int, process_count: int) -> range:
    """Examples [p*N//P, (p+1)*N//P) for process p of P: disjoint, covering 0..N-1, sizes within one."""
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} is outside 0..{process_count - 1}")
    return range(process_index * num_examples // process_count, (process_index + 1) * num_examples // process_count)


def _file_format(path: str, prompts_format: str) -> str:
    if prompts_format != "auto":
        return prompts_format
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise _error(path, f"has an unknown extension {suffix or '(none)'!r}; use .txt, .jsonl, .parquet or a "
                           "COCO .json, or set data.prompts_format")
    return _EXTENSIONS[suffix]


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise _error(path, f"cannot be read ({err.strerror or err})") from None
    return digest.hexdigest()


def _load_file(path: str, file_format: str, prompt_key: str, captions_per_image: int,
               data_dir: str | None) -> PromptSource:
    if not os.path.exists(path):
        raise _error(path, "does not exist")
    if os.path.isdir(path):
        raise _error(path, "is a directory, not a file")
    file_format = _file_format(path, file_format)
    sha256 = _sha256_file(path)
    config = CaptionFileConfig.for_file(path, file_format, sha256, prompt_key, captions_per_image)
    builder = _prepare(config, data_dir or default_data_dir())
    prompts = _read_prepared(builder)
    options = {"jsonl": f", prompt_key {prompt_key!r}", "parquet": f", prompt_key {prompt_key!r}",
               "coco": f", captions_per_image {captions_per_image}"}.get(file_format, "")
    spec = (f"{file_format} caption file sha256:{sha256}{options}: {len(prompts)} prompts "
            f"({CaptionFile.name} {CaptionFile.VERSION})")
    return PromptSource(spec=spec, origin=os.path.abspath(path), all_prompts=prompts)


def prepared_builder(dataset: str, data_dir: str | None, given_as: str, data_dir_key: str,
                     error: type[Exception]) -> tfds.core.DatasetBuilder:
    """The builder of a tfds dataset the user prepared; `error` naming the config keys when it is not."""
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise error(f"tfds dataset {dataset!r} given as {given_as} does not exist") from None
    if not builder.is_prepared():  # never downloaded from here: COCO's images are some 20 GB
        raise error(f"tfds dataset {builder.info.full_name!r} given as {given_as} is not prepared in "
                    f"{str(builder.data_dir_root)!r} ({data_dir_key}); prepare it first, e.g. "
                    f"tfds build {dataset} --data_dir {builder.data_dir_root}")
    return builder


def _load_tfds_captions(name: str, captions_per_image: int, data_dir: str | None) -> PromptSource:
    """A prepared tfds dataset with coco_captions' features ('image/id', 'captions': {'id', 'text'})."""
    dataset, _, split = name.partition(":")
    split = split or "train"
    builder = prepared_builder(dataset, data_dir, "data.prompts", "data.data_dir", PromptFileError)
    if split not in builder.info.splits:
        raise PromptFileError(f"tfds dataset {builder.info.full_name!r} given as data.prompts has no split {split!r} "
                              f"(splits: {sorted(builder.info.splits)})")
    # Only ids and captions are decoded; the image bytes are still read past, once.
    decoders = tfds.decode.PartialDecoding({"image/id": True, "captions": {"id": True, "text": True}})
    captions = []
    for example in tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)):
        image_id = int(example["image/id"])
        for caption_id, text in zip(example["captions"]["id"], example["captions"]["text"]):
            captions.append((image_id, int(caption_id), text.decode("utf-8")))
    prompts = tuple(_coco_order(captions, captions_per_image))
    if not prompts:
        raise PromptFileError(f"tfds dataset {builder.info.full_name!r} split {split!r} given as data.prompts "
                              "holds no captions")
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()  # no file to hash: hash the prompts
    spec = (f"tfds {builder.info.full_name} split {split}, captions_per_image {captions_per_image}: "
            f"{len(prompts)} prompts sha256:{digest}")
    return PromptSource(spec=spec, origin=f"{builder.info.full_name}:{split}", all_prompts=prompts)


def load_prompts(data_config: Mapping[str, Any]) -> PromptSource:
    """The prompts named by `data_config.prompts` (see the module docstring for the keys)."""
    source = data_config.get("prompts")
    prompts_format = data_config.get("prompts_format", "auto")
    prompt_key = data_config.get("prompt_key", DEFAULT_PROMPT_KEY)
    captions_per_image = data_config.get("captions_per_image", 1)
    data_dir = data_config.get("data_dir")
    if not source or not isinstance(source, (str, os.PathLike)):
        raise ConfigError("data.prompts must name a caption file (.txt, .jsonl, .parquet or a COCO .json) "
                          f"or coco_captions[:SPLIT], got {source!r}")
    if prompts_format not in ("auto", *FILE_FORMATS, "tfds"):
        raise ConfigError(f"unknown data.prompts_format {prompts_format!r}; valid: {['auto', *FILE_FORMATS, 'tfds']}")
    if not isinstance(prompt_key, str) or not prompt_key:
        raise ConfigError(f"data.prompt_key must be a non-empty string, got {prompt_key!r}")
    if isinstance(captions_per_image, bool) or not isinstance(captions_per_image, int) or captions_per_image < 0:
        raise ConfigError(f"data.captions_per_image must be an integer >= 0 (0 = all), got {captions_per_image!r}")
    source = os.fspath(source)
    if prompts_format == "tfds" or (prompts_format == "auto" and _TFDS_NAME.match(source)
                                    and not os.path.exists(source)):
        return _load_tfds_captions(source, captions_per_image, data_dir)
    return _load_file(source, prompts_format, prompt_key, captions_per_image, data_dir)
