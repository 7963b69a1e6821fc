"""Discrete diffusion schedules (Stable Diffusion's) seen as rectified-flow time.

An SD latent at diffusion timestep tau is x = a x_data + s eps, a = sqrt(alpha_bar(tau)),
s = sqrt(1 - alpha_bar(tau)). With r = a / (a + s) and y = x / (a + s),

    y = r x_data + (1 - r) eps,

a rectified-flow interpolant in our time (t = r: noise near 0, data at 1). An epsilon,
v- or sample-predicting UNet therefore is a velocity field v(y, r) = x_data_hat - eps_hat,
and DDIM (eta = 0) is exactly Euler in (y, r); DPM-Solver++ is a multistep solver in the
same coordinates (sampling.py). a + s = 1 / sqrt(r^2 + (1 - r)^2) and r = 1 / (1 + sigma)
for diffusers' sigma = s / a.

A scheduler config (scheduler/scheduler_config.json of a folder, of any scheduler class)
is read as diffusers' `DDIMScheduler.from_config` / `DPMSolverMultistepScheduler.from_config`
would read it: the keys those classes know, their defaults for the rest. Keys that would
change the solver into something we do not implement (Karras sigmas, thresholding, ...)
are refused by name.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")

# The diffusers scheduler class whose semantics each of our diffusion solvers follows,
# with that class's defaults for the keys we read.
_SHARED_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                    "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0,
                    "rescale_betas_zero_snr": False, "thresholding": False}
SOLVER_DEFAULTS = {
    "ddim": dict(_SHARED_DEFAULTS, timestep_spacing="leading", set_alpha_to_one=True, clip_sample=True),
    "dpm_solver++": dict(_SHARED_DEFAULTS, timestep_spacing="linspace", final_sigmas_type="zero",
                         algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                         euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                         use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
                         variance_type=None, use_dynamic_shifting=False),
}
# Values we implement; any other value of these keys is refused (the default is always allowed).
_ONLY = {"rescale_betas_zero_snr": (False,), "thresholding": (False,), "clip_sample": (False,),
         "final_sigmas_type": ("zero",), "algorithm_type": ("dpmsolver++",), "solver_order": (2,),
         "solver_type": ("midpoint",), "euler_at_final": (False,), "use_karras_sigmas": (False,),
         "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "use_lu_lambdas": (False,),
         "use_flow_sigmas": (False,), "variance_type": (None,), "use_dynamic_shifting": (False,)}
_WHY = {"clip_sample": "clipping the predicted latent is not a probability-flow ODE (SD folders set it false)",
        "thresholding": "dynamic thresholding is not a probability-flow ODE"}


class ScheduleError(ValueError):
    """A scheduler config, or a request to it, that our diffusion solvers cannot honour."""


class Schedule(NamedTuple):
    """A folder's noise schedule as one solver reads it."""

    alphas_cumprod: np.ndarray   # float64 (T,)
    prediction_type: str
    solver: str                  # 'ddim' | 'dpm_solver++'
    settings: dict               # the scheduler keys in force for this solver

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def rf_times(self) -> np.ndarray:
        """r = a / (a + s) of every training timestep, float32 (decreasing in tau)."""
        return rf_time_of_alpha_bar(self.alphas_cumprod)


def _betas(settings: Mapping[str, Any]) -> np.ndarray:
    n = int(settings["num_train_timesteps"])
    if settings.get("trained_betas") is not None:
        return np.asarray(settings["trained_betas"], np.float64)
    kind, start, end = settings["beta_schedule"], float(settings["beta_start"]), float(settings["beta_end"])
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.asarray([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    raise ScheduleError(f"scheduler beta_schedule={kind!r} is not one of {list(BETA_SCHEDULES)}")


def schedule_for(config: Mapping[str, Any] | None, solver: str, *, where: str = "scheduler config") -> Schedule:
    """The schedule `solver` ('ddim' | 'dpm_solver++') reads from a folder's scheduler config."""
    if solver not in SOLVER_DEFAULTS:
        raise ScheduleError(f"no diffusion solver {solver!r}; choose one of {list(SOLVER_DEFAULTS)}")
    defaults = SOLVER_DEFAULTS[solver]
    settings = {k: (config or {}).get(k, v) for k, v in defaults.items()}
    for key, allowed in _ONLY.items():
        if key not in settings or settings[key] in allowed:
            continue
        why = f": {_WHY[key]}" if key in _WHY else ""
        if key in (config or {}):
            raise ScheduleError(f"{where}: {key}={settings[key]!r} is not supported by our {solver} "
                                f"(only {' or '.join(map(repr, allowed))}){why}")
        raise ScheduleError(f"{where} does not set {key}, and {solver}'s default {key}={settings[key]!r} is not "
                            f"supported{why}; set {key} to {allowed[0]!r} there")
    if settings["prediction_type"] not in PREDICTION_TYPES:
        raise ScheduleError(f"{where}: prediction_type={settings['prediction_type']!r} is not one of "
                            f"{list(PREDICTION_TYPES)}")
    if settings["timestep_spacing"] not in SPACINGS:
        raise ScheduleError(f"{where}: timestep_spacing={settings['timestep_spacing']!r} is not one of "
                            f"{list(SPACINGS)}")
    alphas_cumprod = np.cumprod(1.0 - _betas(settings))
    return Schedule(alphas_cumprod, settings["prediction_type"], solver, settings)


def timesteps(schedule: Schedule, num_steps: int) -> tuple[np.ndarray, float]:
    """(the solver's integer timesteps, alpha_bar after the last step), as diffusers sets them."""
    T, n = schedule.num_train_timesteps, int(num_steps)
    if not 1 <= n <= T:
        raise ScheduleError(f"num_steps must lie in [1, {T}], got {num_steps}")
    spacing, offset = schedule.settings["timestep_spacing"], int(schedule.settings["steps_offset"])
    if schedule.solver == "ddim":
        if spacing == "linspace":
            taus = np.linspace(0, T - 1, n).round()[::-1]
        elif spacing == "leading":
            taus = (np.arange(n) * (T // n)).round()[::-1] + offset
        else:
            taus = np.round(np.arange(T, 0, -T / n)) - 1
        taus = taus.astype(np.int64)
        # DDIM steps from tau to tau - T // n, then reads that latent as being at the next
        # timestep; in our time that is one Euler step only where the two agree.
        landing = taus - T // n
        if np.any(landing[:-1] != taus[1:]):
            raise ScheduleError(
                f"DDIM with timestep_spacing={spacing!r} at {n} steps lands between its own timesteps "
                f"(diffusers steps {int(taus[0])} -> {int(landing[0])}, then continues from {int(taus[1])}): "
                "that is no ODE solve; use timestep_spacing 'leading' (SD's), a step count dividing "
                f"{T}, or dpm_solver++")
        if landing[-1] >= 0:
            final = float(schedule.alphas_cumprod[landing[-1]])
        else:
            final = 1.0 if schedule.settings["set_alpha_to_one"] else float(schedule.alphas_cumprod[0])
        return taus, final
    if spacing == "linspace":
        taus = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        taus = (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + offset
    else:
        taus = np.arange(T, 0, -T / n).round() - 1
    return taus.astype(np.int64), 1.0  # final_sigmas_type 'zero': the last step reaches the data


def rf_time_of_alpha_bar(alpha_bar: float | np.ndarray) -> np.ndarray:
    a, s = np.sqrt(alpha_bar), np.sqrt(1.0 - np.asarray(alpha_bar, np.float64))
    return (a / (a + s)).astype(np.float32)


def time_grid(schedule: Schedule, num_steps: int) -> np.ndarray:
    """Our times r (float32, increasing) at the solver's timesteps, then where its last step lands."""
    taus, final = timesteps(schedule, num_steps)
    return np.concatenate([schedule.rf_times[taus], rf_time_of_alpha_bar(final)[None]])


def latent_scale(t: jax.Array) -> jax.Array:
    """a + s at our time t: x = y * latent_scale(t)."""
    return jax.lax.rsqrt(jnp.square(t) + jnp.square(1.0 - t))


def to_rf(x: jax.Array, t: jax.Array) -> jax.Array:
    """An SD latent at our time t -> the rectified-flow state y."""
    return x / _expand(latent_scale(t), x)


def from_rf(y: jax.Array, t: jax.Array) -> jax.Array:
    return y * _expand(latent_scale(t), y)


def _expand(value: jax.Array, like: jax.Array) -> jax.Array:
    value = jnp.asarray(value, like.dtype)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim))


def diffusion_timestep(schedule: Schedule, t: jax.Array) -> jax.Array:
    """The (fractional) training timestep whose r is t; exact at the table's own values."""
    r = schedule.rf_times
    return jnp.interp(t, jnp.asarray(r[::-1]), jnp.arange(len(r) - 1, -1, -1, dtype=jnp.float32))


# ----------------------------------------------------------------------------- training


def training_schedule(config: Mapping[str, Any], *, where: str = "flow.diffusion") -> Schedule:
    """The schedule a diffusion objective trains on; refused here if its samplers could not read it."""
    schedule_for(config, "dpm_solver++", where=where)
    return schedule_for(config, "ddim", where=where)


def model_time(timesteps: jax.Array) -> jax.Array:
    """Our time 1 - tau / 1000 at which a model is shown SD timestep tau (DESIGN's mapping), so
    that an SD-shaped UNet, called at (1 - t) * 1000, sees tau itself."""
    return 1.0 - jnp.asarray(timesteps, jnp.float32) / 1000.0


def noised(alphas_cumprod: jax.Array, x_data: jax.Array, eps: jax.Array, timesteps: jax.Array) -> jax.Array:
    """x_tau = sqrt(alpha_bar) x_data + sqrt(1 - alpha_bar) eps, as diffusers' add_noise."""
    alpha_bar = _expand(jnp.asarray(alphas_cumprod, jnp.float32)[timesteps], x_data)
    return jnp.sqrt(alpha_bar) * x_data + jnp.sqrt(1.0 - alpha_bar) * eps


def prediction_target(prediction_type: str, alphas_cumprod: jax.Array, x_data: jax.Array, eps: jax.Array,
                      timesteps: jax.Array) -> jax.Array:
    """What the UNet regresses: eps, v = a eps - s x_data (diffusers' get_velocity) or x_data."""
    alpha_bar = _expand(jnp.asarray(alphas_cumprod, jnp.float32)[timesteps], x_data)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * x_data
    if prediction_type == "sample":
        return x_data
    raise ScheduleError(f"prediction_type {prediction_type!r} is not one of {list(PREDICTION_TYPES)}")


def velocity_from_prediction(prediction_type: str, output: jax.Array, y: jax.Array, t: jax.Array) -> jax.Array:
    """v = x_data_hat - eps_hat in our time from a UNet output at state y, time t."""
    scale = _expand(latent_scale(t), y)
    a, s = _expand(t, y) * scale, (1.0 - _expand(t, y)) * scale
    x = y * scale
    output = output.astype(y.dtype)
    if prediction_type == "epsilon":
        eps = output
        data = (x - s * eps) / a
    elif prediction_type == "v_prediction":
        data, eps = a * x - s * output, s * x + a * output
    elif prediction_type == "sample":
        data = output
        eps = (x - a * data) / s
    else:
        raise ScheduleError(f"prediction_type {prediction_type!r} is not one of {list(PREDICTION_TYPES)}")
    return data - eps
