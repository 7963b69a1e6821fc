import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rectflow_jax import flow


def test_interpolant_endpoints_and_velocity():
    x0, x1 = jnp.full((3, 2), -1.0), jnp.full((3, 2), 3.0)
    np.testing.assert_allclose(flow.interpolate(x0, x1, jnp.zeros(3)), x0)
    np.testing.assert_allclose(flow.interpolate(x0, x1, jnp.ones(3)), x1)
    np.testing.assert_allclose(flow.interpolate(x0, x1, jnp.full(3, 0.25)), jnp.full((3, 2), 0.0))
    np.testing.assert_allclose(flow.target_velocity(x0, x1), jnp.full((3, 2), 4.0))


def test_interpolant_broadcasts_time_over_images():
    x0, x1 = jnp.zeros((2, 4, 4, 1)), jnp.ones((2, 4, 4, 1))
    xt = flow.interpolate(x0, x1, jnp.array([0.1, 0.7]))
    np.testing.assert_allclose(xt[:, 0, 0, 0], [0.1, 0.7], rtol=1e-6)


def test_time_samplers_ranges_and_shapes():
    key = jax.random.key(0)
    u = flow.time_sampler("uniform", eps=0.1)(key, 20000)
    assert float(u.min()) >= 0.1 and float(u.max()) <= 1.0
    ln = flow.time_sampler("logit_normal")(key, 20000)
    assert 0 < float(ln.min()) and float(ln.max()) < 1 and abs(float(ln.mean()) - 0.5) < 0.01
    us = flow.time_sampler("u_shaped", a=4.0)(key, 20000)
    assert 0 <= float(us.min()) and float(us.max()) <= 1
    ends = float(jnp.mean((us < 0.1) | (us > 0.9)))
    middle = float(jnp.mean(jnp.abs(us - 0.5) < 0.1))
    assert ends > 2 * middle  # U-shaped: more mass near both ends than in the middle
    with pytest.raises(ValueError, match="unknown time sampler"):
        flow.time_sampler("cosine")


def test_u_shaped_matches_its_density():
    us = np.asarray(flow.u_shaped_time(jax.random.key(1), 200000, a=4.0))
    hist, edges = np.histogram(us, bins=10, range=(0, 1), density=True)
    centres = (edges[:-1] + edges[1:]) / 2
    density = 4.0 * np.cosh(4.0 * (centres - 0.5)) / (2 * np.sinh(2.0))
    np.testing.assert_allclose(hist, density, rtol=0.05)


def test_losses():
    pred, target = jnp.zeros((2, 3)), jnp.array([[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    np.testing.assert_allclose(flow.l2_loss(pred, target), [1.0, 4.0 / 3.0], rtol=1e-6)
    huber = flow.pseudo_huber_loss(pred, target, c=0.5)
    np.testing.assert_allclose(huber, [np.sqrt(3 + 0.25) - 0.5, np.sqrt(4 + 0.25) - 0.5], rtol=1e-6)
    assert float(flow.pseudo_huber_loss(target, target)[0]) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="unknown loss"):
        flow.loss_fn("lpips")


def test_straightness_zero_for_straight_paths_positive_for_curved():
    times = jnp.linspace(0, 1, 11)
    x0, x1 = jnp.zeros((4, 2)), jnp.ones((4, 2))
    straight = times[:, None, None] * x1 + (1 - times[:, None, None]) * x0
    velocities = jnp.broadcast_to(x1 - x0, (10, 4, 2))
    assert float(flow.straightness(straight, times, velocities)) == pytest.approx(0.0, abs=1e-10)
    # Same endpoints, but the first half goes right and the second half up.
    bent = jnp.where(jnp.arange(10)[:, None, None] < 5, jnp.array([2.0, 0.0]), jnp.array([0.0, 2.0]))
    bent = jnp.broadcast_to(bent, (10, 4, 2))
    path = jnp.concatenate([x0[None], x0[None] + jnp.cumsum(bent * 0.1, axis=0)])
    np.testing.assert_allclose(path[-1], x1, atol=1e-6)
    assert float(flow.straightness(path, times, bent)) == pytest.approx(2.0, rel=1e-5)


def test_transport_cost():
    x0, x1 = jnp.zeros((2, 2, 2, 1)), jnp.ones((2, 2, 2, 1))
    assert float(flow.transport_cost(x0, x1)) == pytest.approx(4.0)
