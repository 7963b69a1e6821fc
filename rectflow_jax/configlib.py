"""Defaults every experiment config starts from, and per-stage overrides.

A config file in configs/ calls `base_config()` and sets what its experiment needs.
Stages after the first differ only by small overrides, written as partial configs:
`config.stages.reflow.optim.lr = 1e-4` means "the reflow stages train with lr 1e-4";
`stage_config(config, 'reflow')` merges them into a full config for the train loop.
`validate(config)` (called by load_config, stage_config and the CLI) refuses a value
outside its choices with one ConfigError naming the key, the value and the choices.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections
from ml_collections import config_dict

STAGE_KINDS = ("rf", "reflow", "distill")
REFLOW_INITS = ("teacher", "scratch")   # a reflow stage starts from its teacher's params, or fresh


class ConfigError(ValueError):
    """A config value outside its choices or range, a key that does not exist, or stage inputs that are missing."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict({"name": "digits"})
    c.model = ml_collections.ConfigDict({"name": "mlp"})

    # The rectified-flow objective (t = 0 noise, t = 1 data).
    c.flow = ml_collections.ConfigDict()
    # The first stage's objective: rectified_flow, or diffusion (a noise-prediction model like
    # Stable Diffusion, trained on flow.diffusion's schedule). Reflow and distillation always
    # train velocities.
    c.flow.objective = "rectified_flow"
    # A diffusers scheduler config: the diffusion objective trains on it, and the DDIM and
    # DPM-Solver++ samplers of that stage read it as diffusers' schedulers would. SD 1.5's
    # betas; trailing spacing so that one DDIM step starts from the last timestep.
    c.flow.diffusion = ml_collections.ConfigDict({
        "num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "prediction_type": "epsilon", "timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True,
        "clip_sample": False})
    c.flow.time_sampler = "uniform"       # uniform | logit_normal | u_shaped (flow.TIME_SAMPLERS)
    # Each sampler's own arguments; only the chosen sampler's are used (and hashed into the run).
    c.flow.uniform = ml_collections.ConfigDict({"eps": 1e-3})                      # t ~ U[eps, 1]
    c.flow.logit_normal = ml_collections.ConfigDict({"mean": 0.0, "std": 1.0})     # sigmoid(N(mean, std^2))
    c.flow.u_shaped = ml_collections.ConfigDict({"a": 4.0})                        # density ~ cosh(a (t - 1/2))
    c.flow.loss = "l2"                    # l2 | pseudo_huber | lpips (text-to-image: on VAE-decoded images)
    # A second loss from a step on (InstaFlow: L2, then LPIPS); loss "" keeps flow.loss throughout.
    c.flow.loss_switch = ml_collections.ConfigDict({"loss": "", "step": 0})
    c.flow.cond_dropout = 0.0             # share of examples trained on the null condition (CFG)
    # LPIPS-VGG weights: torchvision's vgg16 state dict (or the safetensors file that
    # `python -m rectflow_jax.models.lpips` converts); heads default to the lpips package's.
    c.flow.lpips = ml_collections.ConfigDict({"backbone": config_dict.placeholder(str),
                                              "heads": config_dict.placeholder(str), "allow_pickle": False,
                                              "resize": 0})

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.schedule = "constant"         # after warmup: constant | cosine
    c.optim.warmup_steps = 100
    c.optim.decay_steps = 0               # cosine only; 0: to the end of the stage (train.num_steps)
    c.optim.grad_clip = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.999
    # How the EMA starts (it starts from the initial params, or a teacher's):
    #   ramp: decay_t = min(ema_decay, (1 + t) / (10 + t)) at update t = 0, 1, ...
    #   bias_correction: the EMA of the params from zero, divided by 1 - ema_decay^(t + 1)
    #   none: ema_decay from the first update (the init keeps ema_decay^t of the weight)
    c.optim.ema_warmup = "ramp"

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128              # global, over all devices and hosts
    c.train.num_steps = 1000
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.sample_every = 0              # TensorBoard grids; 0: at the end only
    c.train.freeze = ()                   # top-level param names kept at their initial values (text_encoder)
    c.train.microbatches = 1              # gradient accumulation: the batch in this many slices, one scan
    c.train.preemption_check_every = 10   # steps between the hosts' agreement on a SIGTERM (1 host: every step)

    # Overrides for the later stages: partial configs over flow/optim/train.
    c.stages = ml_collections.ConfigDict()
    c.stages.reflow = ml_collections.ConfigDict({"init": "teacher"})   # REFLOW_INITS: teacher | scratch
    c.stages.distill = ml_collections.ConfigDict()

    # Reflow couplings: integrate the teacher's ODE from fresh x0.
    c.pairs = ml_collections.ConfigDict()
    c.pairs.num_pairs = 10000
    c.pairs.shard_size = 2500
    c.pairs.num_steps = 100
    c.pairs.method = "euler"              # euler | heun | ddim | dpm_solver++ (sampling.STEPPERS)
    c.pairs.batch_size = 500
    # Text triplets from an 'sd_unet' stage (2-RF -> distillation pairs); see config.teacher for folders.
    c.pairs.guidance_scale = 1.0          # classifier-free guidance only when > 1
    c.pairs.negative_prompt = ""
    c.pairs.dtype = "float32"             # float32 | bfloat16

    # A pretrained Stable Diffusion folder as the first teacher (text-to-image configs), and
    # how its probability-flow ODE is solved to make triplets.
    c.teacher = ml_collections.ConfigDict()
    c.teacher.pretrained = config_dict.placeholder(str)
    c.teacher.method = "dpm_solver++"     # ddim | dpm_solver++ | euler | heun (velocity folders: euler | heun)
    c.teacher.num_steps = 25
    c.teacher.guidance_scale = 5.0
    c.teacher.negative_prompt = ""
    c.teacher.dtype = "float32"
    c.teacher.clip_skip = 0               # text-encoder layers skipped at the end, as diffusers' clip_skip

    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 1
    c.sample.num_samples = 64
    c.sample.method = "euler"             # euler | heun | ddim | dpm_solver++ (sampling.STEPPERS)
    c.sample.batch_size = 1000            # text-to-image: min(this, number of images); SD wants ~8
    # Text-to-image (`rectflow sample --pretrained FOLDER`), see rectflow_jax/text_to_image.py.
    c.sample.guidance_scale = 1.0         # classifier-free guidance only when > 1 (0 or 1: none; InstaFlow one-step)
    c.sample.negative_prompt = ""         # the unconditional text when guidance_scale > 1
    c.sample.prediction_type = "auto"     # auto: by the folder's pipeline and scheduler | velocity (vouch for it)
    c.sample.height = config_dict.placeholder(int)   # pixels; unset: unet sample_size * VAE factor
    c.sample.width = config_dict.placeholder(int)
    c.sample.dtype = "float32"            # compute and parameter dtype: float32 | bfloat16
    c.sample.clip_skip = 0                # text-to-image from a folder: text-encoder layers skipped at the end
    c.sample.samples_per_prompt = 1       # images for each prompt, in order
    c.sample.images_per_prompt = c.sample.get_ref("samples_per_prompt")  # the older name; the same value
    c.sample.num_frames = 8               # with --interpolate_seeds=A,B
    c.sample.save_latents = True          # latents.npz (x0, x1); off for very large runs
    c.sample.controlnet_scale = 1.0       # --controlnet: the residuals' weight (diffusers' controlnet_conditioning_scale),
                                          # for each ControlNet not given its own (--controlnet FOLDER:SCALE)
    c.sample.inversion_refine = 0         # `rectflow invert`: fixed-point iterations per backward step (0: explicit)

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 2000
    c.eval.steps = (1, 2, 4, 100)
    # Text-to-image protocols (configs/coco2017_5k.py, configs/coco2014_30k.py; rectflow_jax/text_eval.py).
    # The generations follow config.sample (steps, method, guidance, size, batch_size, dtype) and config.seed.
    c.eval.protocol = ""                  # its name labels metrics.json and the cached reference statistics
    c.eval.captions = config_dict.placeholder(str)           # COCO captions JSON (captions_val2017.json),
    c.eval.images = config_dict.placeholder(str)             # and the folder of its images (val2017/);
    c.eval.data_dir = config_dict.placeholder(str)           # or a prepared tfds coco_captions:SPLIT there
    c.eval.inception_weights = config_dict.placeholder(str)  # pt_inception-2015-12-05-*.pth or .safetensors
    c.eval.clip_model = config_dict.placeholder(str)         # a transformers CLIPModel folder
    c.eval.allow_pickle = False           # read .pth / .bin weights (needs torch; pickles can run code)
    c.eval.num_images = 5000              # captioned images, in id order; fewer: a seeded subset
    c.eval.caption_seed = 0
    c.eval.fid_resolution = 512           # both image sets: centre square crop, bicubic to this, uint8
    c.eval.stats_dir = config_dict.placeholder(str)  # reference statistics cache; default ~/.cache/rectflow_jax
    c.eval.shard_size = 500               # images per resumable shard
    c.eval.batch_size = 50                # Inception batch (generation batches: sample.batch_size)
    c.eval.grid_size = 16                 # images in grid.png

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.compilation_cache_dir = ""          # persistent XLA compilation cache (local path or gs://); "" for none
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
            raise ConfigError(f"stage override {where}.{key} names no key of the base config")
        if isinstance(value, ml_collections.ConfigDict) and isinstance(target[key], ml_collections.ConfigDict):
            _merge(target[key], value, f"{where}.{key}")
        else:
            target[key] = value


def _merged(config: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
    if kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {kind!r}; choose one of {STAGE_KINDS}")
    merged = ml_collections.ConfigDict(config.to_dict())
    if kind != "rf":
        overrides = ml_collections.ConfigDict(config.stages[kind].to_dict())
        if "init" in overrides:
            del overrides["init"]
        _merge(merged, overrides, f"stages.{kind}")
    return merged


def stage_config(config: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
    """The full config of a stage kind: 'rf' (from data), 'reflow' or 'distill'."""
    validate(config)
    return _merged(config, kind)


def _choices() -> dict[str, tuple[str, ...]]:
    """Enumerated config keys and their choices, read from the modules that implement them.

    Imported here, not at the top: configs import this module and need no JAX to load.
    """
    from rectflow_jax import flow, models, sampling, sd_folder, teachers, train
    from rectflow_jax.data import datasets

    losses = tuple(sorted(flow.LOSSES)) + flow.PERCEPTUAL_LOSSES
    return {
        "data.name": tuple(sorted(datasets.DATASETS)),
        "model.name": tuple(sorted(models.MODELS)),
        "flow.objective": flow.OBJECTIVES,
        "flow.time_sampler": tuple(sorted(flow.TIME_SAMPLERS)),
        "flow.loss": losses,
        "flow.loss_switch.loss": ("",) + losses,
        "optim.schedule": train.SCHEDULES,
        "optim.ema_warmup": train.EMA_WARMUPS,
        "pairs.method": sampling.METHODS,
        "pairs.dtype": tuple(teachers.DTYPES),
        "teacher.method": sampling.METHODS,
        "teacher.dtype": tuple(teachers.DTYPES),
        "sample.method": sampling.METHODS,
        "sample.prediction_type": sd_folder.PREDICTION_TYPES,
        "sample.dtype": tuple(teachers.DTYPES),
    }


def _check_flow(flow_config: ml_collections.ConfigDict, where: str) -> None:
    """flow holds the sampler name, the loss and one sub-config per sampler with exactly its arguments."""
    from rectflow_jax import flow

    for key in flow_config:
        if key in ("objective", "diffusion", "time_sampler", "loss", "loss_switch", "cond_dropout", "lpips"):
            continue
        if key not in flow.TIME_SAMPLERS:
            raise ConfigError(f"{where}.{key} is not a config key; a time sampler's arguments go in "
                              f"{where}.<sampler>.<argument>, samplers: {sorted(flow.TIME_SAMPLERS)}")
        wanted = flow.time_sampler_arg_names(key)
        unknown = sorted(set(flow_config[key]) - set(wanted))
        if unknown:
            raise ConfigError(f"{where}.{key}.{unknown[0]} is not an argument of the {key!r} time sampler; "
                              f"its arguments: {list(wanted)}")
    name = flow_config.time_sampler
    if name in flow.TIME_SAMPLERS:
        missing = sorted(set(flow.time_sampler_arg_names(name)) - set(flow_config.get(name, {})))
        if missing:
            raise ConfigError(f"{where}.{name}.{missing[0]} is not set; the {name!r} time sampler needs it")


def _validate_one(config: ml_collections.ConfigDict, choices: dict, where: str) -> None:
    for key, allowed in choices.items():
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node.get(section) if node is not None else None
        if node is None:  # an older config without this section: its defaults apply
            continue
        value = node.get(name)
        if value not in allowed:
            raise ConfigError(f"{where}{key}={value!r} is not one of {list(allowed)}")
    _check_flow(config.flow, f"{where}flow")
    if not 0.0 <= config.flow.get("cond_dropout", 0.0) < 1.0:
        raise ConfigError(f"{where}flow.cond_dropout={config.flow.cond_dropout!r} must lie in [0, 1)")
    if not 0.0 <= config.optim.ema_decay < 1.0:
        raise ConfigError(f"{where}optim.ema_decay={config.optim.ema_decay!r} must lie in [0, 1)")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for a value outside its choices, in the config or in any stage's overrides.

    The error names the key (prefixed 'stages.<kind>: ' when a stage override brings the
    value in), the value and the choices: a typo never falls back to a default.
    """
    init = config.stages.reflow.get("init")
    if init not in REFLOW_INITS:
        raise ConfigError(f"stages.reflow.init={init!r} is not one of {list(REFLOW_INITS)}")
    choices = _choices()
    _validate_one(config, choices, "")
    for kind in STAGE_KINDS[1:]:
        _validate_one(_merged(config, kind), choices, f"stages.{kind}: ")


def load_config(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """A config file's get_config(), as `--config=path[:arg]` would give it, validated."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config() if arg is None else module.get_config(arg)
    validate(config)
    return config
