"""The PyTorch reference for Stable Diffusion sampling parity tests: diffusers' own pipeline.

Not a test module: tests import it (`from sd_reference import diffusers_latents`; pytest puts
tests/, which has no __init__.py, on sys.path) after importorskip of torch and diffusers.
Everything runs in float32 on the CPU. Pipelines are cached per folder path for the
process, so a folder must not be rewritten with other weights once loaded.

    latents = diffusers_latents(folder, prompts, x0_nhwc, scheduler="ddim", num_steps=25,
                                guidance_scale=7.5, negative_prompt="")

runs `StableDiffusionPipeline.__call__` from the initial noise `x0_nhwc` (our NHWC layout)
with diffusers' DDIMScheduler or DPMSolverMultistepScheduler built `from_config` of the
folder's scheduler config (their defaults for every key that config lacks), and returns the
final latents, before VAE decoding, as NHWC float32 numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

SCHEDULERS = ("ddim", "dpm_solver++")

_PIPELINES: dict[str, object] = {}  # resolved folder -> loaded pipeline (its own scheduler kept aside)
_SCHEDULER_CONFIGS: dict[str, dict] = {}


def _scheduler_class(name: str):
    import diffusers

    if name == "ddim":
        return diffusers.DDIMScheduler
    if name == "dpm_solver++":
        return diffusers.DPMSolverMultistepScheduler  # its default algorithm_type is dpmsolver++
    raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")


def load_pipeline(folder: str | Path):
    """diffusers' StableDiffusionPipeline of `folder` (float32, CPU, no safety checker), cached per folder.

    Also for a folder whose model_index.json names InstaFlow's RectifiedFlowPipeline (which
    diffusers does not ship): `from_pretrained` called on a concrete pipeline class builds
    that class and reads only the components from model_index.json, as InstaFlow's own
    code does with its subclass of StableDiffusionPipeline.
    """
    import diffusers
    import torch

    key = str(Path(folder).resolve())
    if key not in _PIPELINES:
        # No dtype argument (torch_dtype, renamed dtype in diffusers 0.36): the default is float32.
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(key, safety_checker=None,
                                                                 requires_safety_checker=False)
        dtypes = {p.dtype for model in (pipe.unet, pipe.vae, pipe.text_encoder) for p in model.parameters()}
        if dtypes != {torch.float32}:
            raise AssertionError(f"the reference must run in float32, {key} loaded as {dtypes}")
        pipe.set_progress_bar_config(disable=True)
        _SCHEDULER_CONFIGS[key] = dict(pipe.scheduler.config)
        _PIPELINES[key] = pipe
    return _PIPELINES[key]


def make_scheduler(folder: str | Path, scheduler: str):
    """diffusers' `scheduler` built from_config of the folder's own scheduler config, as swapped into the pipeline."""
    load_pipeline(folder)
    return _scheduler_class(scheduler).from_config(_SCHEDULER_CONFIGS[str(Path(folder).resolve())])


def diffusers_latents(folder: str | Path, prompts: Sequence[str], x0_nhwc: np.ndarray, *, scheduler: str,
                      num_steps: int, guidance_scale: float, negative_prompt: str = "") -> np.ndarray:
    """Final latents (NHWC float32) of StableDiffusionPipeline from initial noise `x0_nhwc` (N, h, w, 4).

    Guidance as in diffusers: classifier-free with `negative_prompt` when guidance_scale > 1,
    else the conditional model alone. The pipeline scales x0 by the scheduler's
    init_noise_sigma (1 for DDIM and DPM-Solver).
    """
    import torch

    pipe = load_pipeline(folder)
    pipe.scheduler = make_scheduler(folder, scheduler)
    x0 = np.asarray(x0_nhwc, np.float32)
    if x0.ndim != 4 or len(x0) != len(prompts):
        raise ValueError(f"x0_nhwc must be (len(prompts), h, w, c), got {x0.shape} for {len(prompts)} prompts")
    latents = torch.from_numpy(np.ascontiguousarray(x0.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = pipe(list(prompts), height=x0.shape[1] * pipe.vae_scale_factor, width=x0.shape[2] * pipe.vae_scale_factor,
                   num_inference_steps=num_steps, guidance_scale=guidance_scale,
                   negative_prompt=[negative_prompt] * len(prompts), latents=latents, output_type="latent")
    return np.ascontiguousarray(out.images.float().numpy().transpose(0, 2, 3, 1))


def diffusers_timesteps(folder: str | Path, scheduler: str, num_steps: int) -> list[int]:
    """The UNet timesteps diffusers' `scheduler` steps through at `num_steps` (for debugging)."""
    built = make_scheduler(folder, scheduler)
    built.set_timesteps(num_steps, device="cpu")
    return [int(t) for t in built.timesteps]
