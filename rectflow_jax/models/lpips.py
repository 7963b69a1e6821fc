"""LPIPS (Zhang et al. 2018), VGG16 variant, in Flax: a perceptual distance for losses.

The math is that of the `lpips` package's `LPIPS(net='vgg', version='0.1')`: shift and
scale the images to ImageNet statistics, run VGG16's conv stack, take the activations
after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, unit-normalise each over its
channels, square their difference, weigh the channels with a learnt 1x1 head, average
over the pixels and sum over the five layers. Images are NHWC in [-1, 1].

Weights are two files: the VGG16 backbone (torchvision's `vgg16-397923af.pth`, tensors
`features.N.weight/bias`) and the linear heads (lpips' `weights/v0.1/vgg.pth`, tensors
`lin0.model.1.weight` ... `lin4.model.1.weight`), or one safetensors file holding both,
written once by

    python -m rectflow_jax.models.lpips --backbone vgg16-397923af.pth \
        --heads .../lpips/weights/v0.1/vgg.pth --out lpips_vgg.safetensors --allow_pickle

    params = load_lpips_params("lpips_vgg.safetensors")
    distances = lpips_distance(params, images_a, images_b)   # (B,)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rectflow_jax import weights
from rectflow_jax.models.layers import Dtype, default_kernel_init
from rectflow_jax.weights import WeightLoadError

# lpips' ScalingLayer: ImageNet's channel mean (0.485, 0.456, 0.406) and std (0.229, 0.224,
# 0.225) restated for images in [-1, 1] (mean 2m - 1, std 2s).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# Added to each pixel's feature norm before dividing by it, as lpips does.
NORM_EPS = 1e-10
# torchvision's vgg16().features, cut where lpips taps it: per slice, the index in
# `features` and the width of each 3x3 conv (each followed by a ReLU). Slices 2-5 start
# with a 2x2 max pool (features 4, 9, 16, 23); the stack's last pool (30) is unused.
SLICES = (
    ((0, 64), (2, 64)),                        # -> relu1_2
    ((5, 128), (7, 128)),                      # -> relu2_2
    ((10, 256), (12, 256), (14, 256)),         # -> relu3_3
    ((17, 512), (19, 512), (21, 512)),         # -> relu4_3
    ((24, 512), (26, 512), (28, 512)),         # -> relu5_3
)
MIN_SIZE = 2 ** (len(SLICES) - 1)  # four pools: smaller images leave relu5_3 empty

BACKBONE_OPTION, HEADS_OPTION = "flow.lpips.backbone", "flow.lpips.heads"
CONVERT_COMMAND = ("python -m rectflow_jax.models.lpips --backbone F --heads F "
                   "--out lpips_vgg.safetensors --allow_pickle")
# Tensors of torchvision's VGG16 file that LPIPS does not use.
_BACKBONE_EXTRAS = (r"^classifier\.",)


def unit_normalize(features: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """features / (|features| over channels + eps), per pixel, as lpips' normalize_tensor.

    The square root is skipped where a pixel's features are all zero (ReLU often does
    that): the value is the same, but sqrt's infinite slope at 0 would make its gradient NaN.
    """
    squared = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
    positive = squared > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    return features / (norm + eps)


class LinearHead(nn.Module):
    """lpips' NetLinLayer: (dropout, inactive at eval,) a bias-free 1x1 conv to one channel.

    The Dense is named `model_1` so that its kernel maps to `linK.model.1.weight`.
    """

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype, name="model_1",
                        kernel_init=nn.with_logical_partitioning(default_kernel_init, ("embed", "mlp")))(x)


class LPIPS(nn.Module):
    """LPIPS-VGG distance: (B, H, W, 3), (B, H, W, 3) in [-1, 1] -> (B,) float32.

    Submodules carry torchvision's and lpips' names (`features_N` -> `features.N`,
    `linK/model_1` -> `linK.model.1`; see rectflow_jax.weights). `dtype` is the convs'
    compute dtype; normalisation and heads run in float32 whatever it is, since the eps
    (1e-10) is below float16's range and bfloat16 would blur the squared differences.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        # Attribute names are the param names (`features_0`, `lin0`), so setattr in a loop.
        for convs in SLICES:
            for index, width in convs:
                setattr(self, f"features_{index}", nn.Conv(
                    width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(default_kernel_init, (None, None, "embed", "mlp")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",))))
        for k in range(len(SLICES)):
            setattr(self, f"lin{k}", LinearHead(self.param_dtype))

    def features(self, images: jax.Array) -> list[jax.Array]:
        """The five tapped VGG16 activations (relu1_2 ... relu5_3) of NHWC images in [-1, 1]."""
        x = (images.astype(jnp.float32) - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)
        taps = []
        for i, convs in enumerate(SLICES):
            if i:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))  # floor mode, as torchvision
            for index, _ in convs:
                x = nn.relu(getattr(self, f"features_{index}")(x))
            taps.append(x)
        return taps

    def __call__(self, images_a: jax.Array, images_b: jax.Array) -> jax.Array:
        if images_a.shape != images_b.shape:
            raise ValueError(f"LPIPS compares images of one shape; got {images_a.shape} and {images_b.shape}")
        if images_a.ndim != 4 or images_a.shape[-1] != 3:
            raise ValueError(f"LPIPS takes RGB images (B, H, W, 3) in [-1, 1]; got shape {images_a.shape}")
        if min(images_a.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels (VGG16 pools four "
                             f"times before relu5_3); got {images_a.shape[1]}x{images_a.shape[2]}")
        batch = images_a.shape[0]
        # Both sides in one pass: one conv per layer instead of two.
        taps = self.features(jnp.concatenate([images_a, images_b]))
        total = jnp.zeros((batch,), jnp.float32)
        for k, tap in enumerate(taps):
            tap = tap.astype(jnp.float32)
            diff = jnp.square(unit_normalize(tap[:batch]) - unit_normalize(tap[batch:]))
            total = total + jnp.mean(getattr(self, f"lin{k}")(diff), axis=(1, 2, 3))
        return total

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array]:
        """Smallest valid images (for init / eval_shape; param shapes do not depend on H, W)."""
        images = jnp.zeros((batch, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
        return images, images


def lpips_distance(params: Mapping[str, Any], images_a: jax.Array, images_b: jax.Array, *,
                   dtype: Dtype = jnp.float32) -> jax.Array:
    """LPIPS-VGG distances (B,) between two NHWC batches in [-1, 1]; pure, so usable under jit/grad."""
    return LPIPS(dtype=dtype).apply({"params": params}, images_a, images_b)


# ----------------------------------------------------------------------------- weights


def read_weights(file: str | os.PathLike, option: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file, or of a PyTorch pickle (.pth/.pt/.bin) if allowed.

    `option` is the config key that names the file, for the error messages.
    """
    return weights.read_weight_file(file, what="LPIPS", where=option, allow_pickle=allow_pickle,
                                    pickle_hint="allow_pickle=True (--allow_pickle, config.flow.lpips.allow_pickle)",
                                    convert=CONVERT_COMMAND)


def default_heads_file() -> Path:
    """The linear heads shipped with the installed lpips package (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise WeightLoadError(
            f"no LPIPS heads file was given and the lpips package, which ships them, is not installed; set "
            f"{HEADS_OPTION} to lpips' weights/v0.1/vgg.pth (pip install lpips) or use a converted file holding lin0..lin4")
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"


def param_template() -> dict[str, Any]:
    """Shapes of LPIPS's params (nothing is computed)."""
    model = LPIPS()
    return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *model.dummy_inputs())))["params"]


def load_lpips_params(backbone: str | os.PathLike, heads: str | os.PathLike | None = None, *,
                      allow_pickle: bool = False, dtype: Any = np.float32) -> dict[str, Any]:
    """LPIPS params (jax.Arrays in `dtype` on the default device) from the backbone and heads files.

    `heads=None` takes the heads from the backbone file when it holds `lin*` tensors (a file
    written by convert_to_safetensors), else from the installed lpips package. Given
    explicitly, `heads` wins over any heads in the backbone file. Pickles (.pth, .pt,
    .bin) are read only with `allow_pickle=True` (lpips' own vgg.pth is one). Loading is
    strict: missing, unexpected or mis-shaped tensors are named in one WeightLoadError.
    """
    template = param_template()
    is_head = lambda name: name.startswith("lin")
    backbone_state = read_weights(backbone, BACKBONE_OPTION, allow_pickle=allow_pickle)
    heads_state = {n: v for n, v in backbone_state.items() if is_head(n)}
    heads_source = backbone
    if heads is not None or not heads_state:
        heads_source = default_heads_file() if heads is None else heads
        heads_state = read_weights(heads_source, HEADS_OPTION, allow_pickle=allow_pickle)
    backbone_state = {n: v for n, v in backbone_state.items() if not is_head(n)}
    params = {}
    for part, state, source, option, ignore in (
            ("backbone", backbone_state, backbone, BACKBONE_OPTION, _BACKBONE_EXTRAS),
            ("heads", heads_state, heads_source, HEADS_OPTION, ())):
        sub = {k: v for k, v in template.items() if is_head(k) == (part == "heads")}
        params.update(weights.params_from_state_dict(
            sub, state, ignore=ignore, dtype=dtype, source=f"LPIPS {part} file {str(source)!r} ({option})",
            place=weights.placement(sub)))
    return params


def convert_to_safetensors(backbone: str | os.PathLike, heads: str | os.PathLike | None,
                           out: str | os.PathLike, *, allow_pickle: bool = False) -> Path:
    """Writes one float32 safetensors file with the backbone (`features.*`) and heads (`lin*`).

    Tensors keep torchvision's and lpips' names and layouts (heads (1, C, 1, 1)), so
    `load_lpips_params(out)` reads it alone, and so can lpips itself once split.
    """
    params = load_lpips_params(backbone, heads, allow_pickle=allow_pickle)
    state = weights.state_dict_from_params(params)
    state = {n: v.reshape(1, -1, 1, 1) if n.startswith("lin") else v for n, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights.write_safetensors(out, state)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rectflow_jax.models.lpips",
        description="Convert the LPIPS-VGG weights (torchvision's VGG16 and lpips' linear heads) to one "
                    "safetensors file, readable without torch or pickles.")
    parser.add_argument("--backbone", required=True, help="torchvision's vgg16-397923af.pth (or .safetensors)")
    parser.add_argument("--heads", default=None,
                        help="lpips' weights/v0.1/vgg.pth (default: the installed lpips package's)")
    parser.add_argument("--out", required=True, help="the safetensors file to write")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="read PyTorch pickles (.pth/.pt/.bin); they can run code, so only trusted files")
    args = parser.parse_args(argv)
    try:
        out = convert_to_safetensors(args.backbone, args.heads, args.out, allow_pickle=args.allow_pickle)
    except WeightLoadError as err:
        print(f"lpips: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
