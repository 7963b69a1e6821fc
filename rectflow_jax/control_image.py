"""Control images for a ControlNet, prepared as diffusers' StableDiffusionControlNetPipeline does.

    image = load_control_image(image, height=None, width=None, *, vae_scale_factor=8)
    # -> np.ndarray (1, height, width, 3) float32 in [0, 1], RGB

The pipeline's `control_image_processor` is VaeImageProcessor(vae_scale_factor, do_convert_rgb=True,
do_normalize=False) with its default resample, "lanczos". What it does, per input:

  PIL image   resize to (width, height) with PIL's LANCZOS, in the image's own mode (PIL itself
              falls back to NEAREST for palette and 1-bit images), then convert("RGB"), / 255.
  path        opened as diffusers.utils.load_image opens a file (EXIF orientation applied,
              convert("RGB")), then as a PIL image.
  float array (H, W, 3) or (1, H, W, 3), taken as RGB in [0, 1]: resized by torch's nearest
              interpolation, nothing else (no RGB conversion, no scaling).
  uint8 array (H, W), (H, W, 1|3|4) or with a leading 1: PIL.Image.fromarray, then as a PIL
              image. (diffusers passes uint8 arrays on unscaled, as values 0..255; here they
              mean what an image file of them would.)

height / width None: the image's own, rounded down to multiples of `vae_scale_factor` (as
diffusers' get_default_height_width). Given ones must be such multiples. Anything else that
cannot become one RGB image raises ControlImageError (a ValueError).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

VAE_SCALE_FACTOR = 8  # SD's VAE: 2 ** (len(vae.block_out_channels) - 1)


class ControlImageError(ValueError):
    """A control image that cannot be read, or not be made an RGB image of the asked size."""


def load_control_image(image: Any, height: int | None = None, width: int | None = None, *,
                       vae_scale_factor: int = VAE_SCALE_FACTOR) -> np.ndarray:
    """(1, height, width, 3) float32 in [0, 1] from a path, a PIL image or a uint8 / float array."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = _open(Path(image))
    elif isinstance(image, np.ndarray):
        array = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if array.dtype == np.uint8:
            image = _pil_from_uint8(array)
        elif np.issubdtype(array.dtype, np.floating):
            return _from_float(array, height, width, vae_scale_factor)
        else:
            raise ControlImageError(f"a control image array must be uint8 or float, got {array.dtype}")
    if not isinstance(image, Image.Image):
        raise ControlImageError(f"a control image must be a path, a PIL image or a numpy array, got "
                                f"{type(image).__name__}")
    height, width = _size(image.height, image.width, height, width, vae_scale_factor)
    try:
        # diffusers resizes before converting: the filter runs in the image's own mode.
        resized = image.resize((width, height), resample=Image.Resampling.LANCZOS).convert("RGB")
    except (ValueError, OSError) as err:  # modes PIL cannot filter or convert
        raise ControlImageError(f"a control image of PIL mode {image.mode!r} cannot be made RGB: {err}") from err
    return (np.asarray(resized).astype(np.float32) / 255.0)[None]


def _open(path: Path):
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise ControlImageError(f"control image {str(path)!r} does not exist or is not a file")
    try:
        with Image.open(path) as opened:
            return ImageOps.exif_transpose(opened).convert("RGB")  # diffusers.utils.load_image
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ControlImageError(f"control image {str(path)!r} is not a readable image: {err}") from err


def _pil_from_uint8(array: np.ndarray):
    from PIL import Image

    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ControlImageError(f"a uint8 control image must be (H, W) or (H, W, 1, 3 or 4 channels), optionally "
                                f"with a leading 1, got {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


def _from_float(array: np.ndarray, height: int | None, width: int | None, factor: int) -> np.ndarray:
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ControlImageError(f"a float control image must be RGB, (H, W, 3) or (1, H, W, 3), got {array.shape}")
    array = array.astype(np.float32)
    if not np.all((array >= 0.0) & (array <= 1.0)):  # NaN fails too
        raise ControlImageError(f"a float control image must hold values in [0, 1], got "
                                f"[{np.nanmin(array)}, {np.nanmax(array)}]")
    height, width = _size(array.shape[0], array.shape[1], height, width, factor)
    rows, cols = _nearest(array.shape[0], height), _nearest(array.shape[1], width)
    return np.ascontiguousarray(array[rows][:, cols])[None]


def _nearest(size: int, out: int) -> np.ndarray:
    """Source indices of torch's F.interpolate(mode='nearest'): floor(i * (in / out)) in float32."""
    if out == size:
        return np.arange(out)
    scale = np.float32(size) / np.float32(out)
    return np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64), size - 1)


def _size(image_h: int, image_w: int, height: int | None, width: int | None, factor: int) -> tuple[int, int]:
    """(height, width) to resize to: given ones checked, missing ones the image's rounded down."""
    out = []
    for name, given, own in (("height", height, image_h), ("width", width, image_w)):
        if given is None:
            given = own - own % factor
            if given <= 0:
                raise ControlImageError(f"the control image's {name} {own} is below the VAE factor {factor}")
        elif int(given) != given or given <= 0 or given % factor:
            raise ControlImageError(f"control image {name} must be a positive multiple of {factor}, got {given!r}")
        out.append(int(given))
    return out[0], out[1]
