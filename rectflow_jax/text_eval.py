"""Text-to-image evaluation at the published protocols: FID and CLIP score on COCO captions.

    rectflow eval --config configs/coco2017_5k.py --pretrained FOLDER --out O     (or --checkpoint STAGE)

The model is any text-to-image pipeline `TextToImage` loads (a velocity folder or stage at
`sample.num_steps` Euler steps, an SD folder with its solver and guidance). The protocol is
config.eval (see configs/coco2017_5k.py): which captions (data/coco.py), the FID
resolution, the Inception weights (pytorch-fid's) and the CLIP model.

Every image is made, measured and stored once, in shards: image i uses caption i and the
noise normal(fold_in(key(seed), i)), so it depends on the model, the settings and i alone
and a killed run continues with the first missing shard. The pipeline, per image:

  1. generation at sample.height x sample.width, decoded and quantised to uint8;
  2. CLIP score: cosine similarity of the CLIP image embedding (the CLIP processor's own
     resize and crop of the uint8 image) and the caption's text embedding;
  3. FID image: centre square crop, PIL bicubic resize to eval.fid_resolution, uint8
     (data/coco.fid_image, the same step the reference images take);
  4. Inception pool features of the FID image (Inception's own bilinear resize to 299).

FID compares the Gaussian fits of (4) with those of the reference images, whose statistics
are computed once and cached as `<stats_dir>/<protocol>_<key>.npz` (mu, sigma), the key
hashing the image list, the FID resolution and the Inception weights.

The output folder:
  eval.json                 the run's settings; resuming with other settings is refused
  shards/shard_NNNNN.npz    index, prompt, images (uint8 at the FID resolution), inception
                            (float32 pool features), clip_score, and the generation time
  metrics.json              fid, clip_score, images_per_second, the protocol and the settings
  grid.png, grid.txt        the first images and their captions
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from rectflow_jax import batch_runner, evaluate, plots, sampling, sd_folder, storage
from rectflow_jax import text_to_image as t2i
from rectflow_jax.data import coco
from rectflow_jax.data.coco import EvalDataError
from rectflow_jax.models import inception
from rectflow_jax.models.clip import CLIPScorer

log = logging.getLogger("rectflow")

PREPROCESS = "center-square crop, PIL bicubic resize, uint8; Inception bilinear to 299 (pytorch-fid)"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """config.eval of a text-to-image protocol, checked."""

    name: str
    num_images: int
    caption_seed: int
    fid_resolution: int
    source: coco.CocoSource
    inception_weights: str
    clip_model: str
    allow_pickle: bool
    stats_dir: str
    shard_size: int
    batch_size: int
    grid_size: int

    @classmethod
    def from_config(cls, eval_config) -> "Protocol":
        missing = [key for key in ("captions", "inception_weights", "clip_model") if not eval_config.get(key)]
        if missing:
            raise EvalDataError(f"the {eval_config.protocol} protocol needs "
                                + ", ".join(f"--config.eval.{key}" for key in missing))
        for key in ("inception_weights", "clip_model"):  # read by libraries that open local files only
            storage.require_local(eval_config[key], f"eval.{key}", EvalDataError)
        source = coco.CocoSource.from_config(eval_config)
        if not Path(eval_config.inception_weights).is_file():
            raise EvalDataError(f"eval.inception_weights={eval_config.inception_weights!r} is not an existing file")
        if not Path(eval_config.clip_model).is_dir():
            raise EvalDataError(f"eval.clip_model={eval_config.clip_model!r} is not an existing folder")
        for key in ("num_images", "fid_resolution", "shard_size", "batch_size"):
            if int(eval_config[key]) < 1:
                raise EvalDataError(f"eval.{key} must be a positive integer, got {eval_config[key]!r}")
        stats_dir = eval_config.get("stats_dir") or default_stats_dir()
        return cls(eval_config.protocol, int(eval_config.num_images), int(eval_config.caption_seed),
                   int(eval_config.fid_resolution), source, str(eval_config.inception_weights),
                   str(eval_config.clip_model), bool(eval_config.allow_pickle), str(stats_dir),
                   int(eval_config.shard_size), int(eval_config.batch_size), int(eval_config.grid_size))

    def pairs(self) -> list[coco.CocoPair]:
        return coco.select_pairs(self.source.all_pairs(), self.num_images, self.caption_seed, self.source.captions)


def default_stats_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "rectflow_jax", "fid_stats")


class Measures:
    """The two measuring networks: Inception (pytorch-fid's, for FID) and CLIP, over this process's devices
    (each process measures its own shards; process 0 alone the reference images)."""

    def __init__(self, protocol: Protocol):
        self.inception_fingerprint = inception.weights_fingerprint(protocol.inception_weights)
        self.clip_fingerprint = sd_folder.fingerprint(protocol.clip_model)
        mesh = batch_runner.local_mesh()
        runner = batch_runner.BatchRunner(
            lambda params, images: inception.inception_features(params, images.astype(np.float32) / 255.0),
            protocol.batch_size, mesh=mesh)
        self._inception_params = runner.place(
            inception.load_inception_params(protocol.inception_weights, allow_pickle=protocol.allow_pickle))
        self._inception = runner
        self.clip = CLIPScorer.from_pretrained(protocol.clip_model, allow_pickle=protocol.allow_pickle,
                                               batch_size=protocol.batch_size, mesh=mesh)

    def features(self, fid_images: np.ndarray) -> np.ndarray:
        """(N, R, R, 3) uint8 -> (N, 2048) float32 Inception pool features."""
        return self._inception(self._inception_params, fid_images)

    def clip_scores(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.clip.scores(images, list(prompts)), np.float32)


# ------------------------------------------------------------------------------ reference


def reference_statistics(protocol: Protocol, pairs: Sequence[coco.CocoPair], measures: Measures,
                         progress: bool = True) -> tuple[np.ndarray, np.ndarray, Path]:
    """(mu, sigma, cache file) of the reference images' Inception features, computed once per key."""
    identity = {"protocol": protocol.name, "fid_resolution": protocol.fid_resolution, "preprocess": PREPROCESS,
                "inception": measures.inception_fingerprint, **protocol.source.identity(pairs)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = storage.path(protocol.stats_dir) / f"{protocol.name}_{key}.npz"
    if path.is_file():
        with path.open("rb") as handle, np.load(handle) as stored:
            log.info("reference statistics: %s (cached)", path)
            return stored["mu"], stored["sigma"], path
    chunk = max(protocol.batch_size, 256)
    chunks = protocol.source.reference_chunks(pairs, protocol.fid_resolution, chunk)
    features = []
    with ThreadPoolExecutor(1) as pool:  # decode the next chunk while Inception runs on this one
        pending = pool.submit(next, chunks, None)
        with tqdm(total=len(pairs), desc=f"reference {protocol.name}", unit="image", disable=not progress) as bar:
            while (images := pending.result()) is not None:
                pending = pool.submit(next, chunks, None)
                features.append(measures.features(images))
                bar.update(len(images))
    mu, sigma = evaluate.gaussian_statistics(np.concatenate(features))
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.save_npz(path, dict(mu=mu, sigma=sigma, num_images=len(pairs), identity=json.dumps(identity)),
                     tmp_suffix=".partial.npz")
    log.info("reference statistics: %s (%d images)", path, len(pairs))
    return mu, sigma, path


# ------------------------------------------------------------------------------- the run


def run_settings(config, pipe: t2i.TextToImage, protocol: Protocol, measures: Measures) -> dict[str, Any]:
    """What defines the generated images and their measures; a resumed run must match it exactly."""
    s = config.sample
    height, width = pipe.image_size(s.height, s.width)
    guided = sampling.guidance_applies(s.guidance_scale)
    return {
        "protocol": protocol.name, "num_images": protocol.num_images, "caption_seed": protocol.caption_seed,
        "captions": os.path.basename(protocol.source.captions), "fid_resolution": protocol.fid_resolution,
        "preprocess": PREPROCESS, "shard_size": protocol.shard_size,
        "model": pipe.source, "model_provenance": pipe.provenance, "parametrisation": pipe.teacher.parametrisation,
        "num_steps": int(s.num_steps), "method": s.method, "guidance_scale": float(s.guidance_scale),
        "negative_prompt": s.negative_prompt if guided else None, "height": height, "width": width,
        "dtype": s.dtype, "seed": int(config.seed),
        "inception_weights": measures.inception_fingerprint, "clip_model": measures.clip_fingerprint,
    }


def _check_resume(out: Path, settings: dict) -> None:
    record = out / "eval.json"
    if record.is_file():
        stored = json.loads(record.read_text())
        changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        if changed:
            details = ", ".join(f"{k}: {stored.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise EvalDataError(f"{str(out)!r} holds an evaluation with other settings ({details}); use another "
                                "--out or delete it")
    else:
        out.mkdir(parents=True, exist_ok=True)
        # Processes may write it at once: each under its own temporary name.
        storage.write_json(record, settings, tmp_suffix=f".{os.getpid()}.partial", sort_keys=False)


def _shard_path(out: Path, k: int) -> Path:
    return out / "shards" / f"shard_{k:05d}.npz"


class _Generator:
    """Fixed-size batches of one (model, solver) setting, timed; the first batch of a run pays the compile.

    On the pipe's mesh, by default this process's devices alone: each process makes its own shards."""

    def __init__(self, config, pipe: t2i.TextToImage):
        s = config.sample
        self.pipe, self.seed = pipe, int(config.seed)
        self.kwargs = dict(num_steps=int(s.num_steps), method=s.method, guidance_scale=float(s.guidance_scale),
                           negative_ids=pipe.teacher.text.negative_ids(s.negative_prompt))
        self.latent_shape = pipe.latent_shape(s.height, s.width)
        self.batch = max(1, int(s.batch_size))
        self.compiled = False
        self.seconds, self.timed = 0.0, 0

    def __call__(self, indices: np.ndarray, prompts: list[str]) -> np.ndarray:
        """uint8 (N, H, W, 3) images of captions `prompts`, image i from the noise of (seed, i)."""
        out = []
        for start in range(0, len(indices), self.batch):
            idx, text = indices[start:start + self.batch], prompts[start:start + self.batch]
            x0 = t2i.initial_noise([self.seed] * len(idx), idx.tolist(), self.latent_shape)
            began = time.perf_counter()
            # The pipe's runners pad a short batch to `batch`: one batch shape, one compilation.
            _, images = self.pipe.generate_ids(self.pipe.tokenize(text), x0, batch_size=self.batch, **self.kwargs)
            elapsed = time.perf_counter() - began
            if self.compiled:
                self.seconds += elapsed
                self.timed += len(idx)
            self.compiled = True
            out.append(images)
        return np.concatenate(out)


def evaluate_text_to_image(config, pipe: t2i.TextToImage, out: str | os.PathLike, progress: bool = True, *,
                           process_index: int | None = None, process_count: int | None = None) -> dict[str, Any] | None:
    """Generates, measures and scores the protocol's images in `out` (resuming), returns the metrics.

    With several processes (a pod; `out` on storage they share), process p makes shards
    p, p + P, ... on its own devices; process 0 then waits for the others' shards and alone
    computes the reference statistics and the metrics. The others return None.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    protocol = Protocol.from_config(config.eval)
    out = storage.path(out)
    pairs = protocol.pairs()
    measures = Measures(protocol)
    settings = run_settings(config, pipe, protocol, measures)
    _check_resume(out, settings)
    if process_index == 0:  # first: a missing reference image fails before the generations
        mu_ref, sigma_ref, stats_path = reference_statistics(protocol, pairs, measures, progress)

    generate = _Generator(config, pipe)
    num_shards = -(-len(pairs) // protocol.shard_size)
    mine = range(process_index, num_shards, process_count)
    todo = [k for k in mine if not _shard_path(out, k).is_file()]
    if len(todo) < len(mine):
        log.info("%s: %d of %d shards done, continuing", out, len(mine) - len(todo), len(mine))
    for k in tqdm(todo, desc=f"eval {protocol.name}", unit="shard", disable=not progress):
        indices = np.arange(k * protocol.shard_size, min((k + 1) * protocol.shard_size, len(pairs)))
        prompts = [pairs[i].caption for i in indices]
        seconds, timed = generate.seconds, generate.timed
        images = generate(indices, prompts)
        fid_images = np.stack([coco.fid_image(image, protocol.fid_resolution) for image in images])
        shard = {"index": indices, "prompt": np.asarray(prompts), "images": fid_images,
                 "inception": measures.features(fid_images), "clip_score": measures.clip_scores(images, prompts),
                 "generate_seconds": generate.seconds - seconds, "generate_timed": generate.timed - timed}
        path = _shard_path(out, k)
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.save_npz(path, shard, tmp_suffix=".partial.npz")  # a shard exists whole or not at all

    if process_index != 0:
        return None
    _wait_for_shards(out, num_shards)
    metrics = _summarise(out, num_shards, len(pairs), mu_ref, sigma_ref, protocol.grid_size)
    metrics.update(settings, reference_statistics=str(stats_path))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _wait_for_shards(out: Path, num_shards: int, poll_seconds: float = 10.0) -> None:
    """Blocks until every shard exists (the other processes' too), saying which it waits for."""
    last_report = 0.0
    while missing := [k for k in range(num_shards) if not _shard_path(out, k).is_file()]:
        if time.monotonic() - last_report > 60:
            log.info("waiting for %d shards from the other processes (first: %s)", len(missing),
                     _shard_path(out, missing[0]).name)
            last_report = time.monotonic()
        time.sleep(poll_seconds)


def _summarise(out: Path, num_shards: int, num_images: int, mu_ref: np.ndarray, sigma_ref: np.ndarray,
               grid_size: int) -> dict[str, Any]:
    features, scores, seconds, timed = [], [], 0.0, 0
    grid, grid_prompts = [], []
    for k in range(num_shards):
        with _shard_path(out, k).open("rb") as handle, np.load(handle) as shard:  # members read as needed
            features.append(shard["inception"])
            scores.append(shard["clip_score"])
            seconds += float(shard["generate_seconds"])
            timed += int(shard["generate_timed"])
            if len(grid) < grid_size:
                grid_prompts.extend(str(p) for p in shard["prompt"][:grid_size - len(grid)])
                grid.extend(shard["images"][:grid_size - len(grid)])
    features = np.concatenate(features)
    if len(features) != num_images:
        raise EvalDataError(f"{str(out)!r}: the shards hold {len(features)} images, the protocol {num_images}")
    mu, sigma = evaluate.gaussian_statistics(features)
    if grid:
        images = np.stack(grid).astype(np.float32) / 127.5 - 1.0
        plots.save_png(plots.image_grid(images, ncols=min(4, len(images))), out / "grid.png")
        (out / "grid.txt").write_text("".join(f"{n}: {p}\n" for n, p in enumerate(grid_prompts)))
    return {"fid": evaluate.frechet_distance_from_statistics(mu, sigma, mu_ref, sigma_ref),
            "clip_score": float(np.mean(np.concatenate(scores))),
            # Generation alone (text encoding, the ODE, VAE decoding), compile excluded; None when no batch was timed.
            "images_per_second": timed / seconds if seconds > 0 else None,
            "images": int(len(features))}
