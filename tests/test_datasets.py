"""Data sources: shapes, ranges, statistics, and exact resumption of batch streams."""

import itertools

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from rectflow_jax.data.datasets import get_dataset


def dataset(**config):
    return get_dataset(ml_collections.ConfigDict(config))


def nth_batch(ds, batch_size, seed, n, **kwargs):
    return next(itertools.islice(ds.batches(batch_size, seed, **kwargs), n, None))


def assert_same(a, b):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_2gmm_modes_of_source_and_data():
    ds = dataset(name="2gmm")
    assert ds.shape == (2,) and ds.num_classes == 0
    x1 = next(ds.batches(4000, seed=0))["x1"]
    x0 = np.asarray(jax.jit(ds.sample_source, static_argnums=1)(jax.random.key(0), 4000))
    for samples, x_centre in ((x1, 5.0), (x0, -5.0)):
        assert samples.dtype == np.float32 and samples.shape == (4000, 2)
        for y_centre in (-5.0, 5.0):
            mode = samples[np.sign(samples[:, 1]) == np.sign(y_centre)]
            assert abs(len(mode) / 4000 - 0.5) < 0.05
            np.testing.assert_allclose(mode.mean(0), [x_centre, y_centre], atol=0.05)
            np.testing.assert_allclose(mode.std(0), [0.5, 0.5], atol=0.05)
    np.testing.assert_array_equal(ds.sample_source(jax.random.key(3), 5), ds.sample_source(jax.random.key(3), 5))


def test_moons_and_8gaussians():
    moons = dataset(name="moons").reference(4000)["x1"]
    assert moons.shape == (4000, 2) and np.abs(moons.mean(0)).max() < 0.15
    assert np.abs(moons).max(0)[0] < 3.6 and np.abs(moons).max(0)[1] < 2.0
    gaussians = dataset(name="8gaussians", radius=4.0, std=0.5)
    x1 = gaussians.reference(4000)["x1"]
    assert abs(np.linalg.norm(x1, axis=1).mean() - 4.0) < 0.1
    assert len(np.unique(np.round(np.arctan2(x1[:, 1], x1[:, 0]) / (np.pi / 4)) % 8)) == 8
    x0 = np.asarray(gaussians.sample_source(jax.random.key(0), 4000))
    assert abs(x0.mean()) < 0.05 and abs(x0.std() - 1.0) < 0.05


@pytest.mark.parametrize("config", [dict(name="2gmm"), dict(name="moons"),
                                    dict(name="digits", class_conditional=True)])
def test_batches_resume_exactly(config):
    ds = dataset(**config)
    stream = list(itertools.islice(ds.batches(64, seed=7), 40))
    for k in (0, 3, 28, 39):  # 28 x 64 crosses a digits epoch boundary (1797 examples)
        assert_same(next(ds.batches(64, seed=7, start_step=k)), stream[k])
    assert not np.array_equal(stream[0]["x1"], next(ds.batches(64, seed=8))["x1"])
    assert not np.array_equal(stream[0]["x1"], stream[1]["x1"])


def test_digits_images_match_their_labels():
    digits = load_digits()
    by_image = {(img / 8.0 - 1.0).astype(np.float32).tobytes(): int(y) for img, y in zip(digits.images, digits.target)}
    ds = dataset(name="digits", class_conditional=True)
    assert ds.shape == (8, 8, 1) and ds.num_classes == 10
    epoch = next(ds.batches(len(digits.images), seed=0))  # one batch = one full epoch
    assert epoch["x1"].dtype == np.float32 and epoch["label"].dtype == np.int32
    assert epoch["x1"].min() == -1.0 and epoch["x1"].max() == 1.0
    assert [by_image[img[..., 0].tobytes()] for img in epoch["x1"]] == epoch["label"].tolist()
    # A permutation of the whole set: every label as often as in sklearn's data.
    np.testing.assert_array_equal(np.bincount(epoch["label"]), np.bincount(digits.target))
    reference = ds.reference(100, seed=1)
    assert reference["x1"].shape == (100, 8, 8, 1) and reference["label"].shape == (100,)
    with pytest.raises(ValueError, match="1797"):
        ds.reference(5000)


def test_digits_upsampled_and_unconditional():
    ds = dataset(name="digits", image_size=16)
    assert ds.shape == (16, 16, 1) and ds.num_classes == 0
    batch = nth_batch(ds, 32, seed=0, n=2)
    assert set(batch) == {"x1"} and batch["x1"].shape == (32, 16, 16, 1)
    assert -1.0 <= batch["x1"].min() and batch["x1"].max() <= 1.0
    assert set(ds.reference(10)) == {"x1", "label"}  # evaluators classify with the labels
    assert ds.sample_source(jax.random.key(0), 3).shape == (3, 16, 16, 1)


def test_shards_split_one_global_stream():
    ds = dataset(name="digits", class_conditional=True)
    whole = nth_batch(ds, 64, seed=1, n=30)
    parts = [nth_batch(ds, 32, seed=1, n=30, shard=(i, 2)) for i in range(2)]
    assert_same(whole, {k: np.concatenate([p[k] for p in parts]) for k in whole})
    toys = dataset(name="2gmm")
    assert not np.array_equal(next(toys.batches(8, 0, shard=(0, 2)))["x1"], next(toys.batches(8, 0, shard=(1, 2)))["x1"])


@pytest.mark.parametrize("config, message", [
    (dict(name="mnist"), "valid names"),
    (dict(name="digits", imag_size=16), "imag_size"),
    (dict(name="2gmm", std=1.0), "std"),
])
def test_bad_configs_are_rejected(config, message):
    with pytest.raises(ValueError, match=message):
        dataset(**config)


def test_cifar10_through_mock_tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=20):  # random images; 20 per split
        ds = dataset(name="cifar10", class_conditional=True)
        assert ds.shape == (32, 32, 3) and ds.num_classes == 10
        stream = list(itertools.islice(ds.batches(8, seed=3), 6))  # batches cross epochs of 20
        batch = stream[0]
        assert batch["x1"].shape == (8, 32, 32, 3) and batch["x1"].dtype == np.float32
        assert -1.0 <= batch["x1"].min() < -0.9 and 0.9 < batch["x1"].max() <= 1.0
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
        for k in (2, 5):  # start_step lands mid-epoch and in a later epoch
            assert_same(next(ds.batches(8, seed=3, start_step=k)), stream[k])
        assert not np.array_equal(next(ds.batches(8, seed=4))["x1"], batch["x1"])

        # Flips change pixels, never the order: each image is the plain one or its mirror.
        unconditional = dataset(name="cifar10", random_flip=False)
        plain = next(unconditional.batches(8, seed=3))
        assert "label" not in plain and "label" in unconditional.reference(4)
        mirrored = [np.array_equal(f, p[:, ::-1]) for f, p in zip(batch["x1"], plain["x1"])]
        assert all(m or np.array_equal(f, p) for m, f, p in zip(mirrored, batch["x1"], plain["x1"]))
        assert any(mirrored)

        reference = ds.reference(10, seed=0)
        assert reference["x1"].shape == (10, 32, 32, 3) and reference["label"].shape == (10,)
        assert_same(reference, ds.reference(10, seed=0))


def test_source_spec_tells_sources_apart():
    """Pairs and teachers compare these: equal text, equal pi0."""
    spec = lambda **config: dataset(**config).source_spec
    assert spec(name="moons") == spec(name="8gaussians") == "standard normal of shape (2,)"
    assert spec(name="2gmm") != spec(name="moons") and "-5.0" in spec(name="2gmm")
    assert spec(name="digits") != spec(name="digits", image_size=16)
    assert spec(name="digits") == spec(name="digits", class_conditional=True)


@pytest.mark.parametrize("name", ["2gmm", "digits_text"])
def test_the_global_batch_of_a_step_does_not_depend_on_the_process_count(name):
    """Processes joined give the single process's batch: a run on 2 hosts trains on the same data."""
    config = {"name": name} if name == "2gmm" else {"name": name, "image_size": 8}
    data = get_dataset(config)
    for step in (0, 7):
        whole = next(data.batches(12, 3, step))
        for count in (2, 3, 4):
            parts = [next(data.batches(12 // count, 3, step, shard=(i, count))) for i in range(count)]
            for key in whole:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key], err_msg=key)
