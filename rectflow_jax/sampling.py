"""ODE samplers for velocity fields, as jit-compiled lax.scan loops.

One sampler serves reflow pairs, evaluation and the CLI. `velocity(x, t)` takes a
batch x and times t of shape (B,) in [0, 1] and integrates forward from t = 0.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


class SamplerError(ValueError):
    """A sampler setting that cannot be honoured (an unknown method, no steps)."""


class Solution(NamedTuple):
    x1: jax.Array
    trajectory: jax.Array | None  # (N+1, B, ...) states on the time grid
    velocities: jax.Array | None  # (N, B, ...) velocity used on each interval
    times: jax.Array              # (N+1,)


def uniform_grid(num_steps: int, t0: float = 0.0, t1: float = 1.0) -> jax.Array:
    return jnp.linspace(t0, t1, num_steps + 1, dtype=jnp.float32)


def _time_batch(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.full((x.shape[0],), t, dtype=jnp.float32)


class Stepper(NamedTuple):
    """One ODE method: `init(x0)` is its state before the first step (its history, for a
    multistep method); `step(velocity, x, state, t, t_next) -> (x_next, state, v)`, v being
    the velocity it used on the interval."""

    init: Callable[[jax.Array], Any]
    step: Callable[..., tuple[jax.Array, Any, jax.Array]]


def _no_state(x0):
    return ()


def _euler_step(velocity: VelocityFn, x, state, t, t_next):
    v = velocity(x, _time_batch(t, x))
    return x + (t_next - t) * v.astype(x.dtype), state, v


def implicit_euler(iterations: int) -> Stepper:
    """Implicit Euler, x_next = x + (t_next - t) v(x_next, t_next), solved by `iterations` fixed-point
    steps from the explicit one. Run backwards over a grid it undoes forward Euler on that grid
    exactly where the iteration converges ((t - t_next) * Lipschitz(v) < 1): exact inversion."""

    def step(velocity: VelocityFn, x, state, t, t_next):
        v = velocity(x, _time_batch(t, x))
        solve = lambda _, y: x + (t_next - t) * velocity(y, _time_batch(t_next, x)).astype(x.dtype)
        return jax.lax.fori_loop(0, iterations, solve, x + (t_next - t) * v.astype(x.dtype)), state, v

    return Stepper(_no_state, step)


def _heun_step(velocity: VelocityFn, x, state, t, t_next):
    dt = t_next - t
    v = velocity(x, _time_batch(t, x))
    x_euler = x + dt * v.astype(x.dtype)
    v_next = velocity(x_euler, _time_batch(t_next, x))
    v_mean = 0.5 * (v + v_next)
    return x + dt * v_mean.astype(x.dtype), state, v_mean


def _logit(t):
    return jnp.log(t) - jnp.log1p(-t)


class _History(NamedTuple):
    data: jax.Array      # the previous step's data prediction x + (1 - t) v
    h: jax.Array         # its step in log-SNR, logit(t_next) - logit(t)
    valid: jax.Array     # whether there was a previous step


def _dpm_init(x0):
    return _History(jnp.zeros_like(x0), jnp.ones((), jnp.float32), jnp.zeros((), bool))


def _dpm_solver_pp_2m_step(velocity: VelocityFn, x, state: _History, t, t_next):
    """DPM-Solver++(2M) (Lu et al., 2022) in rectified-flow time.

    In y = r x_data + (1 - r) eps the data prediction is D = y + (1 - r) v and log-SNR is
    logit(r); the 2M update is an Euler step whose velocity uses the extrapolated
    D + (D - D_prev) / (2 rho), rho = h_prev / h: v + (D - D_prev) / (2 rho (1 - r)).
    First order (DDIM) on the first step and on a last step that reaches t = 1 (infinite
    log-SNR), as diffusers' DPMSolverMultistepScheduler does with final_sigmas_type 'zero'.
    """
    v = velocity(x, _time_batch(t, x)).astype(x.dtype)
    data = x + (1.0 - t) * v
    h = _logit(t_next) - _logit(t)
    second = state.valid & (t_next < 1.0) & jnp.isfinite(h) & (h > 0)
    rho = jnp.where(second, state.h / jnp.where(second, h, 1.0), 1.0)
    correction = (data - state.data) / (2.0 * rho * jnp.maximum(1.0 - t, 1e-12))
    v_used = v + jnp.where(second, 1.0, 0.0).astype(x.dtype) * correction.astype(x.dtype)
    return x + (t_next - t) * v_used, _History(data, h.astype(jnp.float32), jnp.asarray(True)), v_used


# DDIM (eta = 0) on an epsilon model is Euler in rectified-flow time (rectflow_jax.diffusion),
# so one stepper serves both names.
STEPPERS = {"euler": Stepper(_no_state, _euler_step), "heun": Stepper(_no_state, _heun_step),
            "ddim": Stepper(_no_state, _euler_step), "dpm_solver++": Stepper(_dpm_init, _dpm_solver_pp_2m_step)}
METHODS = tuple(sorted(STEPPERS))
# One velocity evaluation per step: the methods `implicit_iterations` turns into implicit Euler.
IMPLICIT_METHODS = ("euler", "ddim")


def check_method(method: str) -> str:
    """`method` if it names one of our ODE steppers, else one clear SamplerError."""
    if method not in STEPPERS:
        raise SamplerError(f"unknown sampler method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def integrate(velocity: VelocityFn, x0: jax.Array, num_steps: int | None = None, *,
              method: str = "euler", times: jax.Array | None = None,
              return_trajectory: bool = False, implicit_iterations: int = 0) -> Solution:
    """Integrates dx/dt = v(x, t) over `times` (default: a uniform grid of num_steps).

    `implicit_iterations` K > 0 (euler and ddim only) takes each step implicitly, by K
    fixed-point iterations (`implicit_euler`): what exact inversion runs backwards.

    Traceable: call it inside jax.jit (see `make_sampler`). The step count is the
    (static) length of the grid. A multistep method carries its history in the scan
    state. With return_trajectory the states and velocities are stacked by the scan.
    """
    check_method(method)
    if times is None:
        if not num_steps or num_steps < 1:
            raise SamplerError(f"num_steps must be a positive integer, got {num_steps!r}")
        times = uniform_grid(num_steps)
    times = jnp.asarray(times, jnp.float32)
    stepper = STEPPERS[method]
    if implicit_iterations:
        if method not in IMPLICIT_METHODS:
            raise SamplerError(f"implicit steps take one velocity evaluation a step ({', '.join(IMPLICIT_METHODS)}), "
                               f"not {method!r}")
        stepper = implicit_euler(int(implicit_iterations))

    def body(carry, t_pair):
        x, state = carry
        x_next, state, v = stepper.step(velocity, x, state, t_pair[0], t_pair[1])
        return (x_next, state), ((x_next, v) if return_trajectory else None)

    (x1, _), stacked = jax.lax.scan(body, (x0, stepper.init(x0)), (times[:-1], times[1:]))
    if not return_trajectory:
        return Solution(x1, None, None, times)
    states, velocities = stacked
    return Solution(x1, jnp.concatenate([x0[None], states]), velocities, times)


def one_step(velocity: VelocityFn, x0: jax.Array) -> jax.Array:
    """x0 + v(x0, 0): the one-step generator (a distilled student, or 1-step Euler)."""
    return x0 + velocity(x0, _time_batch(0.0, x0)).astype(x0.dtype)


def noise_from_seeds(seeds: jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x0 of each (seed, index): normal(fold_in(key(seed), index)), float32 (N, *shape).

    The one noise of text-to-image and of text triplets: a triplet stores (seed, index)
    and training regenerates its x0 bit for bit with this same function.
    """
    draw = lambda seed, index: jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), shape, jnp.float32)
    return jax.vmap(draw)(jnp.asarray(seeds, jnp.uint32), jnp.asarray(indices, jnp.uint32))


def make_sampler(apply_velocity: Callable, num_steps: int, *, method: str = "euler",
                 return_trajectory: bool = False, times: np.ndarray | None = None):
    """jit(params, x0, cond) -> Solution, compiled once per (shapes, num_steps).

    `apply_velocity(params, x, t, cond)` is a model's velocity. The grid and step
    count are closed over (static) so lax.scan has a fixed length.
    """
    grid = None if times is None else jnp.asarray(times, jnp.float32)

    @jax.jit
    def sample(params, x0, cond=None):
        velocity = lambda x, t: apply_velocity(params, x, t, cond)
        return integrate(velocity, x0, num_steps, method=method, times=grid,
                         return_trajectory=return_trajectory)

    return sample


def guidance_applies(scale: float) -> bool:
    """Whether classifier-free guidance is applied at `scale`: only above 1.

    As in diffusers' StableDiffusionPipeline and InstaFlow's RectifiedFlowPipeline
    (`do_classifier_free_guidance = guidance_scale > 1.0`): any scale <= 1, 0 included,
    samples the conditional model alone (InstaFlow's one-step model is run at 0).
    """
    return float(scale) > 1.0


def classifier_free_guidance(velocity_cond: VelocityFn, velocity_uncond: VelocityFn,
                             scale: float) -> VelocityFn:
    """v_u + s (v_c - v_u); scale 1 is the conditional model alone. Callers decide
    whether to guide at all with `guidance_applies`."""

    def guided(x, t):
        v_uncond = velocity_uncond(x, t)
        return v_uncond + scale * (velocity_cond(x, t) - v_uncond)

    return guided


def classifier_free_guidance_batched(velocity_pair: VelocityFn, scale: float) -> VelocityFn:
    """v_u + s (v_c - v_u) from ONE call on the doubled batch [x; x].

    `velocity_pair` pairs the first half of its batch with the condition and the second
    with the null condition (e.g. a UNet given concatenated [text; negative] embeddings)
    and returns [v_c; v_u]: one large call keeps an accelerator busier than two small ones.
    """

    def guided(x, t):
        v_cond, v_uncond = jnp.split(velocity_pair(jnp.concatenate([x, x]), jnp.concatenate([t, t])), 2)
        return v_uncond + scale * (v_cond - v_uncond)

    return guided
