"""Data sources: the source distribution pi0 and data batches from pi1.

Every dataset is a `Dataset` made by `get_dataset(config.data)`:
  - `sample_source(key, n)`: n draws from pi0, pure JAX (jit-able, deterministic in key).
  - `source_spec`: a description of pi0; equal strings mean equal distributions, so a
    teacher's stored data config tells whether its source is this config's.
  - `batches(batch_size, seed, start_step=0, shard=(0, 1))`: an infinite iterator of
    {'x1': float32 (B, *shape), 'label': int32 (B,) when num_classes > 0}. Batch k depends
    only on (seed, k, shard), so `batches(B, seed, start_step=k)` resumes a run exactly.
    `shard=(index, count)`: this process's disjoint share when several processes each
    load their own part of a global batch (`count` shards of `batch_size` each): rows
    [index * batch_size, (index + 1) * batch_size) of the step's global batch, which the
    toys and array data (digits, digits_text) make alike for any count. TFDS data splits
    its examples by process instead (tfds.even_splits), so its order depends on the count.
  - `reference(n, seed=0)`: n real samples for evaluation: {'x1', and 'label' whenever
    the data has labels, conditional or not (evaluators classify samples with them)}.

Datasets (config keys besides `name`, defaults in brackets):
  '2gmm'       pi0 = 1/2 N((-5,-5), 0.25 I) + 1/2 N((-5,5), 0.25 I) (the source is this
               mixture, not a Gaussian); pi1 = the same with centres (5,-5), (5,5).
  'moons'      pi0 = N(0, I_2); pi1 = two interleaved half circles (as sklearn's
               make_moons) with Gaussian `noise` [0.05], centred and scaled by 2, so
               x spans about [-3, 3] and y about [-1.5, 1.5].
  '8gaussians' pi0 = N(0, I_2); pi1 = 8 equal modes on a circle of `radius` [4.0], each
               with std `std` [0.5].
  'digits'     sklearn's 1797 real 8x8 digits, values 0..16 mapped to [-1, 1], shape
               (S, S, 1) with `image_size` S [8] (bilinear upsampling from 8);
               `class_conditional` [False] gives labels 0..9; pi0 = N(0, I).
               Batches walk a fresh seeded permutation each epoch.
  'digits_text' the same digits with prompts instead of labels: each batch example gets
               'prompt', one of `templates` [digit_prompts.TRAIN_TEMPLATES] drawn for its
               class; `held_out_templates` [digit_prompts.HELD_OUT_TEMPLATES] are never
               trained on (evaluation only); `image_size` [8]. num_classes is 0: the
               condition is the text.
  'cifar10'    tensorflow_datasets 'cifar10' through tf.data: `split` ['train'],
               `reference_split` ['test'], `data_dir` [None], `random_flip` [True],
               `class_conditional` [False], `shuffle_buffer` [50000]; pi0 = N(0, I).
               Each epoch is reshuffled with a seed derived from (seed, epoch), so a
               resume skips to its epoch directly and reads at most one epoch to get there.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import inspect
import json
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rectflow_jax.configlib import ConfigError
from rectflow_jax.data import digit_prompts

Batch = dict[str, np.ndarray]
_TRAIN_STREAM, _REFERENCE_STREAM, _PROMPT_STREAM = 0, 1, 2  # keeps reference draws apart from training batches


@dataclasses.dataclass(frozen=True)
class Dataset(abc.ABC):
    name: str
    shape: tuple[int, ...]  # one sample: (2,) or (H, W, C)
    num_classes: int  # 0 = unconditional

    def sample_source(self, key: jax.Array, n: int) -> jax.Array:
        """n draws from pi0; a standard Gaussian unless a dataset says otherwise."""
        return jax.random.normal(key, (n, *self.shape), jnp.float32)

    @property
    def source_spec(self) -> str:
        """pi0 in words; a dataset that overrides `sample_source` overrides this too."""
        return f"standard normal of shape {tuple(self.shape)}"

    @abc.abstractmethod
    def batches(self, batch_size: int, seed: int, start_step: int = 0,
                shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        """Endless training batches from step `start_step` on (see the module docstring)."""

    @abc.abstractmethod
    def reference(self, n: int, seed: int = 0) -> Batch:
        """n real samples for evaluation, deterministic in `seed`."""


# ------------------------------------------------------------------------------- toys


@dataclasses.dataclass(frozen=True)
class ToyDataset(Dataset):
    """Fresh samples for every batch from an analytic numpy sampler of pi1."""

    sample_data: Callable[[np.random.Generator, int], np.ndarray] = dataclasses.field(repr=False)
    source: Callable[[jax.Array, int], jax.Array] | None = dataclasses.field(default=None, repr=False)
    source_description: str = ""  # what `source` draws, when it is set

    def sample_source(self, key: jax.Array, n: int) -> jax.Array:
        return super().sample_source(key, n) if self.source is None else self.source(key, n)

    @property
    def source_spec(self) -> str:
        return super().source_spec if self.source is None else self.source_description

    def batches(self, batch_size: int, seed: int, start_step: int = 0,
                shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        index, count = _check_shard(shard)
        step = start_step
        while True:
            # The global batch of the step, of which this process keeps its rows: the data a
            # step sees does not depend on the number of processes.
            rng = np.random.default_rng((seed, _TRAIN_STREAM, step))
            rows = self.sample_data(rng, batch_size * count)[index * batch_size:(index + 1) * batch_size]
            yield {"x1": rows.astype(np.float32)}
            step += 1

    def reference(self, n: int, seed: int = 0) -> Batch:
        rng = np.random.default_rng((seed, _REFERENCE_STREAM, 0))
        return {"x1": self.sample_data(rng, n).astype(np.float32)}


def _mixture_numpy(centres: np.ndarray, std: float) -> Callable[[np.random.Generator, int], np.ndarray]:
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        modes = rng.integers(len(centres), size=n)
        return centres[modes] + std * rng.standard_normal((n, centres.shape[1]))
    return sample


def _mixture_spec(centres: np.ndarray, std: float) -> str:
    return f"equal mixture of N(c, {std}^2 I) over c in {np.asarray(centres).tolist()}"


def _mixture_jax(centres: np.ndarray, std: float) -> Callable[[jax.Array, int], jax.Array]:
    def sample(key: jax.Array, n: int) -> jax.Array:
        mode_key, noise_key = jax.random.split(key)
        modes = jax.random.randint(mode_key, (n,), 0, len(centres))
        noise = jax.random.normal(noise_key, (n, centres.shape[1]), jnp.float32)
        return jnp.asarray(centres, jnp.float32)[modes] + std * noise
    return sample


def _moons(noise: float) -> Callable[[np.random.Generator, int], np.ndarray]:
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        angle = rng.uniform(0.0, np.pi, n)
        lower = rng.integers(2, size=n).astype(bool)
        # Upper moon (cos a, sin a); lower moon (1 - cos a, 1/2 - sin a), as make_moons.
        x = np.where(lower, 1.0 - np.cos(angle), np.cos(angle))
        y = np.where(lower, 0.5 - np.sin(angle), np.sin(angle))
        points = np.stack([x, y], axis=1) + noise * rng.standard_normal((n, 2))
        return 2.0 * (points - np.array([0.5, 0.25]))
    return sample


def _two_gmm() -> ToyDataset:
    source = np.array([[-5.0, -5.0], [-5.0, 5.0]])
    data = np.array([[5.0, -5.0], [5.0, 5.0]])
    return ToyDataset("2gmm", (2,), 0, sample_data=_mixture_numpy(data, 0.5),
                      source=_mixture_jax(source, 0.5), source_description=_mixture_spec(source, 0.5))


def _eight_gaussians(radius: float = 4.0, std: float = 0.5) -> ToyDataset:
    angles = 2 * np.pi * np.arange(8) / 8
    centres = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return ToyDataset("8gaussians", (2,), 0, sample_data=_mixture_numpy(centres, std))


def _moons_dataset(noise: float = 0.05) -> ToyDataset:
    return ToyDataset("moons", (2,), 0, sample_data=_moons(noise))


# ---------------------------------------------------------------------- in-memory arrays


@dataclasses.dataclass(frozen=True)
class ArrayDataset(Dataset):
    """A small labelled image set held in memory; batches walk per-epoch permutations."""

    images: np.ndarray = dataclasses.field(repr=False, compare=False)  # (N, *shape) float32 in [-1, 1]
    labels: np.ndarray = dataclasses.field(repr=False, compare=False)  # (N,) int32

    def _take(self, indices: np.ndarray, with_labels: bool) -> Batch:
        batch = {"x1": self.images[indices]}
        if with_labels:
            batch["label"] = self.labels[indices]
        return batch

    def batches(self, batch_size: int, seed: int, start_step: int = 0,
                shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        index, count = _check_shard(shard)
        size = len(self.images)
        step = start_step
        while True:
            # Position of each example in the endless stream of epochs; the shards of one
            # step together cover what a single process with count * batch_size would.
            position = (step * count + index) * batch_size + np.arange(batch_size)
            epochs, offsets = np.divmod(position, size)
            indices = np.empty(batch_size, np.int64)
            for epoch in np.unique(epochs):
                order = np.random.default_rng((seed, _TRAIN_STREAM, int(epoch))).permutation(size)
                indices[epochs == epoch] = order[offsets[epochs == epoch]]
            yield self._training_batch(indices, (seed, step), (index * batch_size, count * batch_size))
            step += 1

    def _training_batch(self, indices: np.ndarray, stream: tuple[int, int], rows: tuple[int, int]) -> Batch:
        """The batch of examples `indices`. `stream` (seed, step) seeds any per-batch draw, made for the
        whole global batch, of which these are rows (offset, global size) = `rows`."""
        return self._take(indices, with_labels=bool(self.num_classes))

    def reference(self, n: int, seed: int = 0) -> Batch:
        if n > len(self.images):
            raise ConfigError(f"{self.name} has only {len(self.images)} examples, asked for {n}")
        rng = np.random.default_rng((seed, _REFERENCE_STREAM, 0))
        return self._take(np.sort(rng.permutation(len(self.images))[:n]), with_labels=True)


def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) weights of bilinear upsampling with half-pixel centres and clamped edges."""
    centres = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    low = np.clip(np.floor(centres), 0, in_size - 1).astype(int)
    frac = np.clip(centres - low, 0.0, 1.0)
    weights = np.zeros((out_size, in_size), np.float32)
    np.add.at(weights, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), np.minimum(low + 1, in_size - 1)), frac)
    return weights


@functools.lru_cache(maxsize=4)
def _digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]  # 0..16 -> [-1, 1]
    if image_size != 8:
        resize = _bilinear_matrix(image_size, 8)
        images = np.einsum("hi,nijc,wj->nhwc", resize, images, resize).clip(-1.0, 1.0)  # rounding
    images.flags.writeable = False  # shared by every Dataset built from the cache
    labels = digits.target.astype(np.int32)
    labels.flags.writeable = False
    return images, labels


def _digits(image_size: int = 8, class_conditional: bool = False) -> ArrayDataset:
    if image_size < 8:
        raise ConfigError(f"digits image_size must be >= 8, got {image_size}")
    images, labels = _digits_arrays(int(image_size))
    return ArrayDataset("digits", images.shape[1:], 10 if class_conditional else 0,
                        images=images, labels=labels)


@dataclasses.dataclass(frozen=True)
class TextDigits(ArrayDataset):
    """The digits, each training example captioned by a template of its class (digit_prompts)."""

    templates: tuple[str, ...] = ()
    held_out_templates: tuple[str, ...] = ()

    def _training_batch(self, indices: np.ndarray, stream: tuple[int, int], rows: tuple[int, int]) -> Batch:
        seed, step = stream
        offset, global_size = rows
        choice = np.random.default_rng((seed, _PROMPT_STREAM, step)).integers(len(self.templates), size=global_size)
        choice = choice[offset:offset + len(indices)]
        texts = [digit_prompts.prompt(self.templates[c], int(self.labels[i])) for c, i in zip(choice, indices)]
        return {"x1": self.images[indices], "prompt": np.asarray(texts, dtype=str)}

    def prompt_table(self, held_out: bool = False) -> list[tuple[str, int]]:
        """(prompt, digit) of every training (or held-out) template at every class."""
        return digit_prompts.prompt_table(self.held_out_templates if held_out else self.templates)

    def prompt_source(self):
        """The training prompts as a PromptSource: what triplets are made for."""
        from rectflow_jax.data import prompts  # tensorflow_datasets: imported only when prompts are read

        texts = tuple(text for text, _ in self.prompt_table())
        digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
        return prompts.PromptSource(spec=f"digits_text training prompts: {len(texts)} prompts sha256:{digest}",
                                    origin="digits_text", all_prompts=texts)


def _digits_text(image_size: int = 8, templates: tuple[str, ...] | None = None,
                 held_out_templates: tuple[str, ...] | None = None) -> TextDigits:
    if image_size < 8:
        raise ConfigError(f"digits_text image_size must be >= 8, got {image_size}")
    train = digit_prompts.check_templates(digit_prompts.TRAIN_TEMPLATES if templates is None else templates,
                                          "data.templates")
    held_out = digit_prompts.check_templates(
        digit_prompts.HELD_OUT_TEMPLATES if held_out_templates is None else held_out_templates,
        "data.held_out_templates")
    if overlap := sorted(set(train) & set(held_out)):
        raise ConfigError(f"data.held_out_templates must be kept out of training, but {overlap[0]!r} is in "
                          "data.templates too")
    images, labels = _digits_arrays(int(image_size))
    return TextDigits("digits_text", images.shape[1:], 0, images=images, labels=labels, templates=train,
                      held_out_templates=held_out)


# ------------------------------------------------------------------------------- tfds


@dataclasses.dataclass(frozen=True)
class TfdsImageDataset(Dataset):
    """An image set from tensorflow_datasets with 'image' (uint8) and 'label' features."""

    tfds_name: str = "cifar10"
    split: str = "train"
    reference_split: str = "test"
    data_dir: str | None = None
    random_flip: bool = True
    shuffle_buffer: int = 50_000

    def _load(self, split: str):
        import tensorflow_datasets as tfds

        return tfds.load(self.tfds_name, split=split, data_dir=self.data_dir, shuffle_files=False)

    @staticmethod
    def _to_batch(example: Mapping[str, Any], image, with_labels: bool) -> dict:
        import tensorflow as tf

        batch = {"x1": tf.cast(image, tf.float32) / 127.5 - 1.0}
        if with_labels:
            batch["label"] = tf.cast(example["label"], tf.int32)
        return batch

    def batches(self, batch_size: int, seed: int, start_step: int = 0,
                shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        import tensorflow as tf
        import tensorflow_datasets as tfds

        index, count = _check_shard(shard)
        split = tfds.even_splits(self.split, n=count)[index] if count > 1 else self.split
        examples = self._load(split)
        size = int(examples.cardinality())
        first_epoch, offset = divmod(start_step * batch_size, size)

        def epoch_stream(epoch):
            # Per-epoch seeds make any epoch reproducible without replaying earlier ones.
            shuffled = examples.shuffle(self.shuffle_buffer, seed=seed * 1_000_003 + epoch,
                                        reshuffle_each_iteration=False)
            positions = tf.data.Dataset.range(size).map(lambda i: epoch * size + i)
            return tf.data.Dataset.zip(shuffled, positions)

        def prepare(example, position):
            image = example["image"]
            if self.random_flip:
                image = tf.image.stateless_random_flip_left_right(
                    image, seed=tf.stack([tf.constant(seed, tf.int64), position]))
            return self._to_batch(example, image, with_labels=bool(self.num_classes))

        ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_stream)
        ds = ds.skip(offset).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.deterministic = True
        return iter(tfds.as_numpy(ds.with_options(options)))

    def reference(self, n: int, seed: int = 0) -> Batch:
        import tensorflow_datasets as tfds

        examples = self._load(self.reference_split)
        size = int(examples.cardinality())
        if n > size:
            raise ConfigError(f"{self.tfds_name}:{self.reference_split} has only {size} examples, asked for {n}")
        ds = examples.shuffle(size, seed=seed).take(n)
        ds = ds.map(lambda example: self._to_batch(example, example["image"], with_labels=True)).batch(n)
        return next(iter(tfds.as_numpy(ds)))


def _cifar10(split: str = "train", reference_split: str = "test", data_dir: str | None = None,
             random_flip: bool = True, class_conditional: bool = False,
             shuffle_buffer: int = 50_000) -> TfdsImageDataset:
    return TfdsImageDataset("cifar10", (32, 32, 3), 10 if class_conditional else 0,
                            tfds_name="cifar10", split=split, reference_split=reference_split,
                            data_dir=data_dir, random_flip=random_flip, shuffle_buffer=shuffle_buffer)


# ----------------------------------------------------------------------------- text to latents


@dataclasses.dataclass(frozen=True)
class PromptLatents(Dataset):
    """Text-to-image in a latent space: pi0 = N(0, I) latents, pi1 = a teacher's latents for prompts.

    There are no data batches: these stages train on (text, noise, latent) triplets made by
    `rectflow pairs` from a Stable Diffusion teacher; the prompts come from `prompts`.
    """

    prompt_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def batches(self, batch_size: int, seed: int, start_step: int = 0,
                shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        raise ConfigError("text-to-image stages train on triplets: make them with `rectflow pairs --checkpoint "
                          "TEACHER` (a Stable Diffusion folder) and pass --pairs")

    def reference(self, n: int, seed: int = 0) -> Batch:
        raise ConfigError("prompt data has no reference images; evaluate text-to-image models with their own "
                          "metrics")

    def prompt_source(self):
        """The prompts named by the data config (data.prompts): what triplets are made for."""
        from rectflow_jax.data import prompts

        return prompts.load_prompts(self.prompt_options)


def _prompts(latent_shape=(64, 64, 4), prompts: str | None = None, prompts_format: str = "auto",
             prompt_key: str = "prompt", captions_per_image: int = 1, data_dir: str | None = None) -> PromptLatents:
    shape = tuple(int(d) for d in latent_shape)
    if len(shape) != 3:
        raise ConfigError(f"data.latent_shape must be (height, width, channels) of the latents, got {latent_shape}")
    options = {"prompts": prompts, "prompts_format": prompts_format, "prompt_key": prompt_key,
               "captions_per_image": captions_per_image, "data_dir": data_dir}
    return PromptLatents("prompts", shape, 0, prompt_options=options)


# ----------------------------------------------------------------------------- lookup


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    return index, count


DATASETS: dict[str, Callable[..., Dataset]] = {
    "2gmm": _two_gmm, "moons": _moons_dataset, "8gaussians": _eight_gaussians,
    "digits": _digits, "digits_text": _digits_text, "cifar10": _cifar10, "prompts": _prompts,
}


def get_dataset(data_config: Mapping[str, Any]) -> Dataset:
    """The dataset named by `data_config.name`, its other keys being that dataset's options."""
    options = dict(data_config)
    name = options.pop("name", None)
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}")
    valid = set(inspect.signature(DATASETS[name]).parameters)
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(f"unknown keys for dataset {name!r}: {unknown}; valid: {sorted(valid)}")
    return DATASETS[name](**options)
