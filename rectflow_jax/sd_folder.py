"""Diffusers pipeline folders: what kind of model a folder holds, its parts, and writing one.

A folder is read from model_index.json (unet/, vae/, text_encoder/, tokenizer/) and
scheduler/scheduler_config.json. Its UNet is one of two kinds:
  - a rectified-flow velocity field in our time (2-RF, InstaFlow): the folder names
    RectifiedFlowPipeline, as the released folders and our exports do, or the caller
    vouches for it (prediction_type='velocity');
  - a diffusion model (Stable Diffusion): StableDiffusionPipeline, predicting epsilon,
    v or the sample as its scheduler config says; rectflow_jax.diffusion turns it into a
    velocity field after a change of variables.
Any other pipeline class, or a prediction type we do not know, is one clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rectflow_jax import diffusion, storage
from rectflow_jax.weights import WeightLoadError

# model_index.json component -> the classes we can load for it.
COMPONENTS = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
              "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast")}
# Pipelines whose UNet is a velocity field under our convention, and those that are SD diffusion models.
VELOCITY_PIPELINES = ("RectifiedFlowPipeline",)
DIFFUSION_PIPELINES = ("StableDiffusionPipeline",)
# auto: by the folder's pipeline class and scheduler; velocity: the caller vouches for a velocity UNet.
PREDICTION_TYPES = ("auto", "velocity")
# The scheduler an export writes when its source folder had none. Neither our velocity sampler
# nor InstaFlow's RectifiedFlowPipeline steps with it (that pipeline reads only its
# init_noise_sigma, 1, and order, 1); it is SD 1.5's, as in the released 2-RF and InstaFlow
# folders, so that diffusers loads the whole folder. model_index.json's _class_name,
# not this, says that the UNet predicts velocity.
DEFAULT_SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000,
                     "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    return (storage.path(path) / "model_index.json").is_file()  # a remote folder is one too, refused when read


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """model_index.json of a pipeline folder, checked to name components we can load."""
    # Its weights are read by local-only loaders (weights.py, transformers): refuse a gs:// folder here, first.
    storage.require_local(folder, "pretrained folder", WeightLoadError)
    root = Path(folder)
    if not root.is_dir():
        raise WeightLoadError(f"pretrained folder {str(root)!r} does not exist or is not a directory")
    path = root / "model_index.json"
    if not path.is_file():
        raise WeightLoadError(f"{str(root)!r} has no model_index.json; is it a diffusers pipeline folder "
                              "(unet/, vae/, text_encoder/, tokenizer/)?")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightLoadError(f"{str(path)!r} is not valid JSON: {err}") from err
    for name, classes in COMPONENTS.items():
        entry = index.get(name)
        if not entry or entry[-1] is None:
            raise WeightLoadError(f"{str(path)!r} names no {name} component")
        if entry[-1] not in classes:
            raise WeightLoadError(f"{str(path)!r}: {name} is a {entry[-1]}; only {', '.join(classes)} can be loaded")
    return index


def read_scheduler_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """scheduler/scheduler_config.json of a pipeline folder, or None if it has none."""
    storage.require_local(folder, "pretrained folder", WeightLoadError)
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightLoadError(f"{str(path)!r} is not valid JSON: {err}") from err


def parametrisation(folder: str | os.PathLike, index: dict[str, Any], scheduler: dict[str, Any] | None,
                    prediction_type: str = "auto") -> str:
    """'velocity', or the diffusion prediction type ('epsilon', 'v_prediction', 'sample') of the UNet.

    The released 2-RF and InstaFlow folders keep SD 1.5's scheduler config (epsilon, which
    their pipeline never uses) and say what they are only by model_index.json's
    _class_name, RectifiedFlowPipeline; our export writes the same. 'velocity' is the
    caller vouching for the UNet (e.g. InstaFlow re-saved by diffusers'
    StableDiffusionPipeline, which renames the class).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise WeightLoadError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    pipeline_class = index.get("_class_name") or "pipeline"
    if prediction_type == "velocity" or pipeline_class in VELOCITY_PIPELINES:
        return "velocity"
    if pipeline_class not in DIFFUSION_PIPELINES:
        raise WeightLoadError(
            f"{str(folder)!r} is a {pipeline_class}, a kind of folder we cannot sample: only "
            f"{', '.join(VELOCITY_PIPELINES + DIFFUSION_PIPELINES)} folders are known. If its UNet predicts a "
            "rectified-flow velocity, say so with --config.sample.prediction_type=velocity")
    predicts = (scheduler or {}).get("prediction_type", "epsilon")  # diffusers' default when unset
    if predicts not in diffusion.PREDICTION_TYPES:
        raise WeightLoadError(f"{str(folder)!r}: its scheduler predicts {predicts!r}, which we cannot sample "
                              f"(known: {', '.join(diffusion.PREDICTION_TYPES)})")
    return predicts


def load_tokenizer(folder: str | os.PathLike):
    """transformers' CLIPTokenizer from `folder`/tokenizer (vocab.json + merges.txt, or tokenizer.json)."""
    from transformers import CLIPTokenizer  # transformers is slow to import; only text models need it

    path = storage.path(folder) / "tokenizer"
    if not path.is_dir():
        raise WeightLoadError(f"subfolder 'tokenizer' is missing from {str(folder)!r}")
    try:
        with storage.local_copy(path) as local:  # a stage's own tokenizer may be on gs://; transformers reads local
            return CLIPTokenizer.from_pretrained(Path(local))
    except Exception as err:  # transformers raises OSError, ValueError, TypeError... for a broken folder
        raise WeightLoadError(f"{str(path)!r} is not a readable CLIP tokenizer: {err}") from err


def fingerprint(folder: str | os.PathLike) -> str:
    """A hash naming a folder's contents: every config and tokenizer file, and each weight file's size
    and first MiB (header and leading tensors). Cheap next to hashing GBs, and it changes when the
    weights are retrained or re-exported; a teacher folder is named by it in pairs.json."""
    storage.require_local(folder, "pretrained folder", WeightLoadError)
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        digest.update(rel.encode())
        if path.suffix in (".json", ".txt"):
            digest.update(path.read_bytes())
        else:
            digest.update(str(path.stat().st_size).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def write_pipeline_folder(out: str | os.PathLike, models: dict[str, Any], params: dict[str, Any], tokenizer,
                          scheduler_config: dict[str, Any] | None) -> Path:
    """Writes a whole velocity pipeline folder (float32 safetensors) that diffusers, transformers and we load.

    Laid out as the released InstaFlow folders: a RectifiedFlowPipeline, a scheduler that
    diffusers needs but the velocity sampler ignores, no safety checker or feature extractor.
    `models` / `params` hold 'unet', 'vae' and 'text_encoder'.
    """
    storage.require_local(out, "export folder", WeightLoadError)  # save_pretrained writes local files only
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        models[name].save_pretrained(params[name], out / name)
    tokenizer.save_pretrained(out / "tokenizer")
    scheduler = scheduler_config if (scheduler_config or {}).get("_class_name") else DEFAULT_SCHEDULER
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": VELOCITY_PIPELINES[0], "scheduler": ["diffusers", scheduler["_class_name"]],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
             **{name: [("diffusers" if name in ("unet", "vae") else "transformers"), classes[0]]
                for name, classes in COMPONENTS.items()}}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
