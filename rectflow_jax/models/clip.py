"""CLIP score: transformers' `CLIPModel` in Flax, its image preprocessing, and a scorer.

CLIP score here is the cosine similarity of a generated image's CLIP image embedding with
its prompt's CLIP text embedding, averaged over the images (not torchmetrics'
100 * max(cos, 0)). InstaFlow (Liu et al. 2023, arXiv 2309.06380) reports, on 5,000 MS COCO
2017 captions with one Euler step, FID-5k 23.4 and CLIP score 0.304 for InstaFlow-0.9B
(2-Rectified Flow, 25 steps: 0.315), per the released model cards (XCLiu/instaflow_0_9B_from_sd_1_5,
XCLiu/2_rectified_flow_from_sd_1_5). The cards do not name the CLIP; the paper's is
ViT-g/14 (LAION's OpenCLIP model, in transformers format laion/CLIP-ViT-g-14-laion2B-s12B-b42K:
gelu, projection_dim 1024), which we could not check against the paper's text here. The
OpenAI ViT-L/14 (openai/clip-vit-large-patch14, quick_gelu) is the other common choice;
scores from different CLIPs are not comparable.

    scorer = CLIPScorer.from_pretrained(folder)          # a transformers CLIPModel folder
    cos = scorer.scores(images_uint8, prompts)           # (B,) per image-prompt pair

Lower level, the module and pure functions it is built from:

    clip, params = CLIPModel.from_pretrained(folder)
    img = clip.apply({"params": params}, pixel_values, method=CLIPModel.image_embeds)  # (B, P)
    txt = clip.apply({"params": params}, input_ids, method=CLIPModel.text_embeds)      # (B, P)
    cos = cosine_similarity(img, txt)                                                  # (B,)

`image_embeds` / `text_embeds` are transformers' get_image_features / get_text_features
(pooled output through the bias-free projection, not normalised); pixel_values are NHWC
(B, S, S, 3) float32 as `CLIPPreprocessor.pixel_values` makes them, input_ids (B, 77) as
`CLIPScorer.tokenize` makes them. A folder is laid out as transformers writes a CLIPModel:
config.json (model_type 'clip', text_config, vision_config, projection_dim), model.safetensors
(or pytorch_model.bin, read only with allow_pickle=True), preprocessor_config.json (optional:
CLIPImageProcessor's defaults otherwise) and the tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rectflow_jax import weights
from rectflow_jax.batch_runner import BatchRunner, local_mesh
from rectflow_jax.models import clip_text, clip_vision
from rectflow_jax.models.clip_text import CLIPTextModel
from rectflow_jax.models.clip_vision import CLIPVisionModel
from rectflow_jax.models.layers import Dtype, dense

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_NAME = "preprocessor_config.json"
LOGIT_SCALE_INIT = 2.6592  # transformers' logit_scale_init_value

# Values transformers gives a tower's keys that a legacy `text_config_dict` /
# `vision_config_dict` leaves out: it rebuilds the tower config from that dict alone, with
# every default, and lays the result over `text_config` / `vision_config`.
_DEFAULTS = {
    "text": {**{k: CLIPTextModel.__dataclass_fields__[k].default for k in clip_text._FIELDS},
             "bos_token_id": 49406, "pad_token_id": 1, "projection_dim": 512, "model_type": "clip_text_model"},
    "vision": {**{k: CLIPVisionModel.__dataclass_fields__[k].default for k in clip_vision._FIELDS},
               "projection_dim": 512, "model_type": "clip_vision_model"},
}
# Top-level keys: projection_dim (a field), init values, and the generic metadata.
_ACCEPTED = ("projection_dim", "logit_scale_init_value", "initializer_factor", "initializer_range",
             "eos_token_id") + clip_text._METADATA
_ONLY = {"model_type": ("clip",)}


def tower_configs(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(text_config, vision_config, the other keys) of a CLIPConfig dict, as transformers reads them.

    A legacy `text_config_dict` / `vision_config_dict` (LAION's conversions carry them) wins
    over `text_config` / `vision_config`, and with it transformers' defaults for the keys it
    leaves out (e.g. eos_token_id 49407 over a stale 2).
    """
    rest, towers = dict(config), {}
    for tower in ("text", "vision"):
        sub = dict(rest.pop(f"{tower}_config", None) or {})
        legacy = rest.pop(f"{tower}_config_dict", None)
        if legacy is not None:
            sub = {**sub, **_DEFAULTS[tower], **legacy}
        towers[tower] = sub
    return towers["text"], towers["vision"], rest


class CLIPModel(nn.Module):
    """transformers `CLIPModel`: both towers, `visual_projection`, `text_projection`, `logit_scale`.

    Submodule and parameter names are transformers' attribute names, so the Flax paths
    map onto the state-dict names (`text_model.*`, `vision_model.*`, ...). `__call__` gives
    logits_per_image (exp(logit_scale) times the cosine matrix), as transformers' forward.
    """

    text_model: CLIPTextModel
    vision_model: CLIPVisionModel
    projection_dim: int = 512
    config_json: str = "{}"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        self.visual_projection = dense(self.projection_dim, **kw)
        self.text_projection = dense(self.projection_dim, **kw)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(LOGIT_SCALE_INIT), ()), (), self.param_dtype)

    def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
        """(B, S, S, 3) normalised NHWC pixels -> (B, projection_dim), as get_image_features; float32."""
        _, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled).astype(jnp.float32)

    def text_embeds(self, input_ids: jax.Array) -> jax.Array:
        """(B, L) token ids -> (B, projection_dim), as get_text_features; float32."""
        return self.text_projection(self.text_model.pooled_output(input_ids)).astype(jnp.float32)

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array) -> jax.Array:
        """logits_per_image (B_images, B_texts)."""
        image = self.image_embeds(pixel_values)
        text = self.text_embeds(input_ids)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        return jnp.exp(self.logit_scale.astype(jnp.float32)) * image @ text.T

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, dtype: Dtype = jnp.float32,
                    param_dtype: Dtype = jnp.float32) -> "CLIPModel":
        """Module from a transformers CLIPConfig dict (config.json of a CLIPModel folder).

        A key the port does not implement, at the top or in a tower's config, raises
        weights.UnsupportedConfigError naming it.
        """
        text, vision, rest = tower_configs(config)
        weights.check_config("CLIP", rest, _ACCEPTED, _ONLY)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        return cls(text_model=CLIPTextModel.from_config(text, **kw),
                   vision_model=CLIPVisionModel.from_config(vision, **kw),
                   projection_dim=rest.get("projection_dim", 512),
                   config_json=json.dumps(dict(config), sort_keys=True), **kw)

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array]:
        return self.vision_model.dummy_inputs(batch) + self.text_model.dummy_inputs(batch)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, subfolder: str | None = None, *,
                        dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                        allow_pickle: bool = False) -> tuple["CLIPModel", dict]:
        """(module, params) from a transformers CLIPModel folder; params are jax.Arrays in param_dtype.

        `dtype` is the compute dtype; embeddings come out float32 either way.
        """
        build = lambda config: cls.from_config(config, dtype=dtype, param_dtype=param_dtype)
        return weights.load_pretrained(folder, subfolder, build, lambda module: module.dummy_inputs(),
                                       ignore=clip_vision.IGNORE, allow_pickle=allow_pickle, dtype=param_dtype,
                                       name_of=clip_vision.torch_name)


def cosine_similarity(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """(B, P), (B, P) -> (B,) cosine similarity of each pair (row i with row i), float32."""
    a, b = jnp.asarray(image_embeds, jnp.float32), jnp.asarray(text_embeds, jnp.float32)
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    return jnp.sum(a * b, axis=-1)


# ----------------------------------------------------------------------------- preprocessing

# preprocessor_config.json keys: implemented, metadata, and ones accepted only at the value
# CLIPImageProcessor has (anything else would change the pixels).
_PREPROCESSOR_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                      "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb",
                      "image_processor_type", "feature_extractor_type", "processor_class")
_PREPROCESSOR_ONLY = {"default_to_square": (False,), "do_pad": (False, None), "use_square_size": (False,)}


def _size_hw(value: Any, key: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, Mapping) and set(value) == {"height", "width"}:
        return int(value["height"]), int(value["width"])
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise weights.UnsupportedConfigError(f"CLIP image processor {key}={value!r} is not supported "
                                         "(only an int, [height, width] or {'height', 'width'})")


def _per_channel(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


@dataclasses.dataclass(frozen=True)
class CLIPPreprocessor:
    """transformers' CLIPImageProcessor (the PIL one), on uint8 NHWC batches, host side.

    Per image: resize (shortest edge to `shortest_edge`, the long one int(shortest_edge *
    long / short), or to `resize_hw`) with PIL's `resample` filter (3: bicubic), center crop
    to `crop_hw` (zero padding where the image is smaller, as transformers), rescale in
    float64 then cast to float32, normalise in float32. Defaults: CLIPImageProcessor's.
    """

    do_resize: bool = True
    shortest_edge: int | None = 224
    resize_hw: tuple[int, int] | None = None
    resample: int = 3
    do_center_crop: bool = True
    crop_hw: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "CLIPPreprocessor":
        """From a preprocessor_config.json dict; keys that would change the pixels otherwise are refused."""
        weights.check_config("CLIP image processor", config, _PREPROCESSOR_KEYS, _PREPROCESSOR_ONLY)
        kw: dict[str, Any] = {}
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if key in config:
                kw[key] = bool(config[key])
        if "size" in config:
            size = config["size"]
            if isinstance(size, int):  # CLIPImageProcessor: default_to_square=False
                kw["shortest_edge"] = size
            elif isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
                kw["shortest_edge"] = int(size["shortest_edge"])
            else:
                try:
                    kw.update(shortest_edge=None, resize_hw=_size_hw(size, "size"))
                except weights.UnsupportedConfigError:
                    raise weights.UnsupportedConfigError(
                        f"CLIP image processor size={size!r} is not supported (only an int or "
                        "{'shortest_edge'}, or {'height', 'width'})") from None
        if "crop_size" in config:
            kw["crop_hw"] = _size_hw(config["crop_size"], "crop_size")
        if "resample" in config:
            kw["resample"] = int(config["resample"])
        if "rescale_factor" in config:
            kw["rescale_factor"] = float(config["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if key in config:
                kw[key] = _per_channel(config[key])
        return cls(**kw)

    def _resize(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        h, w = image.shape[:2]
        if self.resize_hw is not None:
            out_h, out_w = self.resize_hw
        else:  # transformers' get_resize_output_image_size(default_to_square=False)
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.shortest_edge * long / short)
            out_h, out_w = (new_long, self.shortest_edge) if w <= h else (self.shortest_edge, new_long)
        return np.asarray(Image.fromarray(image).resize((out_w, out_h), resample=self.resample))

    def _center_crop(self, image: np.ndarray) -> np.ndarray:
        (h, w), (ch, cw) = image.shape[:2], self.crop_hw
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
            return image[top:top + ch, left:left + cw]
        # Smaller than the crop: centred on zeros first, with transformers' rounding.
        new_h, new_w = max(ch, h), max(cw, w)
        canvas = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
        pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
        canvas[pad_top:pad_top + h, pad_left:pad_left + w] = image
        top, left = top + pad_top, left + pad_left
        return canvas[max(0, top):min(new_h, top + ch), max(0, left):min(new_w, left + cw)]

    def pixel_values(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB -> (B, crop_h, crop_w, 3) float32, as CLIPImageProcessor (NHWC)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"CLIP preprocessing takes uint8 RGB images (B, H, W, 3), got {images.dtype} "
                             f"{images.shape}")
        return np.stack([self._one(image) for image in images]) if len(images) else np.zeros(
            (0,) + tuple(self.crop_hw) + (3,), np.float32)

    def _one(self, image: np.ndarray) -> np.ndarray:
        if self.do_resize:
            image = self._resize(image)
        if self.do_center_crop:
            image = self._center_crop(image)
        if self.do_rescale:
            image = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
        image = image.astype(np.float32)
        if self.do_normalize:
            image = (image - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return image


def preprocessor_from_folder(folder: str | os.PathLike) -> CLIPPreprocessor:
    """CLIPPreprocessor from `folder`/preprocessor_config.json, CLIPImageProcessor's defaults without one."""
    file = Path(folder) / PREPROCESSOR_NAME
    if not file.is_file():
        return CLIPPreprocessor()
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise weights.WeightLoadError(f"{str(file)!r} is not valid JSON: {err}") from err
    return CLIPPreprocessor.from_config(config)


def load_tokenizer(folder: str | os.PathLike):
    """transformers' CLIPTokenizer from a CLIPModel folder (its files sit beside config.json)."""
    from transformers import CLIPTokenizer  # slow to import; only scoring needs it

    try:
        return CLIPTokenizer.from_pretrained(Path(folder))
    except Exception as err:  # transformers raises OSError, ValueError, TypeError... for a broken folder
        raise weights.WeightLoadError(f"{str(folder)!r} holds no readable CLIP tokenizer: {err}") from err


# ----------------------------------------------------------------------------- scorer


class CLIPScorer:
    """CLIP score of image-prompt pairs: preprocessing and tokenising on the host, each tower's
    embeddings through its own batch runner (chunks of `batch_size` rows split over the mesh's
    devices, compiled once), the cosine of each pair. The default mesh is this process's devices
    (batch_runner.local_mesh): each process scores its own images."""

    def __init__(self, model: CLIPModel, params: Any, preprocessor: CLIPPreprocessor, tokenizer,
                 batch_size: int = 32, mesh: Mesh | None = None):
        size = model.vision_model.image_size
        if tuple(preprocessor.crop_hw) != (size, size):
            raise weights.WeightLoadError(f"the image processor crops to {tuple(preprocessor.crop_hw)}, but the CLIP "
                                          f"vision tower takes {size}x{size} images")
        self.model, self.preprocessor, self.tokenizer = model, preprocessor, tokenizer
        mesh = mesh or local_mesh()
        runner = lambda method: BatchRunner(lambda p, x: model.apply({"params": p}, x, method=method), batch_size,
                                            mesh=mesh)
        self._image_embeds, self._text_embeds = runner(CLIPModel.image_embeds), runner(CLIPModel.text_embeds)
        self.params = self._image_embeds.place(params)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, allow_pickle: bool = False,
                        dtype: Any = "float32", batch_size: int = 32, mesh: Mesh | None = None) -> "CLIPScorer":
        """From a transformers CLIPModel folder; `dtype` is the compute dtype (params stay float32)."""
        model, params = CLIPModel.from_pretrained(folder, dtype=jnp.dtype(dtype), allow_pickle=allow_pickle)
        return cls(model, params, preprocessor_from_folder(folder), load_tokenizer(folder), batch_size, mesh)

    @property
    def max_length(self) -> int:
        return self.model.text_model.max_position_embeddings

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """(B, 77) int32 ids: padded to max_length, longer prompts truncated (EOS kept), as CLIP score does."""
        ids = self.tokenizer([str(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="np").input_ids
        return ids.astype(np.int32)

    def image_embeds(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB images (any H, W) -> (B, projection_dim) float32 get_image_features."""
        return self._image_embeds(self.params, self.preprocessor.pixel_values(images))

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """B prompts -> (B, projection_dim) float32 get_text_features."""
        return self._text_embeds(self.params, self.tokenize(prompts))

    def scores(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """(B, H, W, 3) uint8 images (any H, W) and B prompts -> (B,) float32 cosine of each pair."""
        prompts = list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; CLIP score pairs them one to one")
        return np.asarray(cosine_similarity(self.image_embeds(images), self.text_embeds(prompts)), np.float32)
