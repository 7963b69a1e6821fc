"""Metrics for a stage: distance to the data, straightness, transport cost.

Evaluators are chosen by the data's kind: 2-D data uses the energy distance; images
use a Frechet distance in the features of a small classifier trained on the real
data (for digits, sklearn's bundled 1797 images), with the classifier's confidence
and class coverage on the generated samples, and the background level: the mean grey
level, on the digits' 0..16 scale, of the pixels that are blank in >= 95% of the real
images (speckles a classifier can ignore; real digits: about 0.02).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rectflow_jax import batch_runner, flow, sampling


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (V-statistic; zero iff equal laws)."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    mean_dist = lambda a, b: jnp.mean(jnp.sqrt(jnp.maximum(
        jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None] - 2 * a @ b.T, 0.0)))
    return float(2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features in float64, as pytorch-fid's statistics (np.cov, N - 1)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise ValueError(f"Gaussian statistics need (N, D) features; got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance_from_statistics(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray,
                                     sigma_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two Gaussians, in float64.

    Tr (S_a S_b)^1/2 = Tr (S_a^1/2 S_b S_a^1/2)^1/2: the square root of a symmetric PSD
    matrix, from eigenvalues. It stays exact when covariances are singular (dead features,
    fewer samples than dimensions), where pytorch-fid's scipy.linalg.sqrtm(S_a S_b) of the
    non-symmetric product loses accuracy and falls back to adding 1e-6 to the diagonals;
    where that product is well-conditioned both agree to rounding (tests/test_inception.py).
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64).reshape(-1), np.asarray(mu_b, np.float64).reshape(-1)
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    dim = len(mu_a)
    if mu_b.shape != (dim,) or sigma_a.shape != (dim, dim) or sigma_b.shape != (dim, dim):
        raise ValueError(f"statistics of different dimensions: means {mu_a.shape}, {mu_b.shape}, covariances "
                         f"{sigma_a.shape}, {sigma_b.shape}")
    root_a = _psd_sqrt(sigma_a)
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sigma_b @ root_a), 0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * cross)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two (N, D) feature sets (see frechet_distance_from_statistics)."""
    return frechet_distance_from_statistics(*gaussian_statistics(feats_a), *gaussian_statistics(feats_b))


class FeatureClassifier:
    """A small MLP classifier fit on real images; its hidden layer gives the features."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self.num_classes = int(labels.max()) + 1
        self.net = MLPClassifier(hidden_layer_sizes=(128,), max_iter=400, random_state=seed)
        self.net.fit(images.reshape(len(images), -1), labels)

    def features(self, images: np.ndarray) -> np.ndarray:
        flat = np.asarray(images, np.float64).reshape(len(images), -1)
        return np.maximum(flat @ self.net.coefs_[0] + self.net.intercepts_[0], 0.0)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.net.predict_proba(np.asarray(images).reshape(len(images), -1))


BLANK_SHARE = 0.95  # a pixel is background when blank in this share of the real images


def grey_levels(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (clipped first, as they are shown) on the digits' 0..16 scale."""
    return (np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 8.0


def blank_mask(images: np.ndarray) -> np.ndarray:
    """(H, W, C) bool: pixels below half a grey level in >= BLANK_SHARE of `images`."""
    return np.mean(grey_levels(images) < 0.5, axis=0) >= BLANK_SHARE


def background_level(images: np.ndarray, mask: np.ndarray) -> float:
    """Mean grey level (0..16) of `images` over the background pixels `mask`."""
    return float(grey_levels(images)[:, mask].mean())


class _Background(NamedTuple):
    mask: np.ndarray | None   # blank_mask of the real images; None when no pixel is blank
    real_level: float | None  # the real images' own background level


_CLASSIFIERS: dict[tuple, tuple[FeatureClassifier, np.ndarray]] = {}
_BACKGROUNDS: dict[tuple, _Background] = {}


def classifier_for(dataset) -> tuple[FeatureClassifier, np.ndarray]:
    """The feature classifier of a dataset and its real features, fit once per process."""
    key = (dataset.name, tuple(dataset.shape))
    if key not in _CLASSIFIERS:
        real = dataset.reference(dataset_size(dataset))
        classifier = FeatureClassifier(real["x1"], real["label"])
        _CLASSIFIERS[key] = classifier, classifier.features(real["x1"])
    return _CLASSIFIERS[key]


def _background_for(dataset) -> _Background:
    """The background pixels of an image dataset, from its own real images, once per process."""
    key = (dataset.name, tuple(dataset.shape))
    if key not in _BACKGROUNDS:
        real = dataset.reference(dataset_size(dataset))["x1"]
        mask = blank_mask(real)
        _BACKGROUNDS[key] = _Background(mask, background_level(real, mask)) if mask.any() else _Background(None, None)
    return _BACKGROUNDS[key]


def real_data_metrics(dataset) -> dict[str, float]:
    """The real images' own values of the metrics that have one (the background level)."""
    if len(dataset.shape) == 1:
        return {}
    level = _background_for(dataset).real_level
    return {} if level is None else {"background_level": level}


def dataset_size(dataset) -> int:
    return len(dataset.images) if hasattr(dataset, "images") else 10_000


def distance_to_data(dataset, samples: np.ndarray) -> dict[str, float]:
    """The data-kind's distance of `samples` to the dataset, plus diagnostics."""
    samples = np.asarray(samples, np.float32)
    if len(dataset.shape) == 1:
        reference = dataset.reference(len(samples), seed=12345)["x1"]
        return {"energy_distance": energy_distance(samples, reference)}
    classifier, real_features = classifier_for(dataset)
    probs = classifier.probabilities(samples)
    share = np.bincount(probs.argmax(1), minlength=classifier.num_classes) / len(samples)
    row = {
        "frechet_distance": frechet_distance(classifier.features(samples), real_features),
        "confidence": float(probs.max(1).mean()),
        # A class counts as covered when it gets at least half its uniform share.
        "class_coverage": float(np.mean(share >= 0.5 / classifier.num_classes)),
    }
    background = _background_for(dataset)
    if background.mask is not None:
        row["background_level"] = background_level(samples, background.mask)
    return row


def primary_metric(dataset) -> str:
    return "energy_distance" if len(dataset.shape) == 1 else "frechet_distance"


def evaluate_velocity(apply_velocity: Callable, params: Any, dataset, x0: np.ndarray,
                      cond: dict[str, np.ndarray] | None, steps=(1, 2, 4, 100), method: str = "euler",
                      batch_size: int = 1000, mesh: Mesh | None = None, num_paths: int = 500) -> dict[str, Any]:
    """Metrics of one stage at each Euler step count, all from the same x0.

    Straightness is measured along the finest trajectory; for vector data its first
    `num_paths` paths (steps + 1, paths, D) are returned for plotting ('trajectory'; None
    for images, which are not drawn so). `gap_to_finest` is E||x1(N steps) - x1(finest)||^2:
    how much the flow loses with few steps. The solves run through batch_runner over
    `mesh` (default: every device of every process): every process calls this alike, with
    the same x0, solves its block of the rows and gets the same metrics of all of them.
    """
    finest = max(steps)
    mesh = mesh or batch_runner.default_mesh()
    params = batch_runner.place(params, mesh)  # once for every step count
    keep_paths = np.ndim(x0) == 2

    def solve(params, x0, cond, num_steps):
        sol = sampling.integrate(lambda x, t: apply_velocity(params, x, t, cond), x0, num_steps, method=method,
                                 return_trajectory=num_steps == finest)
        if sol.trajectory is None:
            return sol.x1
        # Per row, so that padding rows drop out of the mean; trajectories rows first, as the runner wants.
        per_row = jax.vmap(lambda path, v: flow.straightness(path[:, None], sol.times, v[:, None]),
                           in_axes=(1, 1))(sol.trajectory, sol.velocities)
        return sol.x1, per_row, (jnp.swapaxes(sol.trajectory, 0, 1) if keep_paths else None)

    outputs, straightness, paths = {}, None, None
    for num_steps in sorted(steps):
        runner = batch_runner.BatchRunner(functools.partial(solve, num_steps=num_steps), batch_size, mesh=mesh)
        result = runner.full(params, x0, cond)
        if num_steps == finest:
            result, per_row, trajectory = result
            straightness = float(np.mean(per_row))
            paths = None if trajectory is None else np.swapaxes(trajectory[:num_paths], 0, 1)
        outputs[num_steps] = result
    results = {}
    for num_steps, x1 in outputs.items():
        row = distance_to_data(dataset, x1)
        row["transport_cost"] = float(flow.transport_cost(jnp.asarray(x0), jnp.asarray(x1)))
        row["gap_to_finest"] = float(np.mean(np.sum((x1 - outputs[finest]).reshape(len(x1), -1) ** 2, 1)))
        results[str(num_steps)] = row
    return {"straightness": straightness, "steps": results, "outputs": outputs, "trajectory": paths}
