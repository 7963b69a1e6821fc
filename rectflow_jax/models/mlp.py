"""MLP velocity field v(x, t) for low-dimensional (toy) data."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from rectflow_jax.models.layers import class_labels, dense, embed, sinusoidal_embedding


class MLPVelocity(nn.Module):
    """x (B, D), t (B,) in [0, 1] -> v (B, D).

    The time embedding (plus a class embedding when `num_classes` > 0) is projected into
    every hidden layer, so conditioning does not fade with depth. With `num_classes` > 0
    the table has one extra row, index `num_classes`, meaning "no label": it is used when
    `cond` has no 'label' and lets training drop labels for classifier-free guidance.
    """

    hidden: int = 256
    depth: int = 3
    time_embed_dim: int = 64
    num_classes: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array] | None = None,
                 train: bool = False) -> jax.Array:
        del train  # no dropout: kept for a uniform model signature
        layer = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = sinusoidal_embedding(t * 999.0, self.time_embed_dim)
        emb = dense(self.hidden, name="time_in", **layer)(emb)
        if self.num_classes:
            emb = emb + embed(self.num_classes + 1, self.hidden, name="label_embed", **layer)(
                class_labels(cond, x.shape[0], self.num_classes))
        emb = nn.silu(emb)
        h = dense(self.hidden, name="input", **layer)(x.astype(self.dtype))
        for i in range(self.depth):
            h = h + dense(self.hidden, name=f"cond_{i}", **layer)(emb)
            h = dense(self.hidden, name=f"hidden_{i}", **layer)(nn.silu(h))
        # Default (LeCun-normal) init, not zeros: every layer gets gradients from step one.
        v = dense(x.shape[-1], name="output", **layer)(nn.silu(h))
        return v.astype(x.dtype)
