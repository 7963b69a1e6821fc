"""Rectified-flow objective: interpolant, time samplers, losses and flow diagnostics.

Convention (README, 'Conventions'): t = 0 is the source X0 ~ pi0, t = 1 the data X1 ~ pi1,
X_t = t X1 + (1 - t) X0 and the target velocity is X1 - X0.
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, t) -> v, t of shape (B,)
# What a first stage learns from data (config.flow.objective): velocities, or a diffusion
# model's noise prediction (rectflow_jax.diffusion) that later stages reflow.
OBJECTIVES = ("rectified_flow", "diffusion")


def _broadcast_time(t: jax.Array, x: jax.Array) -> jax.Array:
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    tb = _broadcast_time(t, x0)
    return tb * x1 + (1.0 - tb) * x0


def target_velocity(x0: jax.Array, x1: jax.Array) -> jax.Array:
    return x1 - x0


# ----------------------------------------------------------------------------- time samplers


# Each sampler's arguments are keyword-only and have no defaults here: the config
# (configlib.base_config: flow.<sampler>.<arg>) is the one place that sets them.


def uniform_time(key: jax.Array, n: int, *, eps: float) -> jax.Array:
    """Uniform on [eps, 1], as in the official code."""
    return jax.random.uniform(key, (n,), minval=eps, maxval=1.0)


def logit_normal_time(key: jax.Array, n: int, *, mean: float, std: float) -> jax.Array:
    """sigmoid(N(mean, std^2)): more weight in the middle of [0, 1] (Esser et al., 2024)."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))


def u_shaped_time(key: jax.Array, n: int, *, a: float) -> jax.Array:
    """Density proportional to cosh(a (t - 1/2)) on [0, 1]: more weight near both ends.

    Sampled by inverting the CDF F(t) = (sinh(a (t - 1/2)) + sinh(a / 2)) / (2 sinh(a / 2)).
    """
    u = jax.random.uniform(key, (n,))
    half = jnp.sinh(a / 2)
    return 0.5 + jnp.arcsinh((2 * u - 1) * half) / a


TIME_SAMPLERS = {"uniform": uniform_time, "logit_normal": logit_normal_time, "u_shaped": u_shaped_time}


def time_sampler_arg_names(name: str) -> tuple[str, ...]:
    """The arguments a time sampler takes (besides key and n)."""
    return tuple(p.name for p in inspect.signature(TIME_SAMPLERS[name]).parameters.values()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY)


def time_sampler(name: str, **kwargs) -> Callable[[jax.Array, int], jax.Array]:
    """(key, n) -> n times in [0, 1], drawn by the sampler `name` with exactly its own arguments."""
    if name not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {name!r}; choose one of {sorted(TIME_SAMPLERS)}")
    wanted = time_sampler_arg_names(name)
    if set(kwargs) != set(wanted):
        unknown, missing = sorted(set(kwargs) - set(wanted)), sorted(set(wanted) - set(kwargs))
        raise ValueError(f"time sampler {name!r} takes the arguments {list(wanted)}"
                         + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else ""))
    return lambda key, n: TIME_SAMPLERS[name](key, n, **kwargs)


# ----------------------------------------------------------------------------- losses


def l2_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example mean squared error, shape (B,)."""
    return jnp.mean(jnp.square(pred - target).reshape(pred.shape[0], -1), axis=1)


def pseudo_huber_loss(pred: jax.Array, target: jax.Array, c: float | None = None) -> jax.Array:
    """Per-example sqrt(||d||^2 + c^2) - c; c defaults to 0.00054 sqrt(dim) (Song & Dhariwal, 2023)."""
    diff = (pred - target).reshape(pred.shape[0], -1)
    if c is None:
        c = 0.00054 * (diff.shape[1] ** 0.5)
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=1) + c * c) - c


LOSSES = {"l2": l2_loss, "pseudo_huber": pseudo_huber_loss}
# Losses on decoded images, built by the stage from frozen models (rectflow_jax.perceptual).
PERCEPTUAL_LOSSES = ("lpips",)


def loss_fn(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


# ----------------------------------------------------------------------------- diagnostics


def straightness(trajectory: jax.Array, times: jax.Array, velocities: jax.Array) -> jax.Array:
    """E int_0^1 ||(X1 - X0) - v(X_t, t)||^2 dt along sampled trajectories.

    `trajectory` is (N+1, B, ...) states on the grid `times` (N+1,), `velocities`
    (N, B, ...) the velocity used on each interval; the integral is the Riemann sum
    over the grid. Zero exactly when every trajectory is a straight line traversed at
    constant speed. Squared norms are summed over a sample's dimensions. A grid over part
    of [0, 1] (a diffusion teacher's starts just above 0) compares with the constant speed
    that covers it: displacement / (t_N - t_0).
    """
    displacement = (trajectory[-1] - trajectory[0]) / (times[-1] - times[0])
    dev = jnp.square(velocities - displacement[None]).reshape(velocities.shape[0], velocities.shape[1], -1)
    per_step = jnp.mean(jnp.sum(dev, axis=-1), axis=1)
    return jnp.sum(per_step * jnp.diff(times))


def transport_cost(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """E ||X1 - X0||^2 (squared norm summed over a sample's dimensions)."""
    return jnp.mean(jnp.sum(jnp.square(x1 - x0).reshape(x0.shape[0], -1), axis=1))
