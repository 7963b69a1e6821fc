"""Text-to-image with Stable-Diffusion-shaped velocity models (2-RF, InstaFlow).

`TextToImage.from_pretrained(folder)` reads a diffusers pipeline folder (model_index.json;
unet/, vae/, text_encoder/, tokenizer/) into our Flax models and transformers'
CLIPTokenizer. Sampling follows InstaFlow's RectifiedFlowPipeline: latents
x0 ~ N(0, I) at t = 0; v(x, t) = unet(x, (1 - t) * 1000, text), so step i of N calls the
UNet at SD timestep (1 - i / N) * 1000; Euler (or Heun) from t = 0 to 1 with
`sampling.integrate`; images = vae.decode(x1 / scaling_factor). With a guidance scale
s > 1 (as in diffusers; s <= 1, 0 included, is the conditional model alone),
v = v_u + s (v_c - v_u), conditional and unconditional halves in one UNet call.
Text encoding, the ODE and decoding run in one jit, compiled once per
(batch, steps, method, latent size, guidance on/off).

Only velocity UNets are sampled: a folder is taken as one when its model_index.json
names RectifiedFlowPipeline (the released 2-RF and InstaFlow folders, and our exports),
or when the caller vouches for it with prediction_type="velocity". A plain Stable
Diffusion folder predicts noise and is refused (see `check_velocity_folder`).

Seeds: prompt k of a run uses seed `seed + k`, and its image i starts from
x0 = normal(fold_in(key(seed + k), i)). An image thus depends on its prompt, seed and
index only, never on the batch it ran in or on the prompts around it: prompt k of a
file is reproduced by a one-prompt run with seed `seed + k`.

What `generate_to_folder` and `interpolate_to_folder` write in the output folder:
  NNNNN.png                 one image each, numbered in run order (prompt-major)
  latents.npz               x0 (initial noise) and x1 (final latents), float32 NHWC, with
                            prompt_index and seed, plus image_index or alpha per image
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

from rectflow_jax import parallel, sampling
from rectflow_jax.models.clip_text import CLIPTextModel
from rectflow_jax.models.sd_unet import UNet2DConditionModel
from rectflow_jax.models.vae import AutoencoderKL
from rectflow_jax.weights import WeightLoadError, resolve_folder

log = logging.getLogger("rectflow")

# model_index.json component -> the classes we can load for it.
COMPONENTS = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
              "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast")}
LOADERS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
# Pipelines whose UNet is a velocity field under our convention; others (SD's own) predict noise.
VELOCITY_PIPELINES = ("RectifiedFlowPipeline",)
# auto: velocity only if model_index.json names a velocity pipeline; velocity: the caller vouches.
PREDICTION_TYPES = ("auto", "velocity")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The scheduler an export writes when its source folder had none. Neither our sampler nor
# InstaFlow's RectifiedFlowPipeline steps with it (that pipeline reads only its
# init_noise_sigma, 1, and order, 1); it is SD 1.5's, as in the released 2-RF and InstaFlow
# folders, so that diffusers loads the whole folder. model_index.json's _class_name,
# not this, says that the UNet predicts velocity.
DEFAULT_SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000,
                     "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


class TextToImageError(ValueError):
    """A text-to-image request that cannot be served as asked (dtype, image size, seeds, frames)."""


def compute_dtype(name: str) -> Any:
    if name not in DTYPES:
        raise TextToImageError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """model_index.json of a pipeline folder, checked to name components we can load."""
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
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightLoadError(f"{str(path)!r} is not valid JSON: {err}") from err


def check_velocity_folder(folder: str | os.PathLike, index: dict[str, Any], scheduler: dict[str, Any] | None,
                          prediction_type: str = "auto") -> None:
    """Refuses a folder whose UNet is not known to predict our velocity.

    The released 2-RF and InstaFlow folders keep SD 1.5's scheduler config (epsilon, which
    their pipeline never uses) and say what they are only by model_index.json's _class_name,
    RectifiedFlowPipeline; our export writes the same. Any other pipeline, e.g. a plain
    StableDiffusionPipeline (epsilon or v-prediction in diffusion time), would be sampled
    into noise, so 'auto' refuses it; 'velocity' is the caller vouching for the UNet (e.g.
    InstaFlow re-saved by diffusers' StableDiffusionPipeline, which renames the class).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise TextToImageError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                               f"got {prediction_type!r}")
    pipeline_class = index.get("_class_name") or "pipeline"
    if prediction_type == "velocity" or pipeline_class in VELOCITY_PIPELINES:
        return
    scheduler = scheduler or {}
    predicts = scheduler.get("prediction_type", "epsilon")  # diffusers' default when unset
    raise WeightLoadError(
        f"{str(folder)!r} is a {pipeline_class} whose scheduler ({scheduler.get('_class_name', 'none')}) predicts "
        f"{predicts!r}, not a rectified-flow velocity ({', '.join(VELOCITY_PIPELINES)}): sampling it here would "
        "give noise, and noise-prediction models are not supported yet. If its UNet does predict velocity "
        "(2-RF, InstaFlow), say so with --config.sample.prediction_type=velocity (prediction_type='velocity')")


def load_tokenizer(folder: str | os.PathLike):
    """transformers' CLIPTokenizer from `folder`/tokenizer (vocab.json + merges.txt, or tokenizer.json)."""
    from transformers import CLIPTokenizer  # transformers is slow to import; only pipelines need it

    path = Path(folder) / "tokenizer"
    if not path.is_dir():
        raise WeightLoadError(f"subfolder 'tokenizer' is missing from {str(folder)!r}")
    try:
        return CLIPTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises OSError, ValueError, TypeError... for a broken folder
        raise WeightLoadError(f"{str(path)!r} is not a readable CLIP tokenizer: {err}") from err


def unet_velocity(unet: UNet2DConditionModel, params: Any, x: jax.Array, t: jax.Array,
                  context: jax.Array) -> jax.Array:
    """The velocity of an SD-initialised flow: the UNet at SD timestep (1 - t) * 1000."""
    return unet.apply({"params": params}, x, (1.0 - t) * 1000.0, context)


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
    """A loaded pipeline folder: the three Flax models, their params, the tokenizer, compiled samplers."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer,
                 params: dict[str, Any], *, pipeline_class: str = VELOCITY_PIPELINES[0], source: str = "",
                 mesh: jax.sharding.Mesh | None = None, scheduler_config: dict[str, Any] | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        # Data parallel over this host's devices: params on every device (put once, not per
        # call), and each batch that divides evenly split across them.
        self.mesh = mesh or parallel.make_mesh(devices=jax.local_devices())
        self.params = jax.device_put(params, parallel.replicated(self.mesh))
        # The first device's copy, for batches that do not split (a view, not a copy).
        self._one_device_params = jax.tree.map(lambda a: a.addressable_shards[0].data, self.params)
        self.pipeline_class, self.source = pipeline_class, source
        self.scheduler_config = scheduler_config  # kept only to be written back on export
        self._compiled: dict[tuple, Callable] = {}
        self.traces = 0  # how often the sampler was traced: one per compilation
        self._check_compatible()

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: str = "float32", allow_pickle: bool = False,
                        mesh: jax.sharding.Mesh | None = None, prediction_type: str = "auto") -> "TextToImage":
        """Loads unet/, vae/, text_encoder/ and tokenizer/, computing in `dtype` and storing the params in it.

        bfloat16 params, as diffusers' `torch_dtype=torch.bfloat16`, halve the memory and
        spare every call a cast of the ~1B float32 weights. A folder whose UNet is not
        known to predict velocity is refused (`check_velocity_folder`) before any weight is read.
        """
        index = read_model_index(folder)
        scheduler = read_scheduler_config(folder)
        check_velocity_folder(folder, index, scheduler, prediction_type)
        kind = compute_dtype(dtype)
        mesh = mesh or parallel.make_mesh(devices=jax.local_devices())
        models, params = {}, {}
        for name, loader in LOADERS.items():
            try:  # placed where __init__ wants them: no second upload
                models[name], params[name] = loader.from_pretrained(folder, name, dtype=kind, param_dtype=kind,
                                                                      allow_pickle=allow_pickle,
                                                                      shardings=parallel.replicated(mesh))
            except NotImplementedError as err:
                raise WeightLoadError(f"{str(resolve_folder(folder, name))!r}: {err}") from err
        pipeline_class = index.get("_class_name", "")
        if pipeline_class not in VELOCITY_PIPELINES:
            log.info("%s is a %s; sampling its UNet as a velocity field, as asked (prediction_type=velocity)",
                     folder, pipeline_class or "pipeline")
        return cls(models["unet"], models["vae"], models["text_encoder"], load_tokenizer(folder), params,
                   pipeline_class=pipeline_class, source=str(folder), mesh=mesh, scheduler_config=scheduler)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Writes a whole pipeline folder (float32 safetensors) that diffusers, transformers and we load back.

        Laid out as the released InstaFlow folders: a RectifiedFlowPipeline (what we sample is
        always a velocity field, whatever the source folder was called), a scheduler that
        diffusers needs but the sampler ignores, and no safety checker or feature extractor.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name, model in (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder)):
            model.save_pretrained(self.params[name], out / name)
        self.tokenizer.save_pretrained(out / "tokenizer")
        scheduler = self.scheduler_config if (self.scheduler_config or {}).get("_class_name") else DEFAULT_SCHEDULER
        (out / "scheduler").mkdir(exist_ok=True)
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
        index = {"_class_name": VELOCITY_PIPELINES[0], "scheduler": ["diffusers", scheduler["_class_name"]],
                 "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
                 **{name: [("diffusers" if name in ("unet", "vae") else "transformers"), classes[0]]
                    for name, classes in COMPONENTS.items()}}
        (out / "model_index.json").write_text(json.dumps(index, indent=2))
        return out

    def _check_compatible(self) -> None:
        width, context = self.text_encoder.hidden_size, self.unet.cross_attention_dim
        if (context if isinstance(context, int) else context[0]) != width:
            raise WeightLoadError(f"the UNet attends to {context}-wide text but the text encoder gives {width}")
        if self.unet.in_channels != self.vae.latent_channels:
            raise WeightLoadError(f"the UNet takes {self.unet.in_channels} latent channels, the VAE has "
                                  f"{self.vae.latent_channels}")

    # ------------------------------------------------------------------ sizes and inputs

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

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
        length = min(self.tokenizer.model_max_length, self.text_encoder.max_position_embeddings)
        for k, full in enumerate(self.tokenizer(list(prompts), truncation=False).input_ids):
            if len(full) > length:
                log.warning("prompt %d is %d tokens long; the text encoder reads only the first %d, as in "
                            "diffusers, and the rest is dropped", k, len(full), length)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                             return_tensors="np").input_ids
        return ids.astype(np.int32)

    # ------------------------------------------------------------------ sampling

    def generate(self, prompts: Sequence[str], x0: np.ndarray, *, num_steps: int, guidance_scale: float = 1.0,
                 negative_prompt: str = "", method: str = "euler") -> tuple[np.ndarray, np.ndarray]:
        """One batch: prompts[i] from noise x0[i] -> (final latents float32, images uint8 NHWC)."""
        return self.generate_ids(self.tokenize(prompts), x0, num_steps=num_steps, guidance_scale=guidance_scale,
                                 negative_ids=self.tokenize([negative_prompt]), method=method)

    def generate_ids(self, ids: np.ndarray, x0: np.ndarray, *, num_steps: int, guidance_scale: float = 1.0,
                     negative_ids: np.ndarray | None = None, method: str = "euler") -> tuple[np.ndarray, np.ndarray]:
        """`generate` from token ids (N, L) and, when guided, the negative prompt's ids (1, L).

        `method` is an ODE stepper of `sampling` (euler, as InstaFlow's pipeline, or heun).
        """
        sampling.check_method(method)
        x0 = np.asarray(x0, np.float32)
        ids = np.asarray(ids, np.int32)
        if len(ids) != len(x0):
            raise ValueError(f"{len(ids)} prompts for {len(x0)} noise tensors")
        guided = sampling.guidance_applies(guidance_scale)
        if guided and negative_ids is None:
            raise ValueError("guidance_scale > 1 needs the negative prompt's ids")
        negative_ids = np.asarray(ids[:1] if negative_ids is None else negative_ids, np.int32)  # unused unguided
        if self.splits(len(x0)):
            x0, ids = jax.device_put((x0, ids), parallel.batch_sharding(self.mesh))
            negative_ids, params = jax.device_put(negative_ids, parallel.replicated(self.mesh)), self.params
        else:
            params = self._one_device_params
        inputs = (params, x0, ids, negative_ids, np.float32(guidance_scale))
        key = (x0.shape, ids.shape, num_steps, method, guided)
        if key not in self._compiled:
            sample = functools.partial(self._sample, num_steps=num_steps, method=method, guided=guided)
            self._compiled[key] = jax.jit(sample).lower(*inputs).compile()
        latents, images = self._compiled[key](*inputs)
        return np.asarray(latents), np.asarray(images)

    def splits(self, batch: int) -> bool:
        """Whether a batch of this size runs split over the mesh (else on one device)."""
        return self.mesh.size > 1 and batch % self.mesh.size == 0

    def _sample(self, params, x0, ids, negative_ids, guidance_scale, *, num_steps: int, method: str, guided: bool):
        self.traces += 1  # Python side effect: runs once per trace
        encode = lambda tokens: self.text_encoder.apply({"params": params["text_encoder"]}, tokens)
        if guided:
            text = encode(jnp.concatenate([ids, negative_ids]))  # one CLIP call for both
            context = jnp.concatenate([text[:-1], jnp.broadcast_to(text[-1:], text[:-1].shape)])
            velocity = sampling.classifier_free_guidance_batched(
                lambda x, t: unet_velocity(self.unet, params["unet"], x, t, context), guidance_scale)
        else:
            context = encode(ids)
            velocity = lambda x, t: unet_velocity(self.unet, params["unet"], x, t, context)
        x1 = sampling.integrate(velocity, x0, num_steps, method=method).x1
        images = self.vae.apply({"params": params["vae"]}, x1 / self.vae.scaling_factor, method=self.vae.decode)
        return x1, to_uint8(images)


# ---------------------------------------------------------------------- runs to a folder


def generate_to_folder(pipe: TextToImage, prompts: Sequence[str], out_dir: str | os.PathLike, *, seed: int = 0,
                       num_steps: int = 1, method: str = "euler", guidance_scale: float = 1.0,
                       negative_prompt: str = "", images_per_prompt: int = 1, batch_size: int = 1,
                       height: int | None = None, width: int | None = None, save_latents: bool = True,
                       progress: bool = True) -> list[dict]:
    """Images of every prompt (see the module docstring for seeds and files); returns the records."""
    latent_shape = pipe.latent_shape(height, width)
    records = [{"prompt_index": k, "prompt": prompt, "seed": seed + k, "image_index": i}
               for k, prompt in enumerate(prompts) for i in range(images_per_prompt)]
    noise = lambda batch: initial_noise([r["seed"] for r in batch], [r["image_index"] for r in batch], latent_shape)
    settings = {"seed": seed, "images_per_prompt": images_per_prompt}
    return _render(pipe, records, noise, Path(out_dir), settings, num_steps=num_steps, method=method,
                   guidance_scale=guidance_scale, negative_prompt=negative_prompt, batch_size=batch_size,
                   latent_shape=latent_shape, save_latents=save_latents, progress=progress)


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
            batch_size: int, latent_shape: tuple[int, int, int], save_latents: bool, progress: bool) -> list[dict]:
    if not records:
        raise TextToImageError("no prompts to sample")
    out.mkdir(parents=True, exist_ok=True)
    batch = max(1, min(batch_size, len(records)))
    if pipe.mesh.size > 1 and not pipe.splits(batch):
        log.warning("a batch of %d images does not split over %d devices, so one device renders it: make "
                    "--config.sample.batch_size a multiple of %d to use them all", batch, pipe.mesh.size,
                    pipe.mesh.size)
    x0s, x1s = [], []
    bar = tqdm(range(0, len(records), batch), desc=f"sample -> {out.name}", unit="batch", disable=not progress)
    for start in bar:
        chunk = records[start:start + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))  # a fixed batch shape: one compilation per run
        x0 = noise(padded)
        x1, images = pipe.generate([r["prompt"] for r in padded], x0, num_steps=num_steps, method=method,
                                   guidance_scale=guidance_scale, negative_prompt=negative_prompt)
        for n, (record, image) in enumerate(zip(chunk, images), start):
            record["file"] = f"{n:05d}.png"
            Image.fromarray(image).save(out / record["file"])
        x0s.append(x0[:len(chunk)])
        x1s.append(x1[:len(chunk)])
    if save_latents:
        columns = {key: np.asarray([r[key] for r in records])
                   for key in ("prompt_index", "seed", "seed_b", "image_index", "alpha") if key in records[0]}
        np.savez(out / "latents.npz", x0=np.concatenate(x0s), x1=np.concatenate(x1s), **columns)
    height, width = latent_shape[0] * pipe.vae_scale_factor, latent_shape[1] * pipe.vae_scale_factor
    guided = sampling.guidance_applies(guidance_scale)
    summary = {"pretrained": pipe.source, "pipeline_class": pipe.pipeline_class, "num_steps": num_steps,
               "method": method, "guidance_scale": guidance_scale,
               "negative_prompt": negative_prompt if guided else None,
               "height": height, "width": width, "dtype": jnp.dtype(pipe.unet.dtype).name, "batch_size": batch,
               **settings, "images": records}
    (out / "prompts.json").write_text(json.dumps(summary, indent=2))
    return records
