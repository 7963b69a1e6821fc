"""Defaults every experiment config starts from, and per-stage overrides.

A config file in configs/ calls `base_config()` and sets what its experiment needs.
Stages after the first differ only by small overrides, written as partial configs:
`config.stages.reflow.optim.lr = 1e-4` means "the reflow stages train with lr 1e-4";
`stage_config(config, 'reflow')` merges them into a full config for the train loop.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections
from ml_collections import config_dict

STAGE_KINDS = ("rf", "reflow", "distill")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict({"name": "digits"})
    c.model = ml_collections.ConfigDict({"name": "mlp"})

    # The rectified-flow objective (t = 0 noise, t = 1 data).
    c.flow = ml_collections.ConfigDict()
    c.flow.time_sampler = "uniform"       # uniform | logit_normal | u_shaped
    c.flow.time_sampler_args = ml_collections.ConfigDict({"eps": 1e-3})
    c.flow.loss = "l2"                    # l2 | pseudo_huber

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.schedule = "constant"         # after warmup: constant | cosine
    c.optim.warmup_steps = 100
    c.optim.decay_steps = 0               # cosine only
    c.optim.grad_clip = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.999

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128              # global, over all devices and hosts
    c.train.num_steps = 1000
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.sample_every = 0              # TensorBoard grids; 0: at the end only

    # Overrides for the later stages: partial configs over flow/optim/train.
    c.stages = ml_collections.ConfigDict()
    c.stages.reflow = ml_collections.ConfigDict({"init": "teacher"})   # teacher | scratch
    c.stages.distill = ml_collections.ConfigDict()

    # Reflow couplings: integrate the teacher's ODE from fresh x0.
    c.pairs = ml_collections.ConfigDict()
    c.pairs.num_pairs = 10000
    c.pairs.shard_size = 2500
    c.pairs.num_steps = 100
    c.pairs.method = "euler"              # euler | heun
    c.pairs.batch_size = 500

    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 1
    c.sample.num_samples = 64
    c.sample.method = "euler"
    c.sample.batch_size = 1000            # text-to-image: min(this, number of images); SD wants ~8
    # Text-to-image (`rectflow sample --pretrained FOLDER`), see rectflow_jax/text_to_image.py.
    c.sample.guidance_scale = 1.0         # 1: no classifier-free guidance (InstaFlow one-step)
    c.sample.negative_prompt = ""         # the unconditional text when guidance_scale != 1
    c.sample.height = config_dict.placeholder(int)   # pixels; unset: unet sample_size * VAE factor
    c.sample.width = config_dict.placeholder(int)
    c.sample.dtype = "float32"            # compute and parameter dtype: float32 | bfloat16
    c.sample.images_per_prompt = 1
    c.sample.num_frames = 8               # with --interpolate_seeds=A,B
    c.sample.save_latents = True          # latents.npz (x0, x1); off for very large runs

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 2000
    c.eval.steps = (1, 2, 4, 100)

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = ml_collections.ConfigDict()   # logical axis -> mesh axis overrides

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = config_dict.placeholder(str)      # host:port of process 0
    c.distributed.num_processes = config_dict.placeholder(int)
    c.distributed.process_id = config_dict.placeholder(int)
    return c


def get_config() -> ml_collections.ConfigDict:
    """The default of the `--config` flag: the base config (commands that need no experiment)."""
    return base_config()


def _merge(target: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict, where: str) -> None:
    for key, value in overrides.items():
        if key not in target:
            raise ValueError(f"stage override {where}.{key} names no key of the base config")
        if isinstance(value, ml_collections.ConfigDict) and isinstance(target[key], ml_collections.ConfigDict) \
                and key != "time_sampler_args":
            _merge(target[key], value, f"{where}.{key}")
        else:
            target[key] = value


def stage_config(config: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
    """The full config of a stage kind: 'rf' (from data), 'reflow' or 'distill'."""
    if kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {kind!r}; choose one of {STAGE_KINDS}")
    merged = ml_collections.ConfigDict(config.to_dict())
    if kind != "rf":
        overrides = ml_collections.ConfigDict(config.stages[kind].to_dict())
        if "init" in overrides:
            del overrides["init"]
        _merge(merged, overrides, f"stages.{kind}")
    return merged


def load_config(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """A config file's get_config(), as `--config=path[:arg]` would give it."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)
