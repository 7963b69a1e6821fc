import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

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


def _u_shaped_cdf(t, a):
    # The integral of the density a cosh(a (s - 1/2)) / (2 sinh(a / 2)) from 0 to t.
    return (np.sinh(a * (t - 0.5)) + np.sinh(a / 2)) / (2 * np.sinh(a / 2))


def _logit_normal_cdf(t, mean, std):
    return stats.norm.cdf((np.log(t) - np.log1p(-t) - mean) / std)


SAMPLER_CASES = [
    ("uniform", {"eps": 1e-3}, lambda t: stats.uniform.cdf(t, 1e-3, 1 - 1e-3)),
    ("uniform", {"eps": 0.2}, lambda t: stats.uniform.cdf(t, 0.2, 0.8)),
    ("logit_normal", {"mean": 0.0, "std": 1.0}, lambda t: _logit_normal_cdf(t, 0.0, 1.0)),
    ("logit_normal", {"mean": 0.7, "std": 0.4}, lambda t: _logit_normal_cdf(t, 0.7, 0.4)),
    ("u_shaped", {"a": 4.0}, lambda t: _u_shaped_cdf(t, 4.0)),
    ("u_shaped", {"a": 1.5}, lambda t: _u_shaped_cdf(t, 1.5)),
]


@pytest.mark.parametrize("name, args, cdf", SAMPLER_CASES,
                         ids=[f"{n}-" + "-".join(f"{k}={v}" for k, v in a.items()) for n, a, _ in SAMPLER_CASES])
def test_time_sampler_follows_its_distribution(name, args, cdf):
    """Kolmogorov-Smirnov against the sampler's CDF; the first case's CDF rejects the other arguments."""
    t = np.asarray(flow.time_sampler(name, **args)(jax.random.key(0), 20000), np.float64)
    assert t.shape == (20000,)
    assert stats.kstest(t, cdf).pvalue > 1e-3
    default_cdf = next(c for n, _, c in SAMPLER_CASES if n == name)
    if default_cdf is not cdf:  # the test can see a sampler that ignores its arguments
        assert stats.kstest(t, default_cdf).pvalue < 1e-6


def test_time_sampler_takes_exactly_its_own_arguments():
    with pytest.raises(ValueError, match="unknown time sampler"):
        flow.time_sampler("cosine")
    with pytest.raises(ValueError, match=r"'u_shaped' takes the arguments \['a'\]; unknown: \['eps'\]"):
        flow.time_sampler("u_shaped", a=4.0, eps=1e-3)
    with pytest.raises(ValueError, match=r"'logit_normal' takes .* missing: \['std'\]"):
        flow.time_sampler("logit_normal", mean=0.0)
    assert flow.time_sampler_arg_names("logit_normal") == ("mean", "std")


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
