"""Data: embedded and tfds datasets (datasets.py); pair/triplet shards live beside them."""

from rectflow_jax.data.datasets import DATASETS, Dataset, get_dataset

__all__ = ["DATASETS", "Dataset", "get_dataset"]
