"""Why our SD UNet trails PyTorch on CPU, and a measured remedy: blocked attention.

    python benchmarks/cpu_attention.py            # one SD 1.5 self-attention (4096 tokens, 8 heads x 40)
    python benchmarks/cpu_attention.py --unet     # the whole SD 1.5 UNet forward, stock vs blocked, vs torch

`layers.multi_head_attention` goes through jax.nn.dot_product_attention, whose XLA path
materialises the (heads, 4096, 4096) logits (512 MB in float32) and streams them through
softmax; torch's CPU scaled_dot_product_attention is a fused flash kernel. `blocked`
below computes the same attention over (query block x key block) tiles with a running
max and sum (Rabe & Staats 2021, "Self-attention does not need O(n^2) memory"), so each
tile stays in cache. Rows alternate between the contenders (fastest of --repeats kept),
with the 1-minute load average: other work on the machine slows every side.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from rectflow_jax.models import layers


def blocked_attention(q_block: int = 256, k_block: int = 512):
    """multi_head_attention computed tile by tile; the stock path for masks and short sequences."""
    stock = layers.multi_head_attention

    def attention(q, k, v, num_heads, *, mask=None, is_causal=False, upcast=False):
        lq, lk = q.shape[1], k.shape[1]
        tiled = lq % q_block == 0 and lk % k_block == 0 and lq * lk > q_block * k_block
        if mask is not None or is_causal or not tiled:
            return stock(q, k, v, num_heads, mask=mask, is_causal=is_causal, upcast=upcast)
        out_dtype = q.dtype
        if upcast:
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        b, _, width = q.shape
        d = width // num_heads
        # (blocks, B, heads, block, d): head-major tiles, the layout XLA's CPU dot wants.
        tiles = lambda a, n: a.reshape(b, -1, n, num_heads, d).transpose(1, 0, 3, 2, 4)
        qt, kt, vt = tiles(q * d ** -0.5, q_block), tiles(k, k_block), tiles(v, k_block)

        def one_query_block(qi):
            def step(carry, kv):
                running_max, running_sum, acc = carry
                logits = jnp.einsum("bhqd,bhkd->bhqk", qi, kv[0], preferred_element_type=jnp.float32)
                new_max = jnp.maximum(running_max, logits.max(-1, keepdims=True))
                p = jnp.exp(logits - new_max)
                rescale = jnp.exp(running_max - new_max)
                acc = acc * rescale + jnp.einsum("bhqk,bhkd->bhqd", p.astype(kv[1].dtype), kv[1],
                                                 preferred_element_type=jnp.float32)
                return (new_max, running_sum * rescale + p.sum(-1, keepdims=True), acc), None

            stats = qi.shape[:-1] + (1,)
            init = (jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32),
                    jnp.zeros(qi.shape, jnp.float32))
            (_, total, acc), _ = jax.lax.scan(step, init, (kt, vt))
            return acc / total

        out = jax.lax.map(one_query_block, qt)  # (blocks, B, heads, q_block, d)
        return out.transpose(1, 0, 3, 2, 4).reshape(b, lq, width).astype(out_dtype)

    return attention


def race(contenders: dict, repeats: int) -> dict[str, float]:
    """Fastest of `repeats` calls (ms) per contender, after one warm-up call each, calls alternating."""
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def single_attention(repeats: int) -> None:
    rng = np.random.default_rng(0)
    heads, tokens, width = 8, 4096, 320
    q, k, v = (rng.standard_normal((1, tokens, width), dtype=np.float32) for _ in range(3))
    stock = jax.jit(lambda *a: layers.multi_head_attention(*a, heads))
    blocked = jax.jit(lambda *a: blocked_attention()(*a, heads))
    split = lambda a: torch.from_numpy(a.reshape(1, tokens, heads, -1).transpose(0, 2, 1, 3).copy())
    qt, kt, vt = split(q), split(k), split(v)
    err = np.abs(np.asarray(blocked(q, k, v)) - np.asarray(stock(q, k, v))).max()
    with torch.inference_mode():
        ms = race({"stock": lambda: stock(q, k, v).block_until_ready(),
                   "blocked": lambda: blocked(q, k, v).block_until_ready(),
                   "torch sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)}, repeats)
    print("self-attention 4096 tokens, 8 x 40: " + ", ".join(f"{n} {t:.0f} ms" for n, t in ms.items())
          + f"; blocked vs stock max |diff| {err:.1e}; load {os.getloadavg()[0]:.2f}")


def whole_unet(repeats: int) -> None:
    from sd_speed import build_torch, load_ours  # this folder

    unet_t, vae_t, clip_t = build_torch("sd15")
    pipe = load_ours(unet_t, vae_t, clip_t, "float32")
    del vae_t, clip_t
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 64, 4), dtype=np.float32)
    context = rng.standard_normal((1, 77, 768), dtype=np.float32)
    t = np.full((1,), 1000.0, np.float32)
    forward = lambda: jax.jit(lambda p, *a: pipe.unet.apply({"params": p}, *a))
    stock = forward()
    stock_out = np.asarray(stock(pipe.params["unet"], x, t, context))
    original, layers.multi_head_attention = layers.multi_head_attention, blocked_attention()
    blocked = forward()
    blocked_out = np.asarray(blocked(pipe.params["unet"], x, t, context))  # traced with the blocked attention
    layers.multi_head_attention = original
    err = np.abs(blocked_out - stock_out).max() / np.abs(stock_out).max()
    xt, tt, ct = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(context)
    with torch.inference_mode():
        ms = race({"stock": lambda: stock(pipe.params["unet"], x, t, context).block_until_ready(),
                   "blocked": lambda: blocked(pipe.params["unet"], x, t, context).block_until_ready(),
                   "torch": lambda: unet_t(xt, tt, ct).sample}, repeats)
    print("SD 1.5 UNet forward, batch 1: " + ", ".join(f"{n} {t:.0f} ms" for n, t in ms.items())
          + f"; blocked vs stock max rel diff {err:.1e}; load {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", action="store_true", help="time the whole SD 1.5 UNet (minutes)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    (whole_unet if args.unet else single_attention)(args.repeats)


if __name__ == "__main__":
    main()
