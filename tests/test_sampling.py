"""Samplers against dx/dt = a x (x(1) = x0 e^a) and a time-dependent field with known solution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rectflow_jax import sampling

A = 1.3


def linear_field(x, t):
    return A * x


def test_euler_and_heun_converge_at_their_orders():
    x0 = jnp.array([[1.0, -2.0]])
    exact = np.asarray(x0) * np.exp(A)
    errors = {}
    for method in ("euler", "heun"):
        errors[method] = [float(np.abs(sampling.integrate(linear_field, x0, n, method=method).x1 - exact).max())
                          for n in (20, 40)]
    assert 1.8 < errors["euler"][0] / errors["euler"][1] < 2.2       # first order
    assert 3.6 < errors["heun"][0] / errors["heun"][1] < 4.4         # second order
    assert errors["heun"][1] < 5e-3 < errors["euler"][1]


def test_time_dependent_field_on_custom_grid():
    # dx/dt = 2t  ->  x(1) = x0 + 1; Heun is exact for a velocity linear in t.
    field = lambda x, t: jnp.broadcast_to(2 * t[:, None], x.shape)
    grid = jnp.array([0.0, 0.1, 0.5, 0.55, 1.0])
    sol = sampling.integrate(field, jnp.zeros((3, 1)), method="heun", times=grid, return_trajectory=True)
    np.testing.assert_allclose(sol.x1, 1.0, rtol=1e-6)
    assert sol.trajectory.shape == (5, 3, 1) and sol.velocities.shape == (4, 3, 1)
    np.testing.assert_allclose(sol.trajectory[:, 0, 0], grid ** 2, atol=1e-6)


def test_one_step_is_one_euler_step():
    x0 = jax.random.normal(jax.random.key(0), (5, 2))
    np.testing.assert_allclose(sampling.one_step(linear_field, x0), sampling.integrate(linear_field, x0, 1).x1)
    np.testing.assert_allclose(sampling.one_step(linear_field, x0), x0 * (1 + A), rtol=1e-6)


def test_make_sampler_compiles_once_per_shape_and_uses_params():
    traces = []

    def apply(params, x, t, labels):
        traces.append(1)
        return params["a"] * x

    sampler = sampling.make_sampler(apply, 50, method="euler")
    x0 = jnp.ones((4, 2))
    out1 = sampler({"a": jnp.float32(A)}, x0)
    out2 = sampler({"a": jnp.float32(0.0)}, x0)
    assert len(traces) == 1  # lax.scan: one trace of the body, one compilation
    np.testing.assert_allclose(out1.x1, np.exp(A) * np.ones((4, 2)), rtol=2e-2)
    np.testing.assert_allclose(out2.x1, x0)


def test_classifier_free_guidance_extrapolates():
    guided = sampling.classifier_free_guidance(lambda x, t: x + 1.0, lambda x, t: x, scale=3.0)
    np.testing.assert_allclose(guided(jnp.zeros((1, 2)), jnp.zeros(1)), 3.0)


def test_bad_arguments():
    # SamplerError: the CLI reports it in one line, as bad input rather than a bug.
    with pytest.raises(sampling.SamplerError, match=r"unknown sampler method .rk45.; choose one of ddim, dpm_solver\+\+, euler, heun"):
        sampling.integrate(linear_field, jnp.ones((1, 1)), 4, method="rk45")
    with pytest.raises(sampling.SamplerError, match="num_steps"):
        sampling.integrate(linear_field, jnp.ones((1, 1)), 0)


def test_implicit_euler_backwards_undoes_forward_euler():
    """Run backwards with fixed-point implicit steps, the grid's forward Euler lands back on the start;
    explicit steps backwards do not (the inversion `refine` relies on this)."""
    field = lambda x, t: jnp.sin(x) * (1.0 + t[:, None])  # smooth, Lipschitz 2: converges for h = 1/8
    x1 = jax.random.normal(jax.random.key(0), (4, 3))
    times = sampling.uniform_grid(8)
    back = lambda iterations: sampling.integrate(field, x1, method="euler", times=times[::-1],
                                                 implicit_iterations=iterations).x1
    forward = lambda x0: sampling.integrate(field, x0, method="euler", times=times).x1
    implicit_error = float(jnp.abs(forward(back(40)) - x1).max())
    explicit_error = float(jnp.abs(forward(back(0)) - x1).max())
    assert implicit_error < 1e-5 < 1e-2 < explicit_error, (implicit_error, explicit_error)
    with pytest.raises(sampling.SamplerError, match="implicit"):
        sampling.integrate(field, x1, method="heun", times=times, implicit_iterations=2)
