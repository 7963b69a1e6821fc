"""COCO captions and images for text-to-image evaluation: which (image, caption) pairs a protocol uses.

The user's files: a captions JSON (`captions_val2017.json`, `captions_val2014.json`:
{"images": [{"id", "file_name"}], "annotations": [{"id", "image_id", "caption"}]}) and the
folder of its images. `select_pairs` picks the protocol's pairs, deterministically:

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
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


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


def select_pairs(captions: str | os.PathLike, num_images: int, seed: int = 0) -> list[CocoPair]:
    """The protocol's `num_images` (image, caption) pairs; see the module docstring."""
    pairs = read_pairs(captions)
    if num_images <= 0 or num_images > len(pairs):
        raise EvalDataError(f"eval.num_images={num_images} but {str(captions)!r} has {len(pairs)} captioned "
                            f"images; ask for 1..{len(pairs)}")
    if num_images == len(pairs):
        return pairs
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


def load_reference(images_dir: str | os.PathLike, pairs: Sequence[CocoPair], size: int) -> np.ndarray:
    """The pairs' images from the folder, each through `fid_image`: (N, size, size, 3) uint8."""
    root = Path(images_dir)
    out = np.empty((len(pairs), size, size, 3), np.uint8)
    for n, pair in enumerate(pairs):
        path = root / pair.file_name
        try:
            with Image.open(path) as image:
                out[n] = fid_image(image, size)
        except FileNotFoundError:
            raise EvalDataError(f"image {str(path)!r} of image_id {pair.image_id!r} is missing from eval.images "
                                f"{str(root)!r}") from None
        except OSError as err:
            raise EvalDataError(f"image {str(path)!r} cannot be read ({err})") from None
    return out


def listing_digest(images_dir: str | os.PathLike, pairs: Sequence[CocoPair]) -> list:
    """What identifies the reference set cheaply: each pair's file name and byte size."""
    root = Path(images_dir)
    if not root.is_dir():
        raise EvalDataError(f"images folder {str(root)!r} (eval.images) does not exist")
    listing = []
    for pair in pairs:
        try:
            listing.append([pair.file_name, (root / pair.file_name).stat().st_size])
        except FileNotFoundError:
            raise EvalDataError(f"image {str(root / pair.file_name)!r} of image_id {pair.image_id!r} is missing "
                                f"from eval.images {str(root)!r}") from None
    return listing
