"""Teachers: anything with a velocity field to integrate, behind one loader.

- `VelocityTeacher`: a stage directory of ours (MLP, DDPM++ UNet). The checkpoint metadata
  carries its model and data configs, so a later stage, the pair generator, the sampler
  and the evaluator rebuild the network from the checkpoint alone and read only its
  EMA params.
- `SDTeacher`: a text-to-latent ODE with a Stable Diffusion UNet: a diffusers folder of
  either kind (velocity: 2-RF, InstaFlow; diffusion: SD's epsilon / v-prediction, solved
  by DDIM or DPM-Solver++ through rectflow_jax.diffusion), or a stage of ours trained
  with model 'sd_unet'. `solve(params, x0, ids, negative_ids, scale, method=, num_steps=,
  guided=)` is traceable: pairs, sampling and text-to-image jit it.
`load_teacher(path)` tells them apart. A teacher whose output becomes another stage's
input (pairs, a student's init) must be finished and traceable: a stage is named by
(run hash, step), a folder by a fingerprint of its files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from rectflow_jax import checkpoint, diffusion, models, parallel, sampling, sd_folder, storage, train, weights
from rectflow_jax.data import datasets
from rectflow_jax.models.clip_text import CLIPTextModel
from rectflow_jax.models.sd_unet import UNet2DConditionModel
from rectflow_jax.models.sd_velocity import SDVelocity
from rectflow_jax.text_conditioner import TextConditioner
from rectflow_jax.weights import WeightLoadError

# The time grid each method integrates a diffusion UNet on: DDIM's own (diffusers'
# DDIMScheduler), and DPM-Solver++'s (DPMSolverMultistepScheduler, to the data) for the others.
DIFFUSION_GRIDS = {"ddim": "ddim", "dpm_solver++": "dpm_solver++", "euler": "dpm_solver++", "heun": "dpm_solver++"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Steppers that run backwards in time as well (inversion); DPM-Solver++'s history runs forwards only.
INVERTIBLE_METHODS = ("euler", "heun", "ddim")


class IncompatibleTeacher(ValueError):
    """A checkpoint's data, source or state does not fit what the caller does with it."""


@dataclasses.dataclass
class VelocityTeacher:
    stage_dir: Path
    model: nn.Module
    params: Any
    shape: tuple[int, ...]
    num_classes: int
    meta: dict
    step: int

    @property
    def apply_velocity(self) -> Callable:
        return train.velocity_apply(self.model)

    @property
    def data_config(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(self.meta["data"])

    @property
    def dataset(self) -> datasets.Dataset:
        """The data (and so the source pi0) the teacher was trained on."""
        return datasets.get_dataset(self.data_config)


def source_spec_of(meta: dict) -> str:
    """The source distribution a stage was trained from, read from its stored data config."""
    return datasets.get_dataset(ml_collections.ConfigDict(meta["data"])).source_spec


def finished_provenance(stage_dir: str | Path, meta: dict | None = None, step: int | None = None) -> dict:
    """{'run_hash', 'step'} naming a finished stage's checkpoint, its identity as a teacher.

    Refuses a stage still training (or stopped early) and one written before run hashes.
    """
    if meta is None:
        meta, step = checkpoint.read_meta(stage_dir)
    if "run_hash" not in meta:
        raise IncompatibleTeacher(f"teacher {str(stage_dir)!r} was written by an older rectflow_jax (no run_hash "
                                  "in its metadata), so its pairs or students could not be traced; retrain it")
    if step < int(meta["num_steps"]):
        raise IncompatibleTeacher(f"teacher {str(stage_dir)!r} is at step {step} of {meta['num_steps']} (still "
                                  "training, or stopped): finish it before using it as a teacher")
    return {"run_hash": str(meta["run_hash"]), "step": int(step)}


def load_velocity_teacher(stage_dir: str | Path, *, expected_shape: tuple[int, ...] | None = None,
                          expected_num_classes: int | None = None, expected_source: str | None = None,
                          finished: bool = False, mesh: Mesh | None = None, rules=None) -> VelocityTeacher:
    """Model and EMA params of a stage's latest checkpoint, after checking it fits the caller.

    `expected_source`: the caller's `Dataset.source_spec`; the teacher's flow starts from
    the source it was trained on, so another one is refused. `finished`: refuse a stage that
    is still training (see `finished_provenance`), as every stage reading a teacher must.
    `mesh`: the params are restored straight into their shardings on it by the logical
    `rules` (default parallel.logical_rules()), each process reading only its shards, so a
    teacher larger than one device loads sharded; without, on the default device.
    """
    meta, step = checkpoint.read_meta(stage_dir)
    shape, num_classes = tuple(meta["shape"]), int(meta["num_classes"])
    if expected_shape is not None and tuple(expected_shape) != shape:
        raise IncompatibleTeacher(f"teacher {str(stage_dir)!r} models data of shape {shape}, "
                                  f"but this config's data has shape {tuple(expected_shape)}")
    if expected_num_classes is not None and expected_num_classes != num_classes:
        raise IncompatibleTeacher(f"teacher {str(stage_dir)!r} has {num_classes} classes, "
                                  f"but this config's data has {expected_num_classes}")
    if expected_source is not None and (source := source_spec_of(meta)) != expected_source:
        raise IncompatibleTeacher(f"teacher {str(stage_dir)!r} flows from the source {source!r} "
                                  f"(data {meta['data'].get('name')!r}), but this config's source is "
                                  f"{expected_source!r}; use the teacher's data config")
    if finished:
        finished_provenance(stage_dir, meta, step)
    model = models.build_velocity_model(meta["model"], shape, num_classes)
    params = checkpoint.restore_params(stage_dir, train.abstract_params(model, shape, num_classes, mesh,
                                                                        _rules(mesh, rules)))
    return VelocityTeacher(storage.path(stage_dir), model, params, shape, num_classes, meta, step)


# ----------------------------------------------------------------------------- SD teachers


class Control(NamedTuple):
    """What one ControlNet adds to a solve: its params, the control image (1 or B, H, W, C) in
    [0, 1] at the output size, and the residuals' scale (diffusers' controlnet_conditioning_scale).
    A solve takes a sequence of them, one per attached ControlNet, in order."""
    params: Any
    image: jax.Array
    scale: jax.Array


@dataclasses.dataclass
class SDTeacher:
    unet: UNet2DConditionModel
    text: TextConditioner
    params: dict            # {'unet': ..., 'text_encoder': ...}
    parametrisation: str    # 'velocity' or a diffusion prediction type (sd_folder.parametrisation)
    scheduler_config: dict | None
    pretrained: str         # the folder holding its VAE, text encoder and tokenizer; '' for a pixel-space
                            # model of ours (its text encoder and tokenizer are in its stage)
    source: str             # what it was loaded from (a folder or a stage directory)
    provenance: dict        # {'run_hash', 'step'}: a stage's checkpoint, or 'folder:<fingerprint>' and 0
    controlnets: tuple = ()  # ControlNetModels whose residuals, from `Control` inputs, feed the UNet

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.sample_size
        if size is None:
            raise WeightLoadError(f"{self.source!r}: the UNet config has no sample_size; give the latent size")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(h), int(w), int(self.unet.in_channels)

    @property
    def is_velocity(self) -> bool:
        return self.parametrisation == "velocity"

    def schedule(self, method: str) -> diffusion.Schedule | None:
        """The diffusion schedule `method` integrates on (None for a velocity UNet)."""
        sampling.check_method(method)
        if self.is_velocity:
            return None
        return diffusion.schedule_for(self.scheduler_config, DIFFUSION_GRIDS[method],
                                      where=f"{self.source}/scheduler/scheduler_config.json")

    def time_grid(self, method: str, num_steps: int) -> np.ndarray:
        """Our times (N + 1,): uniform on [0, 1] for a velocity UNet, the scheduler's otherwise."""
        schedule = self.schedule(method)
        if schedule is None:
            if not num_steps or num_steps < 1:
                raise sampling.SamplerError(f"num_steps must be a positive integer, got {num_steps!r}")
            return np.linspace(0.0, 1.0, int(num_steps) + 1, dtype=np.float32)
        try:
            return diffusion.time_grid(schedule, num_steps)
        except diffusion.ScheduleError as err:
            raise sampling.SamplerError(str(err)) from None

    def velocity(self, unet_params: Any, schedule: diffusion.Schedule | None, y: jax.Array, t: jax.Array,
                 context: jax.Array, control: Sequence[Control] | None = None) -> jax.Array:
        """v(y, t | context) in our time; a diffusion UNet after the change of variables.

        `control`, one `Control` per attached ControlNet: their residuals, summed, join the UNet's
        skips, each computed from the same sample, timestep and text (diffusers'
        StableDiffusionControlNetPipeline and its MultiControlNetModel, without guess mode).
        """
        if schedule is None:
            x, timesteps = y, (1.0 - t) * 1000.0
        else:
            x, timesteps = diffusion.from_rf(y, t), diffusion.diffusion_timestep(schedule, t)
        residuals = {}
        if control:
            if len(control) != len(self.controlnets):
                raise IncompatibleTeacher(f"{self.source!r}: {len(control)} control inputs for "
                                          f"{len(self.controlnets)} attached ControlNets")
            outputs = [controlnet.apply({"params": c.params}, x, timesteps, context,
                                        jnp.broadcast_to(c.image, (x.shape[0], *c.image.shape[1:])), c.scale)
                       for controlnet, c in zip(self.controlnets, control)]
            down, mid = jax.tree.map(lambda *residuals: sum(residuals), *outputs)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        output = self.unet.apply({"params": unet_params}, x, timesteps, context, **residuals)
        if schedule is None:
            return output
        return diffusion.velocity_from_prediction(schedule.prediction_type, output, y, t)

    def field(self, params: Any, ids: jax.Array, negative_ids: jax.Array, guidance_scale: jax.Array,
              schedule: diffusion.Schedule | None, *, guided: bool,
              control: Sequence[Control] | None = None) -> sampling.VelocityFn:
        """The velocity field (y, t) -> v that every solve, inversion and trajectory integrates.

        With `guided` (callers decide by sampling.guidance_applies), v = v_u + s (v_c - v_u)
        with the negative prompt's ids (1, L) as the unconditional text, both halves in
        one UNet call; for a diffusion UNet that is guidance on its output, as in diffusers.
        """
        if guided:
            text = self.text.encode(params["text_encoder"], jnp.concatenate([ids, negative_ids]))
            context = jnp.concatenate([text[:-1], jnp.broadcast_to(text[-1:], text[:-1].shape)])
        else:
            context = self.text.encode(params["text_encoder"], ids)
        field = lambda y, t: self.velocity(params["unet"], schedule, y, t, context, control)
        if guided:
            field = sampling.classifier_free_guidance_batched(field, guidance_scale)
        return field

    def solve(self, params: Any, x0: jax.Array, ids: jax.Array, negative_ids: jax.Array, guidance_scale: jax.Array,
              *, method: str, num_steps: int, guided: bool, control: Sequence[Control] | None = None) -> jax.Array:
        """Noise x0 (NHWC, N(0, I)) -> the final latent, as the folder's pipeline would make it (see `field`)."""
        schedule = self.schedule(method)
        end = self.solution(params, x0, ids, negative_ids, guidance_scale, method=method, num_steps=num_steps,
                            guided=guided, control=control).x1
        return end if schedule is None else diffusion.from_rf(end, self.time_grid(method, num_steps)[-1])

    def solution(self, params: Any, x0: jax.Array, ids: jax.Array, negative_ids: jax.Array,
                 guidance_scale: jax.Array, *, method: str, num_steps: int, guided: bool,
                 return_trajectory: bool = False, control: Sequence[Control] | None = None) -> sampling.Solution:
        """`solve`'s ODE solution in rectified-flow coordinates (y, t), with its trajectory if asked:
        what straightness is measured on, for either kind of UNet."""
        schedule = self.schedule(method)
        times = jnp.asarray(self.time_grid(method, num_steps))
        field = self.field(params, ids, negative_ids, guidance_scale, schedule, guided=guided, control=control)
        start = x0 if schedule is None else diffusion.to_rf(x0, times[0])
        return sampling.integrate(field, start, method=method, times=times, return_trajectory=return_trajectory)

    def invert(self, params: Any, x1: jax.Array, ids: jax.Array, negative_ids: jax.Array, guidance_scale: jax.Array,
               *, method: str, num_steps: int, guided: bool, control: Sequence[Control] | None = None,
               refine: int = 0) -> jax.Array:
        """A final latent x1 -> the noise x0 that `solve` (same settings) carries back to it, approximately.

        The same field integrated over the same grid, backwards from t = 1 to t = 0. For a
        diffusion UNet on DDIM's grid this is DDIM inversion (Euler in rectified-flow
        coordinates, see rectflow_jax.diffusion); a straight flow needs few steps. `refine` K > 0
        takes the steps implicitly (K fixed-point iterations each), so that `solve`'s own
        forward steps land back on x1 where the iteration converges.
        """
        if method not in INVERTIBLE_METHODS:
            raise sampling.SamplerError(f"inversion integrates backwards with one of {', '.join(INVERTIBLE_METHODS)}; "
                                        f"{method!r} is a multistep solver whose history runs forwards only")
        schedule = self.schedule(method)
        times = jnp.asarray(self.time_grid(method, num_steps)[::-1].copy())
        field = self.field(params, ids, negative_ids, guidance_scale, schedule, guided=guided, control=control)
        start = x1 if schedule is None else diffusion.to_rf(x1, times[0])
        end = sampling.integrate(field, start, method=method, times=times, implicit_iterations=refine).x1
        return end if schedule is None else diffusion.from_rf(end, times[-1])


def load_sd_teacher(path: str | Path, *, dtype: str = "float32", prediction_type: str = "auto",
                    allow_pickle: bool = False, mesh: Mesh | None = None, rules=None, finished: bool = False,
                    clip_skip: int | None = None) -> SDTeacher:
    """An SD folder (either kind) or a stage trained with model 'sd_unet', as an SDTeacher.

    `mesh`: the params go straight into their shardings on it by the logical `rules`
    (default parallel.logical_rules()): a folder's tensors each placed so as read, a
    stage restored by Orbax into them, so a teacher larger than one device loads sharded
    ('fsdp', 'tensor' axes) and a mesh of 'data' alone replicates it; without a mesh, on
    the default device. `clip_skip`: text-encoder layers skipped at the end (diffusers'
    clip_skip); a stage uses the one it was trained with unless told otherwise.
    """
    if dtype not in DTYPES:
        raise sampling.SamplerError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    kind = DTYPES[dtype]
    rules = _rules(mesh, rules)
    if sd_folder.is_pipeline_folder(path):
        index = sd_folder.read_model_index(path)
        scheduler = sd_folder.read_scheduler_config(path)
        parametrisation = sd_folder.parametrisation(path, index, scheduler, prediction_type)
        unet, unet_params = UNet2DConditionModel.from_pretrained(
            path, "unet", dtype=kind, param_dtype=kind, allow_pickle=allow_pickle,
            shardings=folder_shardings(UNet2DConditionModel, path, "unet", mesh, rules, kind))
        provenance = {"run_hash": f"folder:{sd_folder.fingerprint(path)}", "step": 0}
        pretrained, params = str(path), {"unet": unet_params}
        trained_skip = 0
        text_encoder, params["text_encoder"] = CLIPTextModel.from_pretrained(
            path, "text_encoder", dtype=kind, param_dtype=kind, allow_pickle=allow_pickle,
            shardings=folder_shardings(CLIPTextModel, path, "text_encoder", mesh, rules, kind))
        tokenizer = sd_folder.load_tokenizer(path)
    else:
        meta, step = checkpoint.read_meta(path)
        if meta.get("model", {}).get("name") != "sd_unet":
            raise IncompatibleTeacher(f"{str(path)!r} is a stage of model {meta.get('model', {}).get('name')!r}, "
                                      "not a text-to-image model ('sd_unet')")
        if finished:
            finished_provenance(path, meta, step)
        stored = {k: v for k, v in meta["model"].items() if k != "name"}
        model = SDVelocity.from_model_config(stored)  # as trained: the checkpoint's parameter dtype
        abstract = train.abstract_params(model, tuple(meta["shape"]), int(meta["num_classes"]), mesh, rules)
        # The cast to the compute dtype keeps each array's sharding (and is none when the dtypes agree).
        restored = jax.tree_util.tree_map(lambda a: jnp.asarray(a, kind), checkpoint.restore_params(path, abstract))
        computing = SDVelocity.from_model_config(stored | {"dtype": dtype, "param_dtype": dtype})
        unet, params = computing.unet, {"unet": restored["unet"]}
        provenance = {"run_hash": str(meta.get("run_hash", "")), "step": int(step)}
        trained_skip = model.clip_skip
        # A diffusion stage (flow.objective 'diffusion') is sampled on the schedule it was trained on.
        scheduler = _trained_schedule(meta)
        parametrisation = scheduler["prediction_type"] if scheduler else "velocity"
        if model.text_encoder_from_folder:
            pretrained = str(meta["model"]["pretrained"])
            scheduler = scheduler or sd_folder.read_scheduler_config(pretrained)
            text_encoder, params["text_encoder"] = CLIPTextModel.from_pretrained(
                pretrained, "text_encoder", dtype=kind, param_dtype=kind, allow_pickle=allow_pickle,
                shardings=folder_shardings(CLIPTextModel, pretrained, "text_encoder", mesh, rules, kind))
            tokenizer = sd_folder.load_tokenizer(pretrained)
        else:  # trained with the UNet: in the checkpoint, its tokenizer in the stage
            pretrained, text_encoder = "", computing.text_encoder
            params["text_encoder"] = restored["text_encoder"]
            tokenizer = sd_folder.load_tokenizer(path)
    text = TextConditioner(tokenizer, text_encoder, clip_skip=trained_skip if clip_skip is None else clip_skip)
    width, context = text_encoder.hidden_size, unet.cross_attention_dim
    if (context if isinstance(context, int) else context[0]) != width:
        raise WeightLoadError(f"{str(path)!r}: the UNet attends to {context}-wide text but the text encoder gives {width}")
    return SDTeacher(unet, text, params, parametrisation, scheduler, pretrained, str(path), provenance)


def _rules(mesh: Mesh | None, rules):
    return None if mesh is None else (parallel.logical_rules() if rules is None else rules)


def folder_shardings(cls, folder: str | Path, subfolder: str, mesh: Mesh | None, rules, dtype) -> Any:
    """The NamedShardings of a folder's module params on `mesh` by the logical rules (None without a
    mesh), from its config alone: what `from_pretrained(shardings=)` places each tensor by as it is read."""
    if mesh is None:
        return None
    module = cls.from_config(weights.read_config(weights.resolve_folder(folder, subfolder)), dtype=dtype,
                             param_dtype=dtype)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]
    return parallel.param_shardings(boxed, mesh, _rules(mesh, rules))


def _trained_schedule(meta: dict) -> dict | None:
    """The scheduler config a stage of flow.objective 'diffusion' trained on; None for a velocity stage."""
    return meta.get("run", {}).get("flow", {}).get("diffusion")


def stage_parametrisation(stage_dir: str | Path) -> str:
    """'velocity', or the prediction type of a stage trained on flow.objective 'diffusion'."""
    scheduler = _trained_schedule(checkpoint.read_meta(stage_dir)[0])
    return scheduler["prediction_type"] if scheduler else "velocity"


def is_sd_teacher(path: str | Path) -> bool:
    """Whether `path` is a diffusers folder or a stage of model 'sd_unet' (else: one of our velocity stages)."""
    if sd_folder.is_pipeline_folder(path):
        return True
    if not (storage.path(path) / "checkpoints").is_dir():
        raise IncompatibleTeacher(f"teacher {str(path)!r} is neither a rectflow stage directory (checkpoints/) "
                                  "nor a diffusers pipeline folder (model_index.json)")
    meta, _ = checkpoint.read_meta(path)
    return meta.get("model", {}).get("name") == "sd_unet"


def teacher_provenance(path: str | Path) -> dict:
    """{'run_hash', 'step'} naming a finished teacher: a stage's checkpoint or a folder's fingerprint."""
    if sd_folder.is_pipeline_folder(path):
        sd_folder.read_model_index(path)
        return {"run_hash": f"folder:{sd_folder.fingerprint(path)}", "step": 0}
    return finished_provenance(path)
