"""Every shipped config loads, builds its data and model, and merges its stage overrides."""

from pathlib import Path

import jax
import pytest
import tensorflow_datasets as tfds

from rectflow_jax import configlib, models, train
from rectflow_jax.data import datasets

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path):
    config = configlib.load_config(path)
    assert "rectflow pipeline --config configs/" in path.read_text()  # the docstring gives the command
    for kind in configlib.STAGE_KINDS:
        stage = configlib.stage_config(config, kind)
        assert stage.train.num_steps > 0
    with tfds.testing.mock_data(num_examples=8):
        dataset = datasets.get_dataset(config.data)
        batch = next(dataset.batches(4, seed=0))
    assert batch["x1"].shape == (4, *dataset.shape)
    model = models.build_velocity_model(config.model, dataset.shape, dataset.num_classes)
    params = train.abstract_params(model, dataset.shape, dataset.num_classes)
    assert sum(p.size for p in jax.tree_util.tree_leaves(params)) > 1000


def test_cifar10_mirrors_the_official_recipe():
    config = configlib.load_config(Path(__file__).resolve().parents[1] / "configs" / "cifar10.py")
    model = models.build_velocity_model(config.model, (32, 32, 3), 0)
    n = sum(p.size for p in jax.tree_util.tree_leaves(train.abstract_params(model, (32, 32, 3), 0)))
    assert 55e6 < n < 70e6, n  # DDPM++ (deep-ish, nf 128) is about 62M parameters
    assert (config.optim.lr, config.optim.warmup_steps, config.optim.grad_clip, config.train.batch_size) == \
        (2e-4, 5000, 1.0, 128)


def test_stage_overrides_must_name_real_keys():
    config = configlib.base_config()
    config.stages.reflow.optim = dict(lrr=1.0)
    with pytest.raises(ValueError, match="stages.reflow.optim.lrr names no key"):
        configlib.stage_config(config, "reflow")
    config.stages.reflow.optim = dict(lr=1.0)
    assert configlib.stage_config(config, "reflow").optim.lr == 1.0
    assert configlib.stage_config(config, "rf").optim.lr == config.optim.lr
