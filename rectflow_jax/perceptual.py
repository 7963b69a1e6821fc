"""Perceptual losses on latents: LPIPS (VGG) between VAE-decoded images.

InstaFlow's distillation switches from L2 on latents to LPIPS on the decoded images
(configlib: flow.loss_switch). The VAE decoder and LPIPS are frozen: their params ride
in the train step's `frozen` argument; the gradient flows through the decoder into the
student's prediction, while the target image is a constant.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rectflow_jax.models import lpips
from rectflow_jax.models.vae import AutoencoderKL
from rectflow_jax.weights import WeightLoadError


def lpips_latent_loss(config, folder: str) -> tuple[Any, dict[str, Any]]:
    """(loss(pred, target, frozen) -> (B,), {'vae': ..., 'lpips': ...}) for latents of `folder`'s VAE.

    config.flow.lpips: `backbone` (VGG16 weights: torchvision's vgg16 state dict, or the
    single safetensors file `python -m rectflow_jax.models.lpips` converts), `heads`
    (lpips' linear heads; default: in the backbone file, else the installed lpips package),
    `allow_pickle` (read .pth files, with torch), `resize` (compare at this many pixels a
    side, 0: as decoded).
    """
    cfg = config.flow.lpips
    if not cfg.get("backbone"):
        raise WeightLoadError(f"flow.loss uses lpips, which needs the VGG16 weights: set "
                              f"--config.{lpips.BACKBONE_OPTION}=FILE (torchvision's vgg16 .pth with "
                              f"--config.flow.lpips.allow_pickle=True, or a safetensors conversion)")
    lpips_params = lpips.load_lpips_params(cfg.backbone, cfg.get("heads") or None,
                                           allow_pickle=bool(cfg.get("allow_pickle", False)))
    vae, vae_params = AutoencoderKL.from_pretrained(folder, "vae")
    size = int(cfg.get("resize", 0) or 0)

    def loss(pred: jax.Array, target: jax.Array, frozen: dict[str, Any]) -> jax.Array:
        decode = lambda z: vae.apply({"params": frozen["vae"]}, z / vae.scaling_factor, method=vae.decode)
        images = decode(jnp.concatenate([pred, jax.lax.stop_gradient(target)]).astype(jnp.float32))
        if size:
            images = jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "bilinear")
        ours, theirs = jnp.split(images, 2)  # unclipped: clipping would stop the gradient at the edges
        return lpips.lpips_distance(frozen["lpips"], ours, jax.lax.stop_gradient(theirs))

    return loss, {"vae": vae_params, "lpips": lpips_params}
