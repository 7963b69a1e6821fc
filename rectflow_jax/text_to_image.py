"""Text-to-image with Stable-Diffusion-shaped models: velocity UNets (2-RF, InstaFlow) and SD itself.

`TextToImage.from_pretrained(folder)` reads a diffusers pipeline folder (sd_folder) into our
Flax models and transformers' CLIPTokenizer; `TextToImage.from_stage(stage_dir)` does the
same for a stage of ours trained with model 'sd_unet'. The latent ODE is the teacher's
(`teachers.SDTeacher.solve`): for a velocity UNet, InstaFlow's RectifiedFlowPipeline
(x0 ~ N(0, I) at t = 0, the UNet at SD timestep (1 - t) * 1000, Euler or Heun); for a
diffusion UNet, DDIM or DPM-Solver++ as diffusers' schedulers from the folder's scheduler
config (rectflow_jax.diffusion). With a guidance scale s > 1 (as in diffusers; s <= 1, 0
included, is the conditional model alone), guidance with the negative prompt, both halves
in one UNet call. Images are vae.decode(x1 / scaling_factor), decoded by a runner of its own
so that latents can be made without the decoder. Batches run through the one
`batch_runner.BatchRunner`, data parallel over the mesh (params sharded by the logical
rules where the mesh has 'fsdp' or 'tensor' axes), compiled once per (batch, steps,
method, latent size, guidance on/off), a ragged last batch padded. The default mesh is
this process's devices (`batch_runner.local_mesh`): each process serves its own prompts
(text_eval splits its shards by process); a mesh over all processes makes them serve
every call together, each passing the same inputs.

Seeds: prompt k of a run uses seed `seed + k`, and its image i starts from
x0 = normal(fold_in(key(seed + k), i)) (sampling.noise_from_seeds). An image thus depends
on its prompt, seed and index only, never on the batch it ran in or on the prompts around
it: prompt k of a file is reproduced by a one-prompt run with seed `seed + k`.

What `generate_to_folder` and `interpolate_to_folder` write in the output folder:
  NNNNN.png                 one image each, numbered in run order (prompt-major)
  latents.npz               x0 (initial noise) and x1 (final latents), float32 NHWC, with
                            prompt_index and seed, plus image_index or alpha per image
  samples.npz               x1: the images as float32 NHWC in [-1, 1] (a pixel-space model's
                            outputs clipped, else the decoded uint8 images), and prompt (N,)
  prompts.json              the settings and, per image, its file, prompt and seed
  interpolation_KKKKK.png   (interpolation) prompt K's frames side by side
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from rectflow_jax import batch_runner, sampling, sd_folder, teachers
from rectflow_jax.models.clip_text import CLIPTextModel
from rectflow_jax.models.sd_unet import UNet2DConditionModel
from rectflow_jax.models.vae import AutoencoderKL
from rectflow_jax.text_conditioner import TextConditioner
from rectflow_jax.weights import WeightLoadError, resolve_folder

log = logging.getLogger("rectflow")

DTYPES = teachers.DTYPES


class TextToImageError(ValueError):
    """A text-to-image request that cannot be served as asked (dtype, image size, seeds, frames)."""


def compute_dtype(name: str) -> Any:
    if name not in DTYPES:
        raise TextToImageError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def to_uint8(images: jax.Array) -> jax.Array:
    return jnp.round(jnp.clip((images + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


_noise = jax.jit(sampling.noise_from_seeds, static_argnums=2)


def initial_noise(seeds: Sequence[int], indices: Sequence[int], latent_shape: tuple[int, ...]) -> np.ndarray:
    """x0 of each (seed, index): normal(fold_in(key(seed), index)), float32 (N, *latent_shape)."""
    if min(seeds, default=0) < 0 or max(seeds, default=0) >= 2 ** 32:
        raise TextToImageError(f"seeds must lie in [0, 2**32), got {list(seeds)}")
    return np.asarray(_noise(np.asarray(seeds, np.uint32), np.asarray(indices, np.uint32), tuple(latent_shape)))


def slerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """Spherical interpolation of two noise tensors; alpha 0 and 1 give a and b exactly.

    Gaussian noise lives near a sphere: a straight blend would shrink its norm (and wash
    out the image) midway, the arc keeps it.
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = np.sum(a64 * b64) / (np.linalg.norm(a64) * np.linalg.norm(b64))
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(theta) < 1e-6:  # (anti)parallel: the arc is degenerate
        return ((1 - alpha) * a64 + alpha * b64).astype(np.float32)
    return ((np.sin((1 - alpha) * theta) * a64 + np.sin(alpha * theta) * b64) / np.sin(theta)).astype(np.float32)


class TextToImage:
    """A loaded pipeline: the SD teacher (UNet, text encoder, tokenizer), the VAE, compiled samplers."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer,
                 params: dict[str, Any], *, pipeline_class: str = sd_folder.VELOCITY_PIPELINES[0], source: str = "",
                 mesh: jax.sharding.Mesh | None = None, scheduler_config: dict[str, Any] | None = None,
                 parametrisation: str = "velocity", clip_skip: int = 0, provenance: dict | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        # Params put on the mesh once, not per call; those loaded into their shardings stay as they are.
        self.mesh = mesh or batch_runner.local_mesh()
        self.params = batch_runner.place(params, self.mesh)
        self.pipeline_class, self.source = pipeline_class, source
        self.provenance = dict(provenance or {})  # {'run_hash', 'step'}: which weights these are
        self.scheduler_config = scheduler_config
        self.teacher = teachers.SDTeacher(
            unet, TextConditioner(tokenizer, text_encoder, clip_skip=clip_skip),
            {k: self.params[k] for k in ("unet", "text_encoder")}, parametrisation, scheduler_config, source, source,
            self.provenance)
        self._runners: dict[tuple, batch_runner.BatchRunner] = {}
        self._decoders: dict[int, batch_runner.BatchRunner] = {}
        self._encoders: dict[int, batch_runner.BatchRunner] = {}
        self.traces = 0  # how often the sampler was traced: one per compilation
        self.loras: list[dict] = []  # {'file', 'scale', ...} of each LoRA merged into the params
        self.controlnet_sources: list[str] = []  # where each attached ControlNet came from, in order
        self._check_compatible()

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: str = "float32", allow_pickle: bool = False,
                        mesh: jax.sharding.Mesh | None = None, rules=None, prediction_type: str = "auto",
                        clip_skip: int = 0) -> "TextToImage":
        """Loads unet/, vae/, text_encoder/ and tokenizer/, computing in `dtype` and storing the params in it.

        The params are read straight into their shardings on `mesh` by the logical `rules`
        (teachers.load_sd_teacher): replicated on a mesh of 'data' alone, sharded over 'fsdp'
        and 'tensor' axes, so a model larger than one device loads.

        bfloat16 params, as diffusers' `torch_dtype=torch.bfloat16`, halve the memory and
        spare every call a cast of the ~1B float32 weights. The folder's kind (velocity or
        diffusion, sd_folder.parametrisation) is settled by `load_sd_teacher` before any weight is read.
        """
        compute_dtype(dtype)  # a bad dtype is refused before anything is read
        pipeline_class = sd_folder.read_model_index(folder).get("_class_name", "")  # a pipeline folder, or one line
        mesh = mesh or batch_runner.local_mesh()
        teacher = teachers.load_sd_teacher(folder, dtype=dtype, prediction_type=prediction_type,
                                           allow_pickle=allow_pickle, mesh=mesh, rules=rules, clip_skip=clip_skip)
        if teacher.is_velocity and pipeline_class not in sd_folder.VELOCITY_PIPELINES:
            log.info("%s is a %s; sampling its UNet as a velocity field, as asked (prediction_type=velocity)",
                     folder, pipeline_class or "pipeline")
        return cls._with_vae(teacher, folder, dtype, allow_pickle, mesh, rules, pipeline_class)

    @classmethod
    def from_stage(cls, stage_dir: str | os.PathLike, *, dtype: str = "float32",
                   mesh: jax.sharding.Mesh | None = None, rules=None) -> "TextToImage":
        """A stage trained with model 'sd_unet' (2-RF, a distilled student): its EMA UNet, with the VAE,
        text encoder and tokenizer of the folder it was initialised from."""
        compute_dtype(dtype)
        mesh = mesh or batch_runner.local_mesh()
        teacher = teachers.load_sd_teacher(stage_dir, dtype=dtype, mesh=mesh, rules=rules)
        if not teacher.pretrained:  # a pixel-space model of ours: its outputs are the images
            return cls(teacher.unet, None, teacher.text.text_encoder, teacher.text.tokenizer, teacher.params,
                       pipeline_class="", source=teacher.source, mesh=mesh, scheduler_config=teacher.scheduler_config,
                       parametrisation=teacher.parametrisation, clip_skip=teacher.text.clip_skip,
                       provenance=teacher.provenance)
        return cls._with_vae(teacher, teacher.pretrained, dtype, False, mesh, rules, sd_folder.VELOCITY_PIPELINES[0])

    @classmethod
    def _with_vae(cls, teacher: teachers.SDTeacher, folder, dtype: str, allow_pickle: bool, mesh, rules,
                  pipeline_class: str) -> "TextToImage":
        kind = compute_dtype(dtype)
        try:
            vae, vae_params = AutoencoderKL.from_pretrained(
                folder, "vae", dtype=kind, param_dtype=kind, allow_pickle=allow_pickle,
                shardings=teachers.folder_shardings(AutoencoderKL, folder, "vae", mesh, rules, kind))
        except NotImplementedError as err:
            raise WeightLoadError(f"{str(resolve_folder(folder, 'vae'))!r}: {err}") from err
        params = dict(teacher.params, vae=vae_params)
        return cls(teacher.unet, vae, teacher.text.text_encoder, teacher.text.tokenizer, params,
                   pipeline_class=pipeline_class, source=teacher.source, mesh=mesh,
                   scheduler_config=teacher.scheduler_config, parametrisation=teacher.parametrisation,
                   clip_skip=teacher.text.clip_skip, provenance=teacher.provenance)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Writes a whole velocity pipeline folder (sd_folder.write_pipeline_folder) that diffusers,
        transformers and we load back. Only velocity models are exported: a diffusion UNet saved
        as a RectifiedFlowPipeline would be sampled into noise."""
        if self.vae is None:
            raise TextToImageError(f"{self.source!r} is a pixel-space model (no VAE); only latent models are exported "
                                   "as diffusers pipeline folders")
        if not self.teacher.is_velocity:
            raise TextToImageError(f"{self.source!r} is a diffusion model ({self.teacher.parametrisation}); only "
                                   "velocity models are exported as RectifiedFlowPipeline folders")
        return sd_folder.write_pipeline_folder(
            folder, {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}, self.params,
            self.tokenizer, self.scheduler_config)

    def _check_compatible(self) -> None:
        width, context = self.text_encoder.hidden_size, self.unet.cross_attention_dim
        if (context if isinstance(context, int) else context[0]) != width:
            raise WeightLoadError(f"the UNet attends to {context}-wide text but the text encoder gives {width}")
        if self.vae is not None and self.unet.in_channels != self.vae.latent_channels:
            raise WeightLoadError(f"the UNet takes {self.unet.in_channels} latent channels, the VAE has "
                                  f"{self.vae.latent_channels}")

    # ------------------------------------------------------------------ sizes and inputs

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.block_out_channels) - 1)

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width) in pixels: the UNet's sample_size times the VAE factor unless given."""
        size = self.unet.sample_size
        default = (None, None) if size is None else (size, size) if isinstance(size, int) else tuple(size)
        f = self.vae_scale_factor
        height = height or (default[0] and default[0] * f)
        width = width or (default[1] and default[1] * f)
        if not height or not width:
            raise TextToImageError("the UNet config has no sample_size: give the height and width")
        if height % f or width % f:
            raise TextToImageError(f"height and width must be multiples of {f} (the VAE factor), got {height}x{width}")
        return height, width

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        height, width = self.image_size(height, width)
        f = self.vae_scale_factor
        return height // f, width // f, self.unet.in_channels

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, 77) int32 ids, padded to the maximum length and truncated like diffusers (with a warning)."""
        return self.teacher.text.tokenize(prompts)

    # ------------------------------------------------------------------ sampling

    def generate(self, prompts: Sequence[str], x0: np.ndarray, *, num_steps: int, guidance_scale: float = 1.0,
                 negative_prompt: str = "", method: str = "euler",
                 decode: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """One batch: prompts[i] from noise x0[i] -> (final latents float32, images uint8 NHWC or None)."""
        return self.generate_ids(self.tokenize(prompts), x0, num_steps=num_steps, guidance_scale=guidance_scale,
                                 negative_ids=self.teacher.text.negative_ids(negative_prompt), method=method,
                                 decode=decode)

    def generate_ids(self, ids: np.ndarray, x0: np.ndarray, *, num_steps: int, guidance_scale: float = 1.0,
                     negative_ids: np.ndarray | None = None, method: str = "euler",
                     decode: bool = True, batch_size: int | None = None,
                     control_image: np.ndarray | Sequence[np.ndarray] | None = None,
                     controlnet_scale: float | Sequence[float] = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
        """`generate` from token ids (N, L) and, when guided, the negative prompt's ids (1, L).

        `batch_size`: run in chunks of this many (one compilation for any N); default all N at once.

        `method`: euler or heun for velocity UNets (euler, as InstaFlow's pipeline); ddim or
        dpm_solver++ (and euler / heun on DPM-Solver's grid) for diffusion UNets.

        `control_image` (1, H, W, C) in [0, 1] at the output size (control_image.load_control_image),
        with a ControlNet attached (`attach_controlnet`): its residuals, times `controlnet_scale`,
        steer every UNet call, both halves of a guided one. With several ControlNets attached, one
        image each (a sequence, in attach order) and one scale for all or one each.
        """
        latents = self._run("solve", ids, x0, num_steps=num_steps, guidance_scale=guidance_scale,
                            negative_ids=negative_ids, method=method, batch_size=batch_size,
                            control_image=control_image, controlnet_scale=controlnet_scale)
        return latents, (self.decode(latents, batch_size=batch_size or len(latents)) if decode else None)

    def invert_ids(self, ids: np.ndarray, x1: np.ndarray, *, num_steps: int, guidance_scale: float = 1.0,
                   negative_ids: np.ndarray | None = None, method: str = "euler", batch_size: int | None = None,
                   control_image: np.ndarray | Sequence[np.ndarray] | None = None,
                   controlnet_scale: float | Sequence[float] = 1.0, refine: int = 0) -> np.ndarray:
        """Final latents x1 -> the noise x0 that `generate_ids` with the same settings maps back onto
        them (teachers.SDTeacher.invert: the same ODE, integrated from t = 1 to t = 0; `refine`
        fixed-point iterations per step make the steps implicit)."""
        return self._run(("invert", int(refine)), ids, x1, num_steps=num_steps, guidance_scale=guidance_scale,
                         negative_ids=negative_ids, method=method, batch_size=batch_size,
                         control_image=control_image, controlnet_scale=controlnet_scale)

    def _run(self, direction: str, ids, x, *, num_steps, guidance_scale, negative_ids, method, batch_size,
             control_image, controlnet_scale) -> np.ndarray:
        x = np.asarray(x, np.float32)
        ids = np.asarray(ids, np.int32)
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} prompts for {len(x)} latents")
        guided = sampling.guidance_applies(guidance_scale)
        if guided and negative_ids is None:
            raise ValueError("guidance_scale > 1 needs the negative prompt's ids")
        negative_ids = np.asarray(ids[:1] if negative_ids is None else negative_ids, np.int32)  # unused unguided
        control = None if control_image is None else self._controls(control_image, controlnet_scale, x.shape[1:3])
        batch = batch_size or len(x)
        runner = self.runner(batch, num_steps=num_steps, method=method, guided=guided, direction=direction)
        return runner.full((self.params, negative_ids, np.float32(guidance_scale), control), x, ids)

    def runner(self, batch: int, *, num_steps: int, method: str, guided: bool,
               direction: str | tuple[str, int] = "solve") -> batch_runner.BatchRunner:
        """The batch runner of one (batch size, solver, direction) setting; it compiles once per input shape.
        `direction`: 'solve', or ('invert', fixed-point iterations per step)."""
        key = (batch, num_steps, method, guided, direction)
        if key not in self._runners:
            # Once per setting: an unknown method or a scheduler this cannot honour fails before compiling.
            self.teacher.time_grid(method, num_steps)
            solve = functools.partial(self._solve, num_steps=num_steps, method=method, guided=guided,
                                      direction=direction)
            self._runners[key] = batch_runner.BatchRunner(solve, batch, mesh=self.mesh)
        return self._runners[key]

    def _solve(self, consts, x, ids, *, num_steps: int, method: str, guided: bool, direction: str):
        self.traces += 1  # Python side effect: runs once per trace
        params, negative_ids, guidance_scale, control = consts
        if "loras" in params:  # unmerged: merged here, per call, at the scales passed in
            from rectflow_jax import lora

            params = dict(params, **lora.merge({k: params[k] for k in ("unet", "text_encoder")}, params["loras"],
                                               params["lora_scales"]))
        if control is not None:
            control = tuple(teachers.Control(p, image, scale) for p, (image, scale) in zip(params["controlnets"],
                                                                                           control))
        if direction == "solve":
            return self.teacher.solve(params, x, ids, negative_ids, guidance_scale, method=method,
                                      num_steps=num_steps, guided=guided, control=control)
        _, refine = direction
        return self.teacher.invert(params, x, ids, negative_ids, guidance_scale, method=method, num_steps=num_steps,
                                   guided=guided, control=control, refine=refine)

    # ------------------------------------------------------------------ LoRA

    def merge_loras(self, specs: Sequence[str | tuple[str, float]]) -> None:
        """LoRA files ('FILE[:SCALE]' or (file, scale); diffusers/PEFT or kohya, rectflow_jax/lora.py)
        merged into the UNet and text encoder: sampling then costs exactly what it did without them."""
        from rectflow_jax import lora

        targets = {k: self.params[k] for k in ("unet", "text_encoder")}
        loras, scales = lora.load_loras(specs, targets)
        self._set_adapted(lora.merge(targets, loras, scales))
        self.loras += [{"file": l.source, "scale": float(s), "layout": l.layout, "ranks": list(l.ranks),
                        "targets": l.num_targets, "merged": True} for l, s in zip(loras, scales)]

    def attach_loras(self, specs: Sequence[str | tuple[str, float]]) -> None:
        """LoRAs kept beside the untouched weights and merged inside every compiled call, their scales a
        runtime input: `set_lora_scales` changes them with no reload and no recompilation."""
        from rectflow_jax import lora

        if "loras" in self.params:
            raise TextToImageError("LoRAs are attached already; set their scales with set_lora_scales")
        loras, scales = lora.load_loras(specs, {k: self.params[k] for k in ("unet", "text_encoder")})
        self.params = dict(self.params, loras=batch_runner.place([l.factors for l in loras], self.mesh))
        self.loras += [{"file": l.source, "scale": float(s), "layout": l.layout, "ranks": list(l.ranks),
                        "targets": l.num_targets, "merged": False} for l, s in zip(loras, scales)]
        self.set_lora_scales(scales)
        self._runners.clear()

    def set_lora_scales(self, scales: Sequence[float]) -> None:
        """The scales of the attached (unmerged) LoRAs, in the order attached."""
        attached = [entry for entry in self.loras if not entry["merged"]]
        if len(scales) != len(attached):
            raise TextToImageError(f"{len(attached)} LoRAs are attached, but {len(scales)} scales were given")
        for entry, scale in zip(attached, scales):
            entry["scale"] = float(scale)
        self.params = dict(self.params, lora_scales=np.asarray(scales, np.float32))

    def _set_adapted(self, adapted: dict[str, Any]) -> None:
        self.params = dict(self.params, **adapted)
        self.teacher.params = {k: self.params[k] for k in ("unet", "text_encoder")}
        self._runners.clear()

    # ------------------------------------------------------------------ ControlNet

    def attach_controlnet(self, controlnet, params: Any, source: str = "") -> None:
        """A ControlNetModel (models/controlnet.py) and its params: `control_image` inputs then steer sampling.
        Each call adds one more; their residuals add up (diffusers' MultiControlNetModel)."""
        cross = controlnet.cross_attention_dim
        if controlnet.in_channels != self.unet.in_channels or \
                (cross if isinstance(cross, int) else cross[0]) != self.text_encoder.hidden_size or \
                tuple(controlnet.block_out_channels) != tuple(self.unet.block_out_channels):
            raise WeightLoadError(
                f"the ControlNet (in_channels {controlnet.in_channels}, block_out_channels "
                f"{tuple(controlnet.block_out_channels)}, cross_attention_dim {cross}) does not fit this UNet "
                f"(in_channels {self.unet.in_channels}, block_out_channels {tuple(self.unet.block_out_channels)}, "
                f"text width {self.text_encoder.hidden_size})")
        self.teacher.controlnets += (controlnet,)
        self.controlnet_sources.append(source)
        placed = batch_runner.place(params, self.mesh)
        self._set_adapted({"controlnets": self.params.get("controlnets", ()) + (placed,)})

    def detach_controlnets(self) -> None:
        """Back to the plain UNet: every attached ControlNet let go."""
        self.teacher.controlnets, self.controlnet_sources = (), []
        self._set_adapted({"controlnets": ()})

    def adapters(self, *, control: bool = False, controlnet_scale: float | Sequence[float] = 1.0) -> dict[str, Any]:
        """What steers this pipeline beyond its folder, for prompts.json: LoRAs merged, ControlNets used."""
        summary = {}
        if self.loras:
            summary["loras"] = [dict(entry) for entry in self.loras]
        if control:
            scales = self._controlnet_scales(controlnet_scale)
            summary["controlnets"] = [{"source": source, "scale": scale}
                                      for source, scale in zip(self.controlnet_sources, scales)]
        return summary

    def _controlnet_scales(self, scale: float | Sequence[float]) -> list[float]:
        count = len(self.teacher.controlnets)
        scales = [float(scale)] * count if np.ndim(scale) == 0 else [float(s) for s in scale]
        if len(scales) != count:
            raise TextToImageError(f"{len(scales)} ControlNet scales for {count} ControlNets: give one for all "
                                   "or one each")
        return scales

    def _controls(self, images: np.ndarray | Sequence[np.ndarray], scale: float | Sequence[float],
                  latent_hw: tuple[int, int]) -> tuple[tuple[np.ndarray, np.float32], ...]:
        """(image, scale) for each attached ControlNet, the images checked against its input."""
        controlnets = self.teacher.controlnets
        if not controlnets:
            raise TextToImageError("a control image needs a ControlNet: attach one first (--controlnet FOLDER)")
        images = [images] if hasattr(images, "shape") else list(images)  # one array, or one per ControlNet
        if len(images) != len(controlnets):
            raise TextToImageError(f"{len(images)} control images for {len(controlnets)} ControlNets: give one "
                                   "each, in the order they were attached")
        want = (latent_hw[0] * self.vae_scale_factor, latent_hw[1] * self.vae_scale_factor)
        checked = []
        for k, (image, controlnet) in enumerate(zip(images, controlnets)):
            image = np.asarray(image, np.float32)
            channels = controlnet.conditioning_channels
            if image.ndim != 4 or image.shape[0] != 1 or image.shape[1:3] != want or image.shape[3] != channels:
                raise TextToImageError(f"control image {k} must be (1, {want[0]}, {want[1]}, {channels}) for "
                                       f"these latents, got {image.shape}")
            checked.append(image)
        return tuple(zip(checked, map(np.float32, self._controlnet_scales(scale))))

    def _decode(self, params, latents):
        if self.vae is None:
            return to_uint8(latents)
        return to_uint8(self.vae.apply({"params": params}, latents / self.vae.scaling_factor, method=self.vae.decode))

    def decode(self, latents: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
        """Final latents -> uint8 NHWC images (vae.decode(latents / scaling_factor); a pixel-space
        model's outputs themselves), in chunks of `batch_size` (default all at once)."""
        batch = batch_size or len(latents)
        if batch not in self._decoders:
            self._decoders[batch] = batch_runner.BatchRunner(self._decode, batch, mesh=self.mesh)
        return self._decoders[batch].full(self.params.get("vae"), np.asarray(latents, np.float32))

    def _encode(self, params, images):
        if self.vae is None:
            return images
        # The posterior mean: inversion and reconstruction should not depend on a noise draw.
        return self.vae.apply({"params": params}, images, method=self.vae.encode).mean * self.vae.scaling_factor

    def encode(self, images: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
        """Images NHWC (uint8, or float in [-1, 1]) at a multiple of the VAE factor -> latents
        (vae.encode(images).mean * scaling_factor; a pixel-space model's images themselves)."""
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 127.5 - 1.0
        images = images.astype(np.float32)
        f = self.vae_scale_factor
        if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f:
            raise TextToImageError(f"images to encode must be NHWC with height and width multiples of {f}, "
                                   f"got shape {images.shape}")
        batch = batch_size or len(images)
        if batch not in self._encoders:
            self._encoders[batch] = batch_runner.BatchRunner(self._encode, batch, mesh=self.mesh)
        return self._encoders[batch].full(self.params.get("vae"), images)


# ---------------------------------------------------------------------- runs to a folder


def generate_to_folder(pipe: TextToImage, prompts: Sequence[str], out_dir: str | os.PathLike, *, seed: int = 0,
                       num_steps: int = 1, method: str = "euler", guidance_scale: float = 1.0,
                       negative_prompt: str = "", samples_per_prompt: int = 1, batch_size: int = 1,
                       height: int | None = None, width: int | None = None, save_latents: bool = True,
                       initial_latents: np.ndarray | None = None,
                       control_image: np.ndarray | Sequence[np.ndarray] | None = None,
                       controlnet_scale: float | Sequence[float] = 1.0, progress: bool = True) -> list[dict]:
    """Images of every prompt (see the module docstring for seeds and files); returns the records.

    `control_image` (1, H, W, C) in [0, 1]: steers every image through the attached ControlNet
    (TextToImage.attach_controlnet), its residuals scaled by `controlnet_scale`; with several
    attached, one image each and one scale for all or one each.

    `initial_latents` (N, h, w, c), one per image in run order, replaces the seeded noise,
    e.g. to start from the same x0 as another framework; seeds are then not recorded.
    """
    latent_shape = pipe.latent_shape(height, width)
    records = [{"prompt_index": k, "prompt": prompt, "seed": seed + k, "image_index": i}
               for k, prompt in enumerate(prompts) for i in range(samples_per_prompt)]
    settings = {"seed": seed, "samples_per_prompt": samples_per_prompt}
    if initial_latents is None:
        noise = lambda batch: initial_noise([r["seed"] for r in batch], [r["image_index"] for r in batch],
                                            latent_shape)
    else:
        initial_latents = np.asarray(initial_latents, np.float32)
        if initial_latents.shape != (len(records), *latent_shape):
            raise TextToImageError(f"the initial latents have shape {initial_latents.shape}, but {len(records)} "
                                   f"images of latent shape {latent_shape} (NHWC) are asked for")
        for n, record in enumerate(records):
            record["latent_index"] = n
            del record["seed"]
        noise = lambda batch: initial_latents[[r["latent_index"] for r in batch]]
        settings = {"seed": None, "initial_latents": True, "samples_per_prompt": samples_per_prompt}
    return _render(pipe, records, noise, Path(out_dir), settings, num_steps=num_steps, method=method,
                   guidance_scale=guidance_scale, negative_prompt=negative_prompt, batch_size=batch_size,
                   latent_shape=latent_shape, save_latents=save_latents, progress=progress,
                   control_image=control_image, controlnet_scale=controlnet_scale)


def interpolate_to_folder(pipe: TextToImage, prompts: Sequence[str], out_dir: str | os.PathLike, *,
                          seeds: tuple[int, int], num_frames: int = 8, num_steps: int = 1, method: str = "euler",
                          guidance_scale: float = 1.0, negative_prompt: str = "", batch_size: int = 1,
                          height: int | None = None, width: int | None = None, save_latents: bool = True,
                          progress: bool = True) -> list[dict]:
    """Frames along the slerp from seed A's to seed B's noise (image 0 of each), for every prompt.

    Both seeds serve every prompt (no `+ k` offset), so frame 0 and the last frame are
    the images of one-prompt runs with seed A and seed B. Writes interpolation_KKKKK.png strips.
    """
    if num_frames < 2:
        raise TextToImageError(f"an interpolation needs at least 2 frames, got {num_frames}")
    latent_shape = pipe.latent_shape(height, width)
    ends = initial_noise(list(seeds), [0, 0], latent_shape)
    alphas = np.linspace(0.0, 1.0, num_frames)
    records = [{"prompt_index": k, "prompt": prompt, "seed": seeds[0], "seed_b": seeds[1], "alpha": float(a)}
               for k, prompt in enumerate(prompts) for a in alphas]
    noise = lambda batch: np.stack([slerp(ends[0], ends[1], r["alpha"]) for r in batch])
    out = Path(out_dir)
    records = _render(pipe, records, noise, out, {"interpolate_seeds": list(seeds), "num_frames": num_frames},
                      num_steps=num_steps, method=method, guidance_scale=guidance_scale,
                      negative_prompt=negative_prompt, batch_size=batch_size, latent_shape=latent_shape,
                      save_latents=save_latents, progress=progress)
    for k in range(len(prompts)):
        frames = [np.asarray(Image.open(out / r["file"])) for r in records if r["prompt_index"] == k]
        Image.fromarray(np.concatenate(frames, axis=1)).save(out / f"interpolation_{k:05d}.png")
    return records


def _render(pipe: TextToImage, records: list[dict], noise: Callable[[list[dict]], np.ndarray], out: Path,
            settings: dict, *, num_steps: int, method: str, guidance_scale: float, negative_prompt: str,
            batch_size: int, latent_shape: tuple[int, int, int], save_latents: bool, progress: bool,
            control_image: np.ndarray | Sequence[np.ndarray] | None = None,
            controlnet_scale: float | Sequence[float] = 1.0) -> list[dict]:
    if not records:
        raise TextToImageError("no prompts to sample")
    out.mkdir(parents=True, exist_ok=True)
    batch = max(1, min(batch_size, len(records)))
    rows = pipe.runner(batch, num_steps=num_steps, method=method,
                       guided=sampling.guidance_applies(guidance_scale)).chunk  # whole rows per row shard
    if rows != batch:
        log.warning("a batch of %d images does not split evenly over the mesh's row shards, so it runs as chunks of "
                    "%d, the last one padded: make --config.sample.batch_size a multiple of %d to waste no work",
                    batch, rows, rows)
    x0s, x1s, samples = [], [], []
    negative_ids = pipe.teacher.text.negative_ids(negative_prompt)
    bar = tqdm(range(0, len(records), batch), desc=f"sample -> {out.name}", unit="batch", disable=not progress)
    for start in bar:
        chunk = records[start:start + batch]
        x0 = noise(chunk)
        # The runners pad a short last batch: one compilation per run.
        x1, images = pipe.generate_ids(pipe.tokenize([r["prompt"] for r in chunk]), x0, num_steps=num_steps,
                                       method=method, guidance_scale=guidance_scale, negative_ids=negative_ids,
                                       batch_size=batch, control_image=control_image,
                                       controlnet_scale=controlnet_scale)
        for n, (record, image) in enumerate(zip(chunk, images), start):
            record["file"] = f"{n:05d}.png"
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out / record["file"])
        x0s.append(x0)
        x1s.append(x1)
        samples.append(np.clip(x1, -1.0, 1.0) if pipe.vae is None else images.astype(np.float32) / 127.5 - 1.0)
    if save_latents:
        columns = {key: np.asarray([r[key] for r in records])
                   for key in ("prompt_index", "seed", "seed_b", "image_index", "alpha", "latent_index")
                   if key in records[0]}
        np.savez(out / "latents.npz", x0=np.concatenate(x0s), x1=np.concatenate(x1s), **columns)
    np.savez(out / "samples.npz", x1=np.concatenate(samples).astype(np.float32),
             prompt=np.asarray([r["prompt"] for r in records], dtype=str))
    height, width = latent_shape[0] * pipe.vae_scale_factor, latent_shape[1] * pipe.vae_scale_factor
    guided = sampling.guidance_applies(guidance_scale)
    summary = {"pretrained": pipe.source, "pipeline_class": pipe.pipeline_class,
               "parametrisation": pipe.teacher.parametrisation, "num_steps": num_steps,
               "method": method, "guidance_scale": guidance_scale,
               "negative_prompt": negative_prompt if guided else None,
               "height": height, "width": width, "dtype": jnp.dtype(pipe.unet.dtype).name, "batch_size": batch,
               **pipe.adapters(control=control_image is not None, controlnet_scale=controlnet_scale),
               **settings, "images": records}
    (out / "prompts.json").write_text(json.dumps(summary, indent=2))
    return records
