"""Inversion: an image -> the noise that the sampler carries back onto it -> the reconstruction.

Each image is encoded (TextToImage.encode: the VAE posterior mean times scaling_factor; a
pixel-space model of ours takes the image itself), its latent x1 is integrated from t = 1
back to t = 0 with its prompt through the one sampler (TextToImage.invert_ids, i.e.
teachers.SDTeacher.invert), and the noise x0 found is sampled forwards again with the same
settings (TextToImage.generate_ids) and decoded. For a velocity UNet (2-RF, InstaFlow) this
is explicit Euler (or Heun) backwards in time; for an epsilon / v-prediction UNet with
method 'ddim' it is DDIM inversion on the DDIM grid (see teachers.SDTeacher.invert for the
one convention where it differs from diffusers' DDIMInverseScheduler loop: the UNet is
called at the time of the state it is given, not at the step's target timestep).

Explicit steps backwards are not the inverse of the forward steps, so the round trip
is exact only as the steps shrink: its error is what `round_trip` measures. `refine=K`
(default 0, Euler / DDIM only) solves each backward step for the state that the forward
step maps onto the current one, x_k = x_{k+1} - h v(x_k, t_k), by K fixed-point iterations
started from the explicit step: where they converge (h * Lipschitz(v) < 1), the round trip
of the discrete sampler becomes exact. A one-step student (x1 = x0 + v(x0, 0)) has h = 1,
so the iteration need not converge for it.

Images in: paths (PIL: converted to the model's channels, RGB or L, then resized to the
model's size with Lanczos, VaeImageProcessor's default resample with resize_mode
'default', i.e. to the exact size, aspect not kept) or arrays HW / HWC (uint8 in [0, 255],
or float in [-1, 1], as a pixel-space digits model takes them; a size other than the
model's is resized by nearest neighbour, as VaeImageProcessor resizes arrays with
torch's default interpolate). Guidance defaults to none: inverting with CFG follows a
field that the forward pass does not retrace exactly and drifts (allowed, and noted in
inversion.json).

What `invert_to_folder` writes in the output folder:
  latents.npz                 x0 (the noise found) and x1 (the images' latents), float32 NHWC;
                              x1_reconstructed (the latents regenerated from x0); prompt (N,),
                              input (N,) each image's path or '<array K>', reconstruction_file (N,)
                              its reconstruction's name (np.savez reserves `file`)
  reconstruction_NNNNN.png    the reconstruction of input image NNNNN (numbered from 0 in input
                              order, also for a single image)
  comparison.png              one row per image: input (as encoded, after resizing) | reconstruction
  inversion.json              the settings, the mean errors and, per image, its input, prompt,
                              file and errors: latent_rmse (x1 against the regenerated latents),
                              pixel_mse and pixel_psnr (dB, peak-to-peak 2) of the reconstruction
                              against the resized input in [-1, 1], noise_mean, noise_std and
                              noise_x1_correlation of the inverted noise (a good inversion gives
                              ~N(0, 1), uncorrelated with the image); noise_time is the time (ours,
                              0 = pure noise) at which the inversion stops
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from rectflow_jax import sampling, teachers
from rectflow_jax.text_to_image import TextToImage, TextToImageError, to_uint8

log = logging.getLogger("rectflow")

# Steppers whose backward step `refine` can solve exactly: one velocity evaluation per step.
REFINABLE_METHODS = sampling.IMPLICIT_METHODS
_MIN_MSE = 1e-10  # a perfect reconstruction reports 10 log10(4 / 1e-10) = 106 dB, not infinity


class InversionError(TextToImageError):
    """An inversion request that cannot be served: a missing or unreadable image, a method that cannot
    run backwards, prompts that do not match the images."""


# ---------------------------------------------------------------------------- images in


def _to_channels(image: np.ndarray, channels: int, name: str) -> np.ndarray:
    """float HWC -> HWC with `channels`: grey repeated to RGB, RGB to PIL's luma (ITU-R 601-2)."""
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if have in (3, 4) and channels == 1:
        return (image[..., :3] @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]
    if have == 4 and channels == 3:
        return image[..., :3]
    raise InversionError(f"{name}: an image of {have} channels cannot feed a model of {channels}")


def _nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch.nn.functional.interpolate's default 'nearest': source index floor(i * in / out)."""
    rows = np.minimum((np.arange(height) * (image.shape[0] / height)).astype(np.int64), image.shape[0] - 1)
    cols = np.minimum((np.arange(width) * (image.shape[1] / width)).astype(np.int64), image.shape[1] - 1)
    return image[rows][:, cols]


def load_image(image: str | os.PathLike | np.ndarray, height: int, width: int, channels: int,
               name: str = "image") -> np.ndarray:
    """One image (a path or an array, see the module docstring) -> float32 (height, width, channels) in [-1, 1]."""
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise InversionError(f"{name}: an image array must be HW or HWC with 1, 3 or 4 channels, "
                                 f"got shape {image.shape}")
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0 * 2.0 - 1.0
        elif np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
            if not np.all(np.isfinite(array)) or array.min() < -1.0 - 1e-6 or array.max() > 1.0 + 1e-6:
                raise InversionError(f"{name}: a float image must lie in [-1, 1], got values in "
                                     f"[{np.nanmin(array):.3g}, {np.nanmax(array):.3g}]")
        else:
            raise InversionError(f"{name}: an image array must be uint8 or float, got {array.dtype}")
        array = _to_channels(array, channels, name)
        if array.shape[:2] != (height, width):
            array = _nearest(array, height, width)
        return np.clip(array, -1.0, 1.0)
    path = Path(image)
    if not path.is_file():
        raise InversionError(f"{name}: {str(path)!r} does not exist or is not a file")
    try:
        with Image.open(path) as opened:
            opened.load()
            # The model's channels first (a palette or grey image would not resize into RGB), then the size.
            picture = opened.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InversionError(f"{name}: {str(path)!r} is not a readable image ({err})") from None
    if channels not in (1, 3):
        raise InversionError(f"{name}: a model of {channels} channels takes arrays, not image files")
    if picture.size != (width, height):
        picture = picture.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(picture, np.float32) / 255.0 * 2.0 - 1.0
    return array.reshape(height, width, channels)


def image_channels(pipe: TextToImage) -> int:
    """The channels an input image needs: the VAE's, or a pixel-space UNet's own."""
    return int(pipe.vae.in_channels if pipe.vae is not None else pipe.unet.in_channels)


def _prompts_for(prompts: str | Sequence[str], count: int) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) == 1:
        return prompts * count
    if len(prompts) != count:
        raise InversionError(f"{len(prompts)} prompts for {count} images: give one prompt for all or one per image")
    return prompts


def check_method(method: str, refine: int = 0) -> str:
    if method not in teachers.INVERTIBLE_METHODS:
        raise InversionError(f"method {method!r} cannot run backwards: invert with one of "
                             f"{', '.join(teachers.INVERTIBLE_METHODS)}")
    if refine and method not in REFINABLE_METHODS:
        raise InversionError(f"refine solves single-evaluation steps only ({', '.join(REFINABLE_METHODS)}), "
                             f"not {method!r} (sample.inversion_refine)")
    if refine < 0:
        raise InversionError(f"refine must be >= 0 fixed-point iterations, got {refine} (sample.inversion_refine)")
    return method


# ---------------------------------------------------------------------------- the round trip


def psnr(mse: np.ndarray) -> np.ndarray:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * np.log10(4.0 / np.maximum(mse, _MIN_MSE))


def _per_image(fn, a: np.ndarray) -> np.ndarray:
    return fn(a.reshape(len(a), -1).astype(np.float64), axis=1)


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of a[i] and b[i] over their elements, per row (N,)."""
    centred = lambda x: x.reshape(len(x), -1).astype(np.float64) - x.reshape(len(x), -1).mean(1, keepdims=True)
    ca, cb = centred(a), centred(b)
    return np.sum(ca * cb, 1) / np.maximum(np.linalg.norm(ca, axis=1) * np.linalg.norm(cb, axis=1), 1e-12)


def round_trip(pipe: TextToImage, images: np.ndarray, ids: np.ndarray, *, num_steps: int, method: str = "euler",
               guidance_scale: float = 1.0, negative_ids: np.ndarray | None = None, batch_size: int | None = None,
               refine: int = 0) -> dict[str, np.ndarray]:
    """Images (N, H, W, C) in [-1, 1] at the model's size, with their prompts' ids -> image -> noise -> image.

    Returns float32 arrays x1 (the latents), x0 (the noise found), x1_reconstructed,
    reconstruction (N, H, W, C) in [-1, 1] (a pixel-space model's output clipped, else the
    decoded uint8 image) and reconstruction_uint8, and per image (N,): latent_rmse,
    pixel_mse, pixel_psnr, noise_mean, noise_std, noise_x1_correlation.
    """
    check_method(method, refine)
    images = np.asarray(images, np.float32)
    x1 = pipe.encode(images, batch_size=batch_size)
    x0 = pipe.invert_ids(ids, x1, num_steps=num_steps, method=method, guidance_scale=guidance_scale,
                         negative_ids=negative_ids, batch_size=batch_size, refine=refine)
    x1_back, decoded = pipe.generate_ids(ids, x0, num_steps=num_steps, method=method, guidance_scale=guidance_scale,
                                         negative_ids=negative_ids, batch_size=batch_size)
    # Errors on the float output where there is one: 8x8 digits would otherwise measure uint8 rounding.
    reconstruction = np.clip(x1_back, -1.0, 1.0) if pipe.vae is None else decoded.astype(np.float32) / 127.5 - 1.0
    pixel_mse = _per_image(np.mean, np.square(reconstruction - images))
    f32 = lambda a: np.asarray(a, np.float32)
    return {"x1": f32(x1), "x0": f32(x0), "x1_reconstructed": f32(x1_back), "reconstruction": f32(reconstruction),
            "reconstruction_uint8": np.asarray(decoded, np.uint8),
            "latent_rmse": f32(np.sqrt(_per_image(np.mean, np.square(x1_back - x1)))),
            "pixel_mse": f32(pixel_mse), "pixel_psnr": f32(psnr(pixel_mse)),
            "noise_mean": f32(_per_image(np.mean, x0)), "noise_std": f32(_per_image(np.std, x0)),
            "noise_x1_correlation": f32(correlation(x0, x1))}


ERROR_KEYS = ("latent_rmse", "pixel_mse", "pixel_psnr", "noise_mean", "noise_std", "noise_x1_correlation")


def summarise(result: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over images of each error, the pixel RMSE of all images together, and the statistics of all
    the noise found pooled (mean, std: ~0 and ~1 for noise a sampler would draw)."""
    summary = {f"mean_{key}": float(np.mean(result[key])) for key in ERROR_KEYS}
    summary["pixel_rmse"] = float(np.sqrt(np.mean(result["pixel_mse"])))
    summary["noise_mean"] = float(np.mean(result["x0"], dtype=np.float64))
    summary["noise_std"] = float(np.std(result["x0"], dtype=np.float64))
    return summary


def noise_time(pipe: TextToImage, method: str, num_steps: int) -> float:
    """Our time (0: pure noise) at which the inversion stops: 0 for a velocity UNet, DDIM's first timestep's."""
    return float(pipe.teacher.time_grid(method, num_steps)[0])


# ---------------------------------------------------------------------------- to a folder


def _as_picture(image_uint8: np.ndarray) -> Image.Image:
    return Image.fromarray(image_uint8[..., 0] if image_uint8.shape[-1] == 1 else image_uint8)


def invert_to_folder(pipe: TextToImage, images: Sequence[str | os.PathLike | np.ndarray] | np.ndarray,
                     prompts: str | Sequence[str], out_dir: str | os.PathLike, *, num_steps: int = 1,
                     method: str = "euler", guidance_scale: float = 1.0, negative_prompt: str = "",
                     batch_size: int = 1, height: int | None = None, width: int | None = None,
                     progress: bool = True, refine: int = 0) -> dict[str, Any]:
    """Inverts every image with its prompt and writes the files of the module docstring; returns
    inversion.json's content (its 'images' the per-image records)."""
    check_method(method, refine)
    images = list(images)
    if not images:
        raise InversionError("no images to invert")
    prompts = _prompts_for(prompts, len(images))
    height, width = pipe.image_size(height, width)
    channels = image_channels(pipe)
    names = [f"<array {k}>" if isinstance(image, np.ndarray) else str(image) for k, image in enumerate(images)]
    # Every image read before any compiling: a bad file fails at once.
    inputs = np.stack([load_image(image, height, width, channels, name=f"image {k}")
                       for k, image in enumerate(images)])
    pipe.teacher.time_grid(method, num_steps)  # a step count the scheduler cannot honour fails here too
    guided = sampling.guidance_applies(guidance_scale)
    if guided:
        log.warning("inverting with classifier-free guidance (scale %g): the guided field is not retraced exactly "
                    "and the inversion drifts; guidance_scale 1 inverts faithfully", guidance_scale)
    negative_ids = pipe.teacher.text.negative_ids(negative_prompt) if guided else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    batch = max(1, min(int(batch_size), len(images)))
    parts: list[dict[str, np.ndarray]] = []
    bar = tqdm(range(0, len(images), batch), desc=f"invert -> {out.name}", unit="batch", disable=not progress)
    for start in bar:
        stop = start + batch
        parts.append(round_trip(pipe, inputs[start:stop], pipe.tokenize(prompts[start:stop]), num_steps=num_steps,
                                method=method, guidance_scale=guidance_scale, negative_ids=negative_ids,
                                batch_size=batch, refine=refine))
    result = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    files = [f"reconstruction_{k:05d}.png" for k in range(len(images))]
    for file, picture in zip(files, result["reconstruction_uint8"]):
        _as_picture(picture).save(out / file)
    shown = np.asarray(to_uint8(jnp.asarray(inputs)))
    rows = [np.concatenate([a, b], axis=1) for a, b in zip(shown, result["reconstruction_uint8"])]
    _as_picture(np.concatenate(rows, axis=0)).save(out / "comparison.png")
    np.savez(out / "latents.npz", x0=result["x0"], x1=result["x1"], x1_reconstructed=result["x1_reconstructed"],
             prompt=np.asarray(prompts, dtype=str), input=np.asarray(names, dtype=str),
             reconstruction_file=np.asarray(files, dtype=str))

    records = [{"input": name, "file": file, "prompt": prompt,
                **{key: float(result[key][k]) for key in ERROR_KEYS}}
               for k, (name, file, prompt) in enumerate(zip(names, files, prompts))]
    summary = {"pretrained": pipe.source, "pipeline_class": pipe.pipeline_class,
               "parametrisation": pipe.teacher.parametrisation, "num_steps": num_steps, "method": method,
               "ddim_inversion": not pipe.teacher.is_velocity and method == "ddim", "refine": int(refine),
               "guidance_scale": guidance_scale, "negative_prompt": negative_prompt if guided else None,
               "guidance_note": ("inverted with classifier-free guidance: expect drift" if guided else None),
               "height": height, "width": width, "dtype": jnp.dtype(pipe.unet.dtype).name, "batch_size": batch,
               "noise_time": noise_time(pipe, method, num_steps), **pipe.adapters(),
               **summarise(result), "images": records}
    (out / "inversion.json").write_text(json.dumps(summary, indent=2))
    return summary
