"""pytorch-fid's FID Inception-v3 in Flax: the 2048-d pool features that FID is computed on.

The network is pytorch-fid's `fid_inception_v3()` (its port of the TensorFlow graph that
the original FID code used) as `InceptionV3(resize_input=True, normalize_input=True)` runs
it to its last block: images in [0, 1] resized to 299x299 bilinearly the way
torch.nn.functional.interpolate(align_corners=False) does (no antialiasing when shrinking),
mapped to [-1, 1], then torchvision's Inception3 stem and Mixed_5b ... Mixed_7c with
pytorch-fid's patches (TensorFlow's average pools, which leave the padding out of the
mean; a max pool in Mixed_7c's pool branch), and a global average pool to (B, 2048).

Weights are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, read with torch when
allow_pickle=True, or a safetensors copy of it, written once by

    python -m rectflow_jax.models.inception pt_inception-2015-12-05-6726825d.pth \
        fid_inception.safetensors --allow_pickle

    params = load_inception_params("fid_inception.safetensors")
    features = jax.jit(inception_features)(params, images)   # (B, H, W, 3) in [0, 1] -> (B, 2048)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rectflow_jax import weights
from rectflow_jax.models.layers import Dtype, default_kernel_init
from rectflow_jax.weights import WeightLoadError

INPUT_SIZE = 299   # what pytorch-fid resizes every image to
MIN_SIZE = 75      # smallest input (resize_input=False) that leaves Mixed_7a a 1x1 map
FEATURES = 2048
BN_EPS = 1e-3      # torchvision's BasicConv2d; not PyTorch's default 1e-5
CONVERT_COMMAND = "python -m rectflow_jax.models.inception PTH OUT.safetensors --allow_pickle"
# Tensors of pytorch-fid's file the features do not use: the 1008-way classifier after
# the pool, and BatchNorm's training-step counters.
IGNORED = ("fc.weight", "fc.bias")
IGNORED_SUFFIX = ".num_batches_tracked"

# Flax leaf -> PyTorch leaf. BatchNorm keeps its running statistics as params, under their
# PyTorch names: inference only ever reads them.
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "running_mean": "running_mean", "running_var": "running_var"}


# ----------------------------------------------------------------------------- layers


class Conv(nn.Module):
    """A bias-free conv with a (kh, kw) kernel and explicit padding, as Inception's 1x7 and 7x1 need.

    layers.Conv2D's parameter layout, but its kernels are square, and the patch-matmul path
    of layers.conv2d doubles the compile time (~3 -> ~6 s on 2 cores) without making
    Inception faster at its widths, so this always calls XLA's convolution.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(default_kernel_init, (None, None, "embed", "mlp")),
                            (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        return jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (self.strides,) * 2,
                                            self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d in eval mode: (x - running_mean) / sqrt(running_var + eps) * scale + bias.

    Computed in float32 whatever x's dtype, then cast back: the statistics of a pretrained
    net span orders of magnitude that bfloat16 would round away.
    """

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        param = lambda name, init: self.param(name, nn.with_logical_partitioning(init, ("norm",)), (width,),
                                              jnp.float32)
        scale, bias = param("scale", nn.initializers.ones_init()), param("bias", nn.initializers.zeros_init())
        mean = param("running_mean", nn.initializers.zeros_init())
        var = param("running_var", nn.initializers.ones_init())
        factor = scale * jax.lax.rsqrt(var + self.eps)
        return (x.astype(jnp.float32) * factor + (bias - mean * factor)).astype(x.dtype)


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU.

    `padding` is PyTorch's (pad_h, pad_w), the same on both sides of each axis.
    """

    features: int
    kernel_size: int | tuple[int, int]
    strides: int = 1
    padding: int | tuple[int, int] = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        pad_h, pad_w = (self.padding,) * 2 if isinstance(self.padding, int) else self.padding
        x = Conv(self.features, kernel, self.strides, ((pad_h, pad_h), (pad_w, pad_w)), self.dtype, name="conv")(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x))


def max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))  # no padding, floor mode: as torch's MaxPool2d(3, 2)


def tf_avg_pool_3x3(x: jax.Array) -> jax.Array:
    """avg_pool2d(3, stride 1, pad 1, count_include_pad=False): border windows average only real pixels."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))  # pads with -inf, as torch


# ----------------------------------------------------------------------------- blocks
# Submodule names are torchvision's attribute names, so a param's path joined by dots is
# its state-dict name (see `torch_name`). Branches are concatenated in torchvision's order.


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: pytorch-fid's FIDInceptionA (TensorFlow's average pool)."""

    pool_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda name, *args, **kw: BasicConv2d(*args, dtype=self.dtype, name=name, **kw)
        branch1x1 = conv("branch1x1", 64, 1)(x)
        branch5x5 = conv("branch5x5_2", 64, 5, padding=2)(conv("branch5x5_1", 48, 1)(x))
        branch3x3dbl = conv("branch3x3dbl_1", 64, 1)(x)
        branch3x3dbl = conv("branch3x3dbl_2", 96, 3, padding=1)(branch3x3dbl)
        branch3x3dbl = conv("branch3x3dbl_3", 96, 3, padding=1)(branch3x3dbl)
        branch_pool = conv("branch_pool", self.pool_features, 1)(tf_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 (stride-2 convs beside a stride-2 max pool)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda name, *args, **kw: BasicConv2d(*args, dtype=self.dtype, name=name, **kw)
        branch3x3 = conv("branch3x3", 384, 3, strides=2)(x)
        branch3x3dbl = conv("branch3x3dbl_1", 64, 1)(x)
        branch3x3dbl = conv("branch3x3dbl_2", 96, 3, padding=1)(branch3x3dbl)
        branch3x3dbl = conv("branch3x3dbl_3", 96, 3, strides=2)(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, max_pool_3x3_stride_2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: pytorch-fid's FIDInceptionC; 7x7 factored into 1x7 and 7x1 convs."""

    channels_7x7: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda name, *args, **kw: BasicConv2d(*args, dtype=self.dtype, name=name, **kw)
        c7 = self.channels_7x7
        branch1x1 = conv("branch1x1", 192, 1)(x)
        branch7x7 = conv("branch7x7_1", c7, 1)(x)
        branch7x7 = conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(branch7x7)
        branch7x7 = conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(branch7x7)
        branch7x7dbl = conv("branch7x7dbl_1", c7, 1)(x)
        branch7x7dbl = conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(branch7x7dbl)
        branch7x7dbl = conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(branch7x7dbl)
        branch7x7dbl = conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(branch7x7dbl)
        branch7x7dbl = conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(branch7x7dbl)
        branch_pool = conv("branch_pool", 192, 1)(tf_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda name, *args, **kw: BasicConv2d(*args, dtype=self.dtype, name=name, **kw)
        branch3x3 = conv("branch3x3_2", 320, 3, strides=2)(conv("branch3x3_1", 192, 1)(x))
        branch7x7x3 = conv("branch7x7x3_1", 192, 1)(x)
        branch7x7x3 = conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(branch7x7x3)
        branch7x7x3 = conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(branch7x7x3)
        branch7x7x3 = conv("branch7x7x3_4", 192, 3, strides=2)(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, max_pool_3x3_stride_2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (FIDInceptionE_1, TensorFlow's average pool) and Mixed_7c (FIDInceptionE_2, max pool).

    The max pool in Mixed_7c is a quirk of the TensorFlow graph FID was defined with, kept
    by pytorch-fid; the paper's network averages there.
    """

    max_pool_branch: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda name, *args, **kw: BasicConv2d(*args, dtype=self.dtype, name=name, **kw)
        branch1x1 = conv("branch1x1", 320, 1)(x)
        branch3x3 = conv("branch3x3_1", 384, 1)(x)
        branch3x3 = jnp.concatenate([conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(branch3x3),
                                     conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(branch3x3)], axis=-1)
        branch3x3dbl = conv("branch3x3dbl_1", 448, 1)(x)
        branch3x3dbl = conv("branch3x3dbl_2", 384, 3, padding=1)(branch3x3dbl)
        branch3x3dbl = jnp.concatenate([conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(branch3x3dbl),
                                        conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(branch3x3dbl)], axis=-1)
        pooled = max_pool_3x3_same(x) if self.max_pool_branch else tf_avg_pool_3x3(x)
        branch_pool = conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


# ----------------------------------------------------------------------------- input


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (i0, i1) and weight of i1 for each output row, as torch's bilinear, align_corners=False.

    Source coordinate (i + 0.5) * in / out - 0.5, clamped at 0, with torch's CPU kernel's
    roundings: in / out in float32, then one fused multiply-add (one rounding to float32;
    two roundings move some weights by 1e-5). Only the two nearest source rows count,
    however much the image shrinks: torch does not antialias, so neither may we
    (jax.image.resize would).
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    source = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)  # exact in float64, then rounded once
    source = np.maximum(source, np.float32(0))
    i0 = np.minimum(source.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, source - i0.astype(np.float32)


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC images to `size` (H, W) as F.interpolate(mode='bilinear', align_corners=False, antialias=False)."""
    for axis, out in zip((1, 2), size):
        if images.shape[axis] == out:
            continue  # torch's weights are then exactly (1, 0): the identity
        i0, i1, w1 = _linear_taps(images.shape[axis], out)
        w1 = jnp.asarray(w1).reshape((-1, 1, 1) if axis == 1 else (-1, 1))  # broadcast over (W,) C
        images = jnp.take(images, i0, axis=axis) * (1 - w1) + jnp.take(images, i1, axis=axis) * w1
    return images


# ----------------------------------------------------------------------------- network


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3(resize_input, normalize_input=True), final pool block only.

    (B, H, W, 3) float images in [0, 1] -> (B, 2048) float32 pool features. `resize_input`
    resizes to 299x299 first (any input size); without it the images go in as they are
    (at least 75x75). `dtype` is the convs' compute dtype; BatchNorm, the resize and the
    final pool run in float32.
    """

    resize_input: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 takes RGB images (B, H, W, 3) in [0, 1]; got shape {images.shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"FIDInceptionV3 takes float images in [0, 1]; got {images.dtype} (divide uint8 by 255)")
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        elif min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"without resize_input, images must be at least {MIN_SIZE}x{MIN_SIZE} "
                             f"(Mixed_7a needs a 3x3 map); got {x.shape[1]}x{x.shape[2]}")
        x = (2 * x - 1).astype(self.dtype)
        conv = lambda name, *args, **kw: BasicConv2d(*args, dtype=self.dtype, name=name, **kw)
        x = conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)
        x = conv("Conv2d_2a_3x3", 32, 3)(x)
        x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)
        x = max_pool_3x3_stride_2(x)
        x = conv("Conv2d_3b_1x1", 80, 1)(x)
        x = conv("Conv2d_4a_3x3", 192, 3)(x)
        x = max_pool_3x3_stride_2(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, self.dtype, name=name)(x)
        x = InceptionB(self.dtype, name="Mixed_6a")(x)
        for name, channels_7x7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(channels_7x7, self.dtype, name=name)(x)
        x = InceptionD(self.dtype, name="Mixed_7a")(x)
        x = InceptionE(False, self.dtype, name="Mixed_7b")(x)
        x = InceptionE(True, self.dtype, name="Mixed_7c")(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # AdaptiveAvgPool2d(1), flattened


def inception_features(params: Mapping[str, Any], images: jax.Array, *, resize_input: bool = True,
                       dtype: Dtype = jnp.float32) -> jax.Array:
    """(B, 2048) float32 FID pool features of NHWC images in [0, 1]; pure, so jit-able."""
    return FIDInceptionV3(resize_input=resize_input, dtype=dtype).apply({"params": params}, images)


# ----------------------------------------------------------------------------- weights


def torch_name(flax_path: tuple[str, ...]) -> str:
    """pytorch-fid's state-dict name of the Flax leaf at `flax_path`: the path joined by dots.

    Not weights.torch_name: Inception's attribute names end in digits (`branch5x5_1`) that
    are not list indices, which that rule would turn into `branch5x5.1`.
    """
    *modules, leaf = flax_path
    if leaf not in _LEAF_TO_TORCH:
        raise WeightLoadError(f"no PyTorch name for Flax leaf {'/'.join(flax_path)}")
    return ".".join([*modules, _LEAF_TO_TORCH[leaf]])


def _torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (flax_shape[3], flax_shape[2], *flax_shape[:2]) if leaf == "kernel" else tuple(flax_shape)


def param_template() -> dict[str, Any]:
    """Shapes of FIDInceptionV3's params (nothing is computed; they do not depend on the image size)."""
    model = FIDInceptionV3(resize_input=False)
    dummy = jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)))["params"]


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """PyTorch name -> PyTorch shape of every tensor the network reads (fc and the counters not included)."""
    return {torch_name(path): _torch_shape(path[-1], leaf.shape)
            for path, leaf in traverse_util.flatten_dict(param_template()).items()}


def read_weights(file: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file, or of a PyTorch pickle (.pth/.pt/.bin) if allowed."""
    return weights.read_weight_file(file, what="FID Inception", allow_pickle=allow_pickle,
                                    pickle_hint="allow_pickle=True (the converter's --allow_pickle, "
                                                "config.eval.allow_pickle)", convert=CONVERT_COMMAND)


def params_from_state_dict(state: Mapping[str, np.ndarray], *, source: str = "checkpoint",
                           dtype: Any = np.float32) -> dict[str, Any]:
    """FIDInceptionV3 params (jax.Arrays on the default device) from pytorch-fid's state dict.

    Strict (weights.params_from_state_dict): every missing, unexpected or mis-shaped tensor
    is named in one WeightLoadError; only `fc.*` and `*.num_batches_tracked` are skipped.
    """
    template = param_template()
    ignore = [rf"^{re.escape(name)}$" for name in IGNORED] + [rf"{re.escape(IGNORED_SUFFIX)}$"]
    return weights.params_from_state_dict(template, state, ignore=ignore, dtype=dtype, source=source,
                                          place=weights.placement(template), name_of=torch_name)


def state_dict_from_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of params_from_state_dict: pytorch-fid's names and layouts, float32 (no fc, no counters)."""
    return weights.state_dict_from_params(params, name_of=torch_name)


def load_inception_params(path: str | os.PathLike, *, allow_pickle: bool = False,
                          dtype: Any = np.float32) -> dict[str, Any]:
    """Params of FIDInceptionV3 from pytorch-fid's .pth (with allow_pickle=True) or its safetensors conversion."""
    state = read_weights(path, allow_pickle=allow_pickle)
    return params_from_state_dict(state, source=f"FID Inception weight file {str(path)!r}", dtype=dtype)


def convert_to_safetensors(pth: str | os.PathLike, out: str | os.PathLike, *, allow_pickle: bool = True) -> Path:
    """Writes pytorch-fid's weights as one float32 safetensors file (names and layouts unchanged).

    Reads `pth` as a pickle by default: converting it is the one step that has to trust it.
    The tensors are checked against the network first; fc.* and the BatchNorm counters
    are left out.
    """
    params = load_inception_params(pth, allow_pickle=allow_pickle)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights.write_safetensors(out, state_dict_from_params(params))
    return out


def weights_fingerprint(path: str | os.PathLike) -> str:
    """First 16 hex digits of the file's sha256: names statistics cached for these exact weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rectflow_jax.models.inception",
        description="Convert pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth) to "
                    "safetensors, readable without torch or pickles.")
    parser.add_argument("pth", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or a .safetensors)")
    parser.add_argument("out", help="the safetensors file to write")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="read a PyTorch pickle (.pth/.pt/.bin); pickles can run code, so only trusted files")
    args = parser.parse_args(argv)
    try:
        out = convert_to_safetensors(args.pth, args.out, allow_pickle=args.allow_pickle)
    except WeightLoadError as err:
        print(f"inception: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out} (fingerprint {weights_fingerprint(out)})")


if __name__ == "__main__":
    main()
