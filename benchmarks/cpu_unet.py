"""What makes our SD 1.5 UNet as fast as PyTorch's on CPU: an ablation of the two CPU paths.

    python benchmarks/cpu_unet.py                # one self-attention layer (4096 tokens, 8 heads x 40)
    python benchmarks/cpu_unet.py --unet         # the whole SD 1.5 UNet forward, batch 1 (minutes)

Two code paths in models/layers.py exist for the CPU alone:
  tiled attention  XLA's CPU attention materialises the (heads, 4096, 4096) logits (512 MB
                   in float32) and streams them through softmax; torch's CPU SDPA is a fused
                   flash kernel. `layers.tiled_attention` works tile by tile with an online
                   softmax instead.
  patch matmul     at the 16x16 and 8x8 levels (1280-2560 channels) XLA's CPU convolution is
                   slow; `layers.conv2d` gathers patches and does one matmul instead.
Each is switched off through its threshold in `layers`, the UNet retraced, and every
variant raced against torch: calls alternate, the fastest of --repeats is kept, with the
1-minute load average (other work on the machine slows every side).
"""

from __future__ import annotations

import argparse
import contextlib
import os

import jax
import numpy as np
import torch
from sd_speed import build_torch, load_ours, race  # this folder

from rectflow_jax.models import layers


@contextlib.contextmanager
def cpu_paths(tiled_attention: bool, patch_matmul: bool):
    """Traces inside see `layers` with the chosen CPU paths; thresholds are read at trace time."""
    saved = layers.CPU_KEY_BLOCK, layers.CPU_PATCH_MATMUL_MAX_PIXELS
    if not tiled_attention:
        layers.CPU_KEY_BLOCK = 2 ** 62  # no sequence is long enough
    if not patch_matmul:
        layers.CPU_PATCH_MATMUL_MAX_PIXELS = 0
    try:
        yield
    finally:
        layers.CPU_KEY_BLOCK, layers.CPU_PATCH_MATMUL_MAX_PIXELS = saved


def single_attention(repeats: int) -> None:
    rng = np.random.default_rng(0)
    heads, tokens, width = 8, 4096, 320
    q, k, v = (rng.standard_normal((1, tokens, width), dtype=np.float32) for _ in range(3))
    variants = {}
    for name, tiled in (("XLA attention", False), ("tiled", True)):
        with cpu_paths(tiled, True):
            fn = jax.jit(lambda *a: layers.multi_head_attention(*a, heads))
            fn(q, k, v)  # traced and compiled here, under the chosen path
        variants[name] = fn
    err = np.abs(np.asarray(variants["tiled"](q, k, v)) - np.asarray(variants["XLA attention"](q, k, v))).max()
    split = lambda a: torch.from_numpy(a.reshape(1, tokens, heads, -1).transpose(0, 2, 1, 3).copy())
    qt, kt, vt = split(q), split(k), split(v)
    contenders = {name: (lambda fn=fn: fn(q, k, v).block_until_ready()) for name, fn in variants.items()}
    with torch.inference_mode():
        contenders["torch sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
        ms = race(contenders, repeats)
    print("self-attention 4096 tokens, 8 x 40: " + ", ".join(f"{n} {t:.0f} ms" for n, t in ms.items())
          + f"; tiled vs XLA max |diff| {err:.1e}; load {os.getloadavg()[0]:.2f}")


def whole_unet(repeats: int) -> None:
    unet_t, vae_t, clip_t = build_torch("sd15")
    pipe = load_ours(unet_t, vae_t, clip_t, "float32")
    del vae_t, clip_t
    rng = np.random.default_rng(0)
    inputs = (rng.standard_normal((1, 64, 64, 4), dtype=np.float32), np.full((1,), 1000.0, np.float32),
              rng.standard_normal((1, 77, 768), dtype=np.float32))
    outputs, contenders = {}, {}
    for name, paths in (("XLA only", (False, False)), ("+ tiled attention", (True, False)),
                        ("+ patch matmul (ours)", (True, True))):
        with cpu_paths(*paths):
            fn = jax.jit(lambda p, *a: pipe.unet.apply({"params": p}, *a))
            outputs[name] = np.asarray(fn(pipe.params["unet"], *inputs))
        contenders[name] = lambda fn=fn: fn(pipe.params["unet"], *inputs).block_until_ready()
    x, t, context = (torch.from_numpy(a) for a in inputs)
    x = x.permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        contenders["torch"] = lambda: unet_t(x, t, context).sample
        reference = contenders["torch"]().permute(0, 2, 3, 1).numpy()
        ms = race(contenders, repeats)
    print(f"SD 1.5 UNet forward, batch 1, float32, torch on {torch.get_num_threads()} threads; load {os.getloadavg()[0]:.2f}")
    print(f"{'variant':<24}{'ms':>9}{'/ torch':>9}{'max rel diff vs torch':>23}")
    for name, time_ms in ms.items():
        diff = np.abs(outputs.get(name, reference) - reference).max() / np.abs(reference).max()
        print(f"{name:<24}{time_ms:>9.0f}{time_ms / ms['torch']:>9.2f}{diff:>23.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", action="store_true", help="time the whole SD 1.5 UNet (minutes)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    (whole_unet if args.unet else single_attention)(args.repeats)


if __name__ == "__main__":
    main()
