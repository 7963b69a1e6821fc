"""The report's background level: speckles in the pixels real digits leave blank."""

import ml_collections
import numpy as np

from rectflow_jax import configlib, evaluate, pipeline
from rectflow_jax.data.datasets import get_dataset


def digits(image_size=8):
    return get_dataset(ml_collections.ConfigDict({"name": "digits", "image_size": image_size}))


def test_background_level_separates_real_digits_from_speckles():
    rng = np.random.default_rng(0)
    for size in (8, 16):
        real = digits(size).reference(1797)["x1"]
        mask = evaluate.blank_mask(real)
        # The columns at the edges: 14 pixels at 8x8 (as the issue counts), more once upsampled.
        assert mask.sum() == 14 if size == 8 else mask.sum() > 14
        assert evaluate.background_level(real, mask) < 0.05
        speckled = real + 0.3 * rng.standard_normal(real.shape).astype(np.float32)
        assert 0.5 < evaluate.background_level(speckled, mask) < 2.0
        # Clipped to [-1, 1] first, as the grids show them: darker than black is still black.
        assert evaluate.background_level(np.minimum(real, -1.0) - 5.0, mask) == 0.0


class PixelClassifier:
    """Stands in for evaluate.FeatureClassifier, whose fit takes half a minute on 2 cores."""

    def __init__(self, images, labels):
        self.num_classes = 10

    def features(self, images):
        return np.asarray(images, np.float64).reshape(len(images), -1)

    def probabilities(self, images):
        return np.full((len(images), 10), 0.1)


def test_report_table_has_the_background_column_and_the_real_value(monkeypatch):
    monkeypatch.setattr(evaluate, "FeatureClassifier", PixelClassifier)
    monkeypatch.setattr(evaluate, "_CLASSIFIERS", {})
    dataset = digits()
    real = evaluate.real_data_metrics(dataset)
    assert 0.01 < real["background_level"] < 0.05  # 0.0245 in sklearn's digits
    noisy = np.random.default_rng(1).standard_normal((200, 8, 8, 1)).astype(np.float32)
    row = evaluate.distance_to_data(dataset, noisy)
    assert row["background_level"] > 5.0  # clip(N(0, 1)) is mid-grey on average
    row.update(transport_cost=1.0, gap_to_finest=0.0)
    results = {name: {"straightness": 0.0, "steps": {"1": row}} for _, name in pipeline.REPORT_STAGES}
    config = configlib.base_config()
    text = pipeline._report_markdown(config, results, "frechet_distance", {}, [], real)
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    column = header.index("background_level")
    cells = lambda line: [cell.strip() for cell in line.strip("|").split("|")]
    assert cells(table[2])[0] == "real data" and cells(table[2])[column] == f"{real['background_level']:.3f}"
    assert cells(table[3])[:2] == ["1-RF", "1"] and cells(table[3])[column] == f"{row['background_level']:.3f}"
    assert evaluate.real_data_metrics(get_dataset(ml_collections.ConfigDict({"name": "moons"}))) == {}
