"""The `rectflow` command: `rectflow <command> [flags]`; `rectflow <command> --help` for each.

  train     1-RF from data, or k-RF (reflow) from a teacher's pairs
  pairs     reflow couplings (x0, x1) from a stage's ODE
  distill   a one-step student on a teacher's pairs
  sample    samples of a stage, or text-to-image from a diffusers folder (SD, 2-RF, InstaFlow)
  eval      a stage's metrics at several step counts
  invert    image -> noise: the ODE backwards from an image (DDIM inversion for SD), and its reconstruction
  export    a text-to-image stage as a diffusers folder
  pipeline  1-RF -> pairs -> 2-RF -> pairs -> distill, and a report (text-to-image: from an SD teacher)

Any config value can be overridden: --config.train.num_steps=500. Bad input (a missing
flag, a bad config value, a foreign folder) is one line on stderr and exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_BASE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configlib.py")
# Defaults to the base config so that `sample --pretrained` needs no config file.
_CONFIG = config_flags.DEFINE_config_file("config", _BASE_CONFIG, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Stage directory to write (train, distill) or pipeline root.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A stage directory to read (teacher, sampler, eval).")
_PAIRS = flags.DEFINE_string("pairs", None, "A pair directory written by `rectflow pairs`.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bars.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "sample, eval: a diffusers pipeline folder (SD, 2-RF, "
                                  "InstaFlow).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "sample (a folder or text stage): a prompt (repeat for several).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "sample (a folder or text stage): a file of prompts, one a line.")
flags.DEFINE_alias("prompts-file", "prompts_file")
_INTERPOLATE = flags.DEFINE_list("interpolate_seeds", None, "sample --pretrained: A,B: frames slerped between "
                                 "the two seeds' noise (config.sample.num_frames of them).")
_LATENTS = flags.DEFINE_string("latents", None, "sample (text-to-image): a .npy of initial noise (N, h, w, c), "
                               "one per image, instead of the seeded noise.")
_LORA = flags.DEFINE_multi_string("lora", [], "sample, invert (text-to-image): a LoRA safetensors file (diffusers/PEFT "
                                  "or kohya), FILE or FILE:SCALE (default 1.0), merged into the weights; repeat for "
                                  "several.")
_CONTROLNET = flags.DEFINE_multi_string("controlnet", [], "sample (text-to-image): a diffusers ControlNet folder "
                                        "steering the UNet (with --control_image), FOLDER or FOLDER:SCALE (default "
                                        "sample.controlnet_scale); repeat for several, whose residuals add up.")
_CONTROL_IMAGE = flags.DEFINE_multi_string("control_image", [], "sample --controlnet: the control image (an edge, "
                                           "pose or depth map), resized to the output size as diffusers does; one "
                                           "per --controlnet, in the same order.")
flags.DEFINE_alias("control-image", "control_image")
_IMAGE = flags.DEFINE_multi_string("image", [], "invert: an image to invert (repeat for several).")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False, "Read PyTorch .bin weights (needs torch; pickles can run code).")


class UsageError(ValueError):
    """A command line that asks for something impossible (a missing flag, a missing file)."""


class Command(NamedTuple):
    summary: str
    details: str
    flags: tuple[str, ...]
    settings: str  # the config keys that matter most to this command
    examples: tuple[str, ...]


_TOY, _DIGITS = "configs/toy_2gmm.py", "configs/digits.py"
COMMANDS = {
    "train": Command(
        "train a flow: 1-RF from data, or k-RF (reflow) from a teacher's pairs",
        "Without --pairs: 1-Rectified Flow on the config's data. With --pairs P --checkpoint T: reflow on the "
        "pairs that T made, starting from T's parameters (config.stages.reflow). Rerunning resumes the run in "
        "--workdir; a different run there is refused.",
        ("config", "workdir", "pairs", "checkpoint", "quiet"),
        "train.num_steps, train.batch_size, optim.*, flow.time_sampler, seed",
        (f"rectflow train --config {_TOY} --workdir runs/toy/1rf",
         f"rectflow train --config {_TOY} --workdir runs/toy/2rf --pairs runs/toy/pairs_1rf "
         "--checkpoint runs/toy/1rf")),
    "pairs": Command(
        "reflow couplings: integrate a teacher's ODE from fresh noise x0",
        "Writes pair shards (x0, x1 = the teacher's ODE from x0) and pairs.json to --out. For text-to-image "
        "configs the teacher may be a Stable Diffusion folder (solved as config.teacher says) or an sd_unet stage "
        "(config.pairs), and the shards are (text, noise seed and index, float16 latent) triplets; the throughput "
        "in images/s is logged.",
        ("config", "checkpoint", "out", "quiet"),
        "pairs.num_pairs, pairs.num_steps, pairs.method (euler | heun | ddim | dpm_solver++), pairs.batch_size, "
        "pairs.guidance_scale; teacher.* and data.prompts for a pretrained folder",
        (f"rectflow pairs --config {_TOY} --checkpoint runs/toy/1rf --out runs/toy/pairs_1rf",
         "rectflow pairs --config configs/sd15_2rf.py --checkpoint stable-diffusion-v1-5 --out runs/sd/pairs_teacher "
         "--config.data.prompts=captions.txt")),
    "distill": Command(
        "train a one-step student on a teacher's pairs",
        "The student starts from the teacher --checkpoint and learns x0 -> x1 of --pairs in one step "
        "(config.stages.distill).",
        ("config", "workdir", "pairs", "checkpoint", "quiet"),
        "train.num_steps, stages.distill.*",
        (f"rectflow distill --config {_TOY} --workdir runs/toy/distill --pairs runs/toy/pairs_2rf "
         "--checkpoint runs/toy/2rf",)),
    "sample": Command(
        "samples of a stage, or text-to-image from a diffusers folder",
        "With --checkpoint: --out/samples.npz (float32 x0 and x1) and a picture. With --pretrained FOLDER (a "
        "Stable Diffusion, 2-RF or InstaFlow diffusers folder; no --config needed), or --checkpoint of a "
        "text-to-image stage, and prompts: one PNG per image, latents.npz (x0, x1), samples.npz (x1: the images "
        "in [-1, 1], prompt) and prompts.json, sample.samples_per_prompt images per prompt. SD folders "
        "are solved with ddim or dpm_solver++ from their scheduler config; --latents starts from given noise.",
        ("config", "checkpoint", "out", "pretrained", "prompt", "prompts_file", "latents", "interpolate_seeds",
         "lora", "controlnet", "control_image", "allow_pickle", "quiet"),
        "sample.num_steps, sample.method (euler | heun; SD folders: ddim | dpm_solver++ too), seed; text-to-image: "
        "sample.guidance_scale (applied "
        "when > 1), sample.negative_prompt, sample.batch_size, sample.height, sample.width, sample.dtype "
        "(float32 | bfloat16), sample.samples_per_prompt, sample.num_frames, sample.prediction_type "
        "(auto | velocity), sample.controlnet_scale (with --controlnet: each ControlNet's scale unless it has its own)",
        (f"rectflow sample --config {_TOY} --checkpoint runs/toy/distill --out runs/toy/samples "
         "--config.sample.num_steps=1",
         'rectflow sample --pretrained instaflow_0_9B --prompt "a photograph of a snowy mountain" --out out '
         "--config.sample.num_steps=1",
         'rectflow sample --pretrained instaflow_0_9B --lora style.safetensors:0.8 --prompt "a castle" --out out',
         'rectflow sample --pretrained instaflow_0_9B --controlnet sd-controlnet-canny --control-image edges.png '
         '--prompt "a bird" --out out --config.sample.controlnet_scale=1.0',
         'rectflow sample --pretrained instaflow_0_9B --controlnet sd-controlnet-canny:1.0 --control-image edges.png '
         '--controlnet sd-controlnet-depth:0.5 --control-image depth.png --prompt "a bird" --out out')),
    "eval": Command(
        "metrics of a stage at several step counts, or text-to-image FID and CLIP score",
        "Prints the metrics as JSON and, with --out, writes them to --out/metrics.json. With a protocol config "
        "(configs/coco2017_5k.py, configs/coco2014_30k.py) and --pretrained FOLDER or --checkpoint of a "
        "text-to-image stage: COCO FID and CLIP score of config.sample's generations, kept in resumable shards "
        "under --out (a killed run continues), with metrics.json and grid.png.",
        ("config", "checkpoint", "pretrained", "out", "allow_pickle", "quiet"),
        "eval.num_samples, eval.steps, sample.method; protocols: eval.captions, eval.images, "
        "eval.inception_weights, eval.clip_model, sample.num_steps, sample.method, sample.guidance_scale",
        (f"rectflow eval --config {_DIGITS} --checkpoint runs/digits/distill --out runs/digits/eval",
         "rectflow eval --config configs/coco2017_5k.py --pretrained instaflow_0_9B --out runs/eval/5k "
         "--config.eval.captions=captions_val2017.json --config.eval.images=val2017 "
         "--config.eval.inception_weights=pt_inception.safetensors --config.eval.clip_model=clip-vit-g-14")),
    "invert": Command(
        "image -> noise: integrate the ODE backwards from an image, then reconstruct it",
        "Encodes each --image with the VAE (a pixel-space stage takes it as it is), integrates the velocity ODE "
        "from t = 1 back to t = 0 with its --prompt (one for all images, or one each) through the same sampler, "
        "and regenerates the image from the noise found. A straight flow (2-RF, InstaFlow) inverts in a few steps; "
        "an epsilon (SD) folder runs DDIM inversion (sample.method euler or ddim: DDIM's grid). Writes "
        "--out/latents.npz (x0: the noise, x1: the image's latents), the reconstructions, comparison.png and "
        "inversion.json (errors and the noise's statistics). --lora applies as for sample.",
        ("config", "pretrained", "checkpoint", "image", "prompt", "prompts_file", "out", "lora", "allow_pickle",
         "quiet"),
        "sample.num_steps, sample.method (euler | heun | ddim), sample.guidance_scale (1: none, advised), "
        "sample.height, sample.width, sample.batch_size, sample.dtype, sample.inversion_refine (K fixed-point "
        "iterations per backward step, euler | ddim: each step then exactly undoes the forward step, K more "
        "UNet calls a step)",
        ('rectflow invert --pretrained instaflow_2rf --image photo.png --prompt "a red car" --out out/inverted '
         "--config.sample.num_steps=4",
         'rectflow invert --pretrained stable-diffusion-v1-5 --image photo.png --prompt "a red car" '
         "--out out/ddim_inverted --config.sample.num_steps=25",
         'rectflow invert --pretrained instaflow_2rf --image photo.png --prompt "a red car" --out out/refined '
         "--config.sample.num_steps=4 --config.sample.inversion_refine=5")),
    "export": Command(
        "write a text-to-image stage as a diffusers folder",
        "--checkpoint STAGE (an sd_unet stage: 2-RF or a distilled student) -> --out FOLDER with unet (the EMA "
        "weights), vae, text_encoder, tokenizer, scheduler and model_index.json (RectifiedFlowPipeline), which "
        "`rectflow sample --pretrained` and diffusers load with the same outputs.",
        ("checkpoint", "out"),
        "none",
        ("rectflow export --checkpoint runs/tiny/distill --out runs/tiny/instaflow_tiny",)),
    "pipeline": Command(
        "the whole recipe: 1-RF -> pairs -> 2-RF -> pairs -> distill, then a report",
        "Stages go to W/1rf, W/2rf and W/distill, pairs to W/pairs_1rf and W/pairs_2rf, the report to "
        "W/report/report.md. Text-to-image configs run InstaFlow's recipe: from a pretrained teacher folder, or "
        "(configs/digits_text.py) a diffusion teacher trained first in W/teacher. Rerunning resumes; finished "
        "stages are skipped.",
        ("config", "workdir", "quiet"),
        "every section; stages.reflow.* and stages.distill.* override the later stages",
        (f"rectflow pipeline --config {_DIGITS} --workdir runs/digits",
         "rectflow pipeline --config configs/digits_text.py --workdir runs/digits_text",
         "rectflow pipeline --config configs/tiny_text_to_image.py --workdir runs/tiny "
         "--config.teacher.pretrained=runs/tiny_sd --config.data.prompts=prompts.txt")),
}
_METAVARS = {"config": "FILE[:ARG]", "workdir": "DIR", "checkpoint": "DIR", "pairs": "DIR", "out": "DIR",
             "pretrained": "FOLDER", "prompt": "TEXT", "prompts_file": "FILE", "interpolate_seeds": "A,B",
             "latents": "FILE.npy", "lora": "FILE[:SCALE]", "controlnet": "FOLDER[:SCALE]", "control_image": "IMG",
             "image": "IMG"}
_HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")


def help_text(command: str | None = None) -> str:
    """`rectflow --help` (the commands) or `rectflow <command> --help` (its flags and examples)."""
    if command not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = ["usage: rectflow <command> [flags]", "",
                 "Rectified Flow, reflow and one-step distillation in JAX (rectflow_jax).", "", "commands:"]
        lines += [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
        lines += ["", "Each command reads --config FILE (configs/*.py) and takes overrides of any config",
                  "value, e.g. --config.train.num_steps=500. Run `rectflow <command> --help` for its",
                  "flags and examples (--helpfull lists every flag).", "", "example:",
                  f"  rectflow pipeline --config {_TOY} --workdir runs/toy"]
        return "\n".join(lines)
    spec = COMMANDS[command]
    # absl appends a note to a multi flag's help after ";\n": keep the sentence we wrote.
    rows = [(f"--{name}" + (f" {_METAVARS[name]}" if name in _METAVARS else ""),
             flags.FLAGS[name].help.split(";\n")[0]) for name in spec.flags]
    rows.append(("--config.KEY=VALUE", "override a config value (see the config file; e.g. --config.seed=1)"))
    width = max(len(left) for left, _ in rows)
    wrap = lambda text, indent="": textwrap.fill(text, 100, subsequent_indent=indent)
    lines = [f"usage: rectflow {command} [flags]", "", wrap(f"{spec.summary[0].upper()}{spec.summary[1:]}. "
                                                             f"{spec.details}"), "", "flags:"]
    lines += [wrap(f"  {left:<{width}}  {text}", " " * (width + 4)) for left, text in rows]
    lines += ["", wrap(f"config values that matter most: {spec.settings}", "  "), "", "examples:"]
    lines += [f"  {example}" for example in spec.examples]
    return "\n".join(lines)


def _help_request(args: list[str]) -> tuple[bool, str | None]:
    """(whether the command line asks for help, the command it names if any)."""
    words = [a for a in args if not a.startswith("-")]
    asked = any(a in _HELP_FLAGS for a in args) or (bool(words) and words[0] == "help")
    return asked, next((w for w in words if w in COMMANDS), None)


def _need(flag, command: str):
    if not flag.value:
        raise UsageError(f"`rectflow {command}` needs --{flag.name}")
    return flag.value


def run(command: str) -> None:
    from rectflow_jax import configlib, parallel, pipeline

    config = _CONFIG.value
    configlib.validate(config)
    # First: reading a checkpoint (to tell a text stage) would start the backend, after which
    # jax.distributed can no longer start. A no-op on one plain host.
    d = config.distributed
    parallel.initialize_distributed(d.coordinator, d.num_processes, d.process_id)
    if config.get("compilation_cache_dir"):  # before anything compiles; shared by every host and rerun
        import jax

        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    if command in ("sample", "eval", "invert") and _PRETRAINED.value and _CHECKPOINT.value:
        raise UsageError(f"give `rectflow {command}` either --checkpoint or --pretrained, not both")
    if command == "eval" and (_PRETRAINED.value or (_CHECKPOINT.value and _is_text_stage(_CHECKPOINT.value))):
        evaluate_text_to_image(config, _PRETRAINED.value or _CHECKPOINT.value, _need(_OUT, command),
                               stage=not _PRETRAINED.value, progress=not _QUIET.value)
        return
    if command == "sample" and _PRETRAINED.value:
        sample_pretrained(config, _PRETRAINED.value, _need(_OUT, command), progress=not _QUIET.value)
        return
    if command == "invert":
        source = _PRETRAINED.value or _CHECKPOINT.value
        if not source:
            raise UsageError("`rectflow invert` needs --pretrained FOLDER (or --checkpoint of a text-to-image stage)")
        invert_images(config, source, _need(_OUT, command), stage=not _PRETRAINED.value, progress=not _QUIET.value)
        return
    if command == "export":
        from rectflow_jax import text_to_image as t2i

        out = _need(_OUT, command)
        t2i.TextToImage.from_stage(_need(_CHECKPOINT, command)).save_pretrained(out)
        print(f"wrote {out} (a RectifiedFlowPipeline folder)")
        return
    if command == "sample" and _CHECKPOINT.value and _is_text_stage(_CHECKPOINT.value):
        if not (_PROMPT.value or _PROMPTS_FILE.value):
            raise UsageError(f"{_CHECKPOINT.value!r} is a text-to-image stage: give --prompt or --prompts_file")
        sample_pretrained(config, _CHECKPOINT.value, _need(_OUT, command), progress=not _QUIET.value, stage=True)
        return
    if not flags.FLAGS["config"].present:
        raise UsageError(f"`rectflow {command}` needs --config (e.g. configs/digits.py)")
    progress = not _QUIET.value
    if command == "train":
        if _PAIRS.value and not _CHECKPOINT.value:
            raise UsageError("`rectflow train --pairs P` trains a reflow stage from its teacher: give --checkpoint "
                             "TEACHER_DIR too")
        kind = "reflow" if _PAIRS.value else "rf"
        pipeline.train_stage(config, _need(_WORKDIR, command), kind, pairs_dir=_PAIRS.value,
                             teacher_dir=_CHECKPOINT.value, progress=progress)
    elif command == "distill":
        pipeline.train_stage(config, _need(_WORKDIR, command), "distill", pairs_dir=_need(_PAIRS, command),
                             teacher_dir=_need(_CHECKPOINT, command), progress=progress)
    elif command == "pairs":
        pipeline.generate_pairs(config, _need(_CHECKPOINT, command), _need(_OUT, command), progress=progress)
    elif command == "sample":
        out = _need(_OUT, command)
        pipeline.sample(config, _need(_CHECKPOINT, command), out)
        print(f"wrote {Path(out) / 'samples.npz'}")
    elif command == "eval":
        result = pipeline.evaluate_stage(config, _need(_CHECKPOINT, command))
        result.pop("outputs"), result.pop("trajectory")
        text = json.dumps(result, indent=2)
        if _OUT.value:
            from rectflow_jax import storage

            out = storage.path(_OUT.value)
            out.mkdir(parents=True, exist_ok=True)
            storage.write_text_atomic(out / "metrics.json", text)
        print(text)
    elif command == "pipeline":
        work = _need(_WORKDIR, command)
        report = pipeline.run_pipeline(config, work, progress=progress)
        print(json.dumps(report["claims"], indent=2))
        print(f"report: {str(work).rstrip('/')}/report/report.md")


def _is_text_stage(path: str) -> bool:
    from rectflow_jax import storage, teachers

    return (storage.path(path) / "checkpoints").is_dir() and teachers.is_sd_teacher(path)


def _text_to_image(config, path: str, stage: bool):
    """The pipeline of a folder or text stage, with the --lora files merged into it."""
    from rectflow_jax import lora
    from rectflow_jax import text_to_image as t2i

    cfg = config.sample
    specs = [lora.parse_lora_spec(spec) for spec in _LORA.value]
    for file, _ in specs:  # before the minutes of loading
        if not Path(file).is_file():
            raise UsageError(f"--lora {file!r} does not exist or is not a file")
    if stage:
        pipe = t2i.TextToImage.from_stage(path, dtype=cfg.dtype)
    else:
        pipe = t2i.TextToImage.from_pretrained(path, dtype=cfg.dtype, allow_pickle=_ALLOW_PICKLE.value,
                                               prediction_type=cfg.prediction_type, clip_skip=cfg.get("clip_skip", 0))
    if specs:
        pipe.merge_loras(specs)
    return pipe


def evaluate_text_to_image(config, path: str, out: str, stage: bool, progress: bool) -> None:
    """FID and CLIP score at the config's protocol (rectflow_jax/text_eval.py)."""
    from rectflow_jax import sampling, text_eval

    if not config.eval.get("protocol"):
        raise UsageError(f"{path!r} is a text-to-image model: evaluate it with a protocol config, "
                         "--config configs/coco2017_5k.py or configs/coco2014_30k.py")
    text_eval.Protocol.from_config(config.eval)  # missing files fail before the minutes of loading
    sampling.check_method(config.sample.method)
    metrics = text_eval.evaluate_text_to_image(config, _text_to_image(config, path, stage), out, progress)
    if metrics is not None:
        print(json.dumps(metrics, indent=2))
        print(f"wrote {Path(out) / 'metrics.json'}")


def _prompts(command: str) -> list[str]:
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        path = Path(_PROMPTS_FILE.value)
        if not path.is_file():
            raise UsageError(f"--prompts_file {str(path)!r} does not exist or is not a file")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"`rectflow {command}` needs --prompt or --prompts_file")
    return prompts


def _controlnet_requests(config) -> list[tuple[str, float, str]]:
    """(folder, scale, control image) of each --controlnet, checked before the minutes of loading."""
    if len(_CONTROLNET.value) != len(_CONTROL_IMAGE.value):
        raise UsageError(f"--controlnet FOLDER and --control_image IMG go together, one image per ControlNet in the "
                         f"same order: got {len(_CONTROLNET.value)} and {len(_CONTROL_IMAGE.value)}")
    from rectflow_jax import weights

    try:
        specs = [weights.parse_scaled_path(spec, "--controlnet", default=config.sample.controlnet_scale)
                 for spec in _CONTROLNET.value]
    except ValueError as err:
        raise UsageError(str(err)) from None
    for image in _CONTROL_IMAGE.value:
        if not Path(image).is_file():
            raise UsageError(f"--control_image {image!r} does not exist or is not a file")
    return [(folder, scale, image) for (folder, scale), image in zip(specs, _CONTROL_IMAGE.value)]


def _attach_controlnets(config, pipe, requests: list[tuple[str, float, str]]) -> list:
    """Each requested ControlNet attached to `pipe`; returns their control images at the output size."""
    from rectflow_jax import control_image
    from rectflow_jax import text_to_image as t2i
    from rectflow_jax.models.controlnet import ControlNetModel

    cfg = config.sample
    kind = t2i.compute_dtype(cfg.dtype)
    height, width = pipe.image_size(cfg.height, cfg.width)
    images = []
    for folder, _, image in requests:
        controlnet, params = ControlNetModel.from_pretrained(folder, dtype=kind, param_dtype=kind,
                                                             allow_pickle=_ALLOW_PICKLE.value)
        pipe.attach_controlnet(controlnet, params, source=folder)
        images.append(control_image.load_control_image(image, height, width, vae_scale_factor=pipe.vae_scale_factor))
    return images


def sample_pretrained(config, pretrained: str, out: str, progress: bool, stage: bool = False) -> None:
    """Text-to-image from a diffusers folder, or (stage=True) from a text-to-image stage of ours."""
    import numpy as np

    from rectflow_jax import sampling
    from rectflow_jax import text_to_image as t2i

    prompts = _prompts("sample --pretrained")
    if (_CONTROLNET.value or _CONTROL_IMAGE.value) and _INTERPOLATE.value:
        raise UsageError("--controlnet with --interpolate_seeds is not supported: sample the frames without it")
    cfg = config.sample
    sampling.check_method(cfg.method)  # before the minutes that loading takes
    controlnets = _controlnet_requests(config)
    initial = None
    if _LATENTS.value:
        if _INTERPOLATE.value:
            raise UsageError("--latents and --interpolate_seeds both choose the noise: give one")
        path = Path(_LATENTS.value)
        if not path.is_file() or path.suffix != ".npy":
            raise UsageError(f"--latents {str(path)!r} must be an existing .npy file (N, h, w, c)")
        try:
            initial = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise UsageError(f"--latents {str(path)!r} is not a readable .npy array: {err}") from None
    pipe = _text_to_image(config, pretrained, stage)
    control = _attach_controlnets(config, pipe, controlnets) if controlnets else None
    common = dict(num_steps=cfg.num_steps, method=cfg.method, guidance_scale=cfg.guidance_scale,
                  negative_prompt=cfg.negative_prompt, batch_size=cfg.batch_size, height=cfg.height,
                  width=cfg.width, save_latents=cfg.save_latents, progress=progress)
    if _INTERPOLATE.value:
        try:
            seeds = tuple(int(s) for s in _INTERPOLATE.value)
        except ValueError:
            seeds = ()
        if len(seeds) != 2:
            raise UsageError(f"--interpolate_seeds takes two integers A,B, got {','.join(_INTERPOLATE.value)}")
        records = t2i.interpolate_to_folder(pipe, prompts, out, seeds=seeds, num_frames=cfg.num_frames, **common)
    else:
        records = t2i.generate_to_folder(pipe, prompts, out, seed=config.seed, initial_latents=initial,
                                         samples_per_prompt=cfg.samples_per_prompt, control_image=control,
                                         controlnet_scale=[scale for _, scale, _ in controlnets], **common)
    print(f"wrote {len(records)} images to {out} (prompts.json lists them)")


def invert_images(config, source: str, out: str, stage: bool, progress: bool) -> None:
    """Images -> noise -> images (rectflow_jax/inversion.py), from a folder or a text-to-image stage."""
    from rectflow_jax import inversion, sampling, teachers

    if not _IMAGE.value:
        raise UsageError("`rectflow invert` needs --image (repeat for several)")
    for image in _IMAGE.value:
        if not Path(image).is_file():
            raise UsageError(f"--image {image!r} does not exist or is not a file")
    if stage and not _is_text_stage(source):
        raise UsageError(f"{source!r} is not a text-to-image stage: `rectflow invert` needs a diffusers folder "
                         "(--pretrained) or an sd_unet stage (--checkpoint)")
    prompts = _prompts("invert")
    cfg = config.sample
    sampling.check_method(cfg.method)
    pipe = _text_to_image(config, source, stage)
    method = cfg.method
    if not pipe.teacher.is_velocity and method == "euler":
        method = "ddim"  # Euler in rectified-flow coordinates on DDIM's grid: DDIM inversion itself
    if method not in teachers.INVERTIBLE_METHODS:
        raise UsageError(f"sample.method={cfg.method!r} cannot run backwards; invert with one of "
                         f"{', '.join(teachers.INVERTIBLE_METHODS)}")
    summary = inversion.invert_to_folder(pipe, list(_IMAGE.value), prompts, out, num_steps=cfg.num_steps,
                                         method=method, guidance_scale=cfg.guidance_scale,
                                         negative_prompt=cfg.negative_prompt, batch_size=cfg.batch_size,
                                         height=cfg.height, width=cfg.width, progress=progress,
                                         refine=cfg.inversion_refine)
    print(json.dumps({k: v for k, v in summary.items() if k != "images"}, indent=2, default=str))
    print(f"wrote {out} (inversion.json lists the errors)")


def _main(argv) -> None:
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax narrates every save and read
    ours = logging.getLogger("rectflow")
    ours.setLevel(logging.INFO)
    ours.addHandler(logging.StreamHandler())
    ours.propagate = False
    commands = [a for a in argv[1:]]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        raise UsageError(f"give exactly one command of {', '.join(COMMANDS)} (got {' '.join(commands) or 'none'}); "
                         "rectflow --help lists them")
    run(commands[0])


def input_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input or a run that cannot go on, each raised with a message for the user.

    Everything else (a plain ValueError, KeyError, OSError...) is a bug until shown
    otherwise and keeps its traceback.
    """
    from rectflow_jax import (checkpoint, configlib, control_image, diffusion, sampling, teachers, text_to_image,
                              train, weights)
    from rectflow_jax.data import coco, pairs, prompts

    return (UsageError, configlib.ConfigError, checkpoint.CheckpointError, pairs.PairDataError,
            teachers.IncompatibleTeacher, train.TrainingDiverged, weights.WeightLoadError, sampling.SamplerError,
            text_to_image.TextToImageError, diffusion.ScheduleError, prompts.PromptFileError, coco.EvalDataError,
            control_image.ControlImageError)


def main() -> None:
    asked, command = _help_request(sys.argv[1:])
    if asked:  # absl's own --help prints only "USAGE: rectflow [flags]"
        print(help_text(command))
        sys.exit(0)
    from rectflow_jax import preemption

    expected = input_errors()
    preemption.install_handler()  # SIGTERM: save at the next step or shard, then exit 75
    try:
        app.run(_main, flags_parser=_parse_flags)
    except preemption.Preempted as err:
        print(f"rectflow: preempted: {err}", file=sys.stderr)
        sys.exit(preemption.PREEMPTED_EXIT_CODE)
    except expected as err:
        if os.environ.get("RECTFLOW_TRACEBACK"):
            raise
        # One line naming the problem; the traceback is noise for input mistakes.
        print(f"rectflow: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        # config_flags reports a bad override as whatever the ConfigDict raised, often
        # a repr over several lines; squeeze it into one line that keeps the key's name.
        text = " ".join(str(err).replace("\\n", " ").replace("\\'", "").split()).strip("'\"")
        print(f"rectflow: error: bad command-line flag or config override: {text}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
