"""COCO captions and images for text-to-image evaluation: which (image, caption) pairs a protocol uses.

The user's COCO comes one of two ways (`CocoSource.from_config(config.eval)`):
  - a captions JSON (`captions_val2017.json`, `captions_val2014.json`: {"images": [{"id",
    "file_name"}], "annotations": [{"id", "image_id", "caption"}]}) as `eval.captions` and the
    folder of its images as `eval.images`;
  - a prepared tfds `coco_captions` (COCO 2014 in Karpathy's splits; val2014 is
    `coco_captions:val+test+restval`) as `eval.captions`, with `eval.data_dir` where it lives.

`select_pairs` picks the protocol's pairs, deterministically:

  - images in id order, each with its first caption (lowest annotation id), stripped;
  - `num_images` of them: all when it equals the count (COCO2017-5k: the 5,000 val2017
    images), else a subset drawn without replacement by numpy's default_rng(`seed`),
    kept in id order (COCO2014-30k: 30,000 of the 40,504 val2014 images).

`fid_image` is the one resize both the reference images and the generated ones go
through before Inception: a centre crop to a square (COCO photos are 640x480 and the
like; generations are usually square already), a bicubic resize to the protocol's FID
resolution with PIL (antialiased), and uint8 quantisation. Inception then resizes to
299x299 bilinearly, as pytorch-fid does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds  # light: TensorFlow itself loads on first read
from PIL import Image

from rectflow_jax.data.prompts import prepared_builder

_TFDS_NAME = re.compile(r"^\w+(/[\w.]+)?:[\w+\[\]%:-]+$")  # dataset[/config/version]:split[+split]


class EvalDataError(ValueError):
    """The evaluation's captions or images are missing, unreadable or do not fit the protocol."""


@dataclasses.dataclass(frozen=True)
class CocoPair:
    image_id: int | str
    file_name: str
    caption: str


def _load_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"captions file {str(path)!r} (eval.captions) does not exist")
    try:
        document = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalDataError(f"captions file {str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("annotations"), list) \
            or not isinstance(document.get("images"), list):
        raise EvalDataError(f"captions file {str(path)!r} is not a COCO captions file: it needs 'images' "
                            "[{id, file_name}] and 'annotations' [{id, image_id, caption}]")
    return document


def _sort_key(value) -> tuple[bool, object]:
    return isinstance(value, str), value


def read_pairs(captions: str | os.PathLike) -> list[CocoPair]:
    """Every captioned image of a COCO captions file, in image-id order, with its first caption."""
    document = _load_json(captions)
    files = {}
    for i, image in enumerate(document["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise EvalDataError(f"captions file {str(captions)!r}: images[{i}] lacks 'id' or 'file_name'")
        files[image["id"]] = image["file_name"]
    first: dict = {}
    for i, entry in enumerate(document["annotations"]):
        if not isinstance(entry, dict) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
            raise EvalDataError(f"captions file {str(captions)!r}: annotations[{i}] lacks 'image_id' or a "
                                "text 'caption'")
        if entry["image_id"] not in files:
            raise EvalDataError(f"captions file {str(captions)!r}: annotations[{i}] names image_id "
                                f"{entry['image_id']!r}, which 'images' does not list")
        order = (_sort_key(entry.get("id", i)), i)
        if entry["image_id"] not in first or order < first[entry["image_id"]][0]:
            first[entry["image_id"]] = (order, entry["caption"].strip())
    if not first:
        raise EvalDataError(f"captions file {str(captions)!r} holds no captions")
    return [CocoPair(image_id, files[image_id], first[image_id][1])
            for image_id in sorted(first, key=_sort_key)]


def select_pairs(pairs: Sequence[CocoPair], num_images: int, seed: int = 0, origin: str = "") -> list[CocoPair]:
    """The protocol's `num_images` (image, caption) pairs out of `pairs`; see the module docstring."""
    if num_images <= 0 or num_images > len(pairs):
        raise EvalDataError(f"eval.num_images={num_images} but {origin!r} has {len(pairs)} captioned "
                            f"images; ask for 1..{len(pairs)}")
    if num_images == len(pairs):
        return list(pairs)
    chosen = np.sort(np.random.default_rng(seed).choice(len(pairs), num_images, replace=False))
    return [pairs[i] for i in chosen]


def center_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def fid_image(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8: centre square crop, PIL bicubic resize (skipped when already that size)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = center_square(image.convert("RGB"))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, np.uint8)


def _load_image(root: Path, pair: CocoPair, size: int) -> np.ndarray:
    path = root / pair.file_name
    try:
        with Image.open(path) as image:
            return fid_image(image, size)
    except FileNotFoundError:
        raise EvalDataError(f"image {str(path)!r} of image_id {pair.image_id!r} is missing from eval.images "
                            f"{str(root)!r}") from None
    except OSError as err:
        raise EvalDataError(f"image {str(path)!r} cannot be read ({err})") from None


@dataclasses.dataclass(frozen=True)
class CocoSource:
    """Captions and images: a COCO captions JSON and its folder, or a prepared tfds coco_captions."""

    captions: str
    images: str | None = None
    data_dir: str | None = None

    @classmethod
    def from_config(cls, eval_config) -> "CocoSource":
        captions, images = eval_config.get("captions"), eval_config.get("images")
        if not captions:
            raise EvalDataError("the protocol needs --config.eval.captions (a COCO captions JSON, or a prepared "
                                "tfds coco_captions:SPLIT)")
        if Path(captions).is_file():
            if not images:
                raise EvalDataError(f"eval.captions={captions!r} is a captions file: give its images folder "
                                    "as --config.eval.images")
            if not Path(images).is_dir():
                raise EvalDataError(f"eval.images={images!r} is not an existing folder")
            return cls(str(captions), str(images))
        if not _TFDS_NAME.match(str(captions)):
            raise EvalDataError(f"eval.captions={captions!r} is neither an existing file nor a tfds name "
                                "DATASET:SPLIT (e.g. coco_captions:val+test+restval)")
        if images:
            raise EvalDataError(f"eval.captions={captions!r} is a tfds dataset, which holds its images: leave "
                                "eval.images unset")
        return cls(str(captions), None, eval_config.get("data_dir"))

    @property
    def is_tfds(self) -> bool:
        return self.images is None

    @functools.cached_property
    def _builder_and_split(self):
        """The prepared tfds builder and the split expression, checked once per source."""
        dataset, split = self.captions.split(":", 1)
        builder = prepared_builder(dataset, self.data_dir, "eval.captions", "eval.data_dir", EvalDataError)
        unknown = [s for s in split.split("+") if s.split("[")[0] not in builder.info.splits]
        if unknown:
            raise EvalDataError(f"tfds dataset {builder.info.full_name!r} has no split {unknown[0]!r} (splits: "
                                f"{sorted(builder.info.splits)})")
        return builder, split

    def _examples(self, with_images: bool) -> Iterator[dict]:
        builder, split = self._builder_and_split
        wanted = {"image/id": True, "image/filename": True, "captions": {"id": True, "text": True}}
        if with_images:
            wanted["image"] = True
        decoders = tfds.decode.PartialDecoding(wanted)
        yield from tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders, shuffle_files=False))

    def all_pairs(self) -> list[CocoPair]:
        """Every captioned image, in image-id order, with its first caption."""
        if not self.is_tfds:
            return read_pairs(self.captions)
        pairs = []
        for example in self._examples(with_images=False):
            captions = example["captions"]
            if len(captions["id"]):
                first = int(np.argmin(captions["id"]))
                pairs.append(CocoPair(int(example["image/id"]), example["image/filename"].decode("utf-8"),
                                      captions["text"][first].decode("utf-8").strip()))
        if not pairs:
            raise EvalDataError(f"tfds {self.captions!r} holds no captions")
        return sorted(pairs, key=lambda p: _sort_key(p.image_id))

    def identity(self, pairs: Sequence[CocoPair]) -> dict:
        """What names the reference set cheaply: files and byte sizes, or the tfds dataset and the image ids."""
        if self.is_tfds:
            builder, split = self._builder_and_split
            return {"tfds": builder.info.full_name, "split": split, "image_ids": [p.image_id for p in pairs]}
        return {"images": listing_digest(self.images, pairs)}

    def reference_chunks(self, pairs: Sequence[CocoPair], size: int, chunk: int) -> Iterator[np.ndarray]:
        """The pairs' images through `fid_image`, (n <= chunk, size, size, 3) uint8 at a time.

        In folder order for files; in the dataset's order for tfds (the statistics do not
        depend on the order), every chosen image exactly once.
        """
        if not self.is_tfds:
            root = Path(self.images)
            for start in range(0, len(pairs), chunk):
                yield np.stack([_load_image(root, pair, size) for pair in pairs[start:start + chunk]])
            return
        chosen, seen, batch = {p.image_id for p in pairs}, set(), []
        for example in self._examples(with_images=True):
            image_id = int(example["image/id"])
            if image_id in chosen and image_id not in seen:
                seen.add(image_id)
                batch.append(fid_image(example["image"], size))
                if len(batch) == chunk:
                    yield np.stack(batch)
                    batch = []
        if batch:
            yield np.stack(batch)
        if len(seen) != len(chosen):
            raise EvalDataError(f"tfds {self.captions!r} lacks {len(chosen) - len(seen)} of the chosen images")


def load_reference(images_dir: str | os.PathLike, pairs: Sequence[CocoPair], size: int) -> np.ndarray:
    """The pairs' images from the folder, each through `fid_image`: (N, size, size, 3) uint8."""
    return np.stack([_load_image(Path(images_dir), pair, size) for pair in pairs])


def listing_digest(images_dir: str | os.PathLike, pairs: Sequence[CocoPair]) -> list:
    """Each pair's file name and byte size; a missing image fails here, before any generation."""
    root = Path(images_dir)
    listing = []
    for pair in pairs:
        try:
            listing.append([pair.file_name, (root / pair.file_name).stat().st_size])
        except FileNotFoundError:
            raise EvalDataError(f"image {str(root / pair.file_name)!r} of image_id {pair.image_id!r} is missing "
                                f"from eval.images {str(root)!r}") from None
    return listing
