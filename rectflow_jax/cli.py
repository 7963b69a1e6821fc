"""The `rectflow` command.

  rectflow train    --config C --workdir W [--pairs P --checkpoint T]   1-RF from data, k-RF from pairs
  rectflow pairs    --config C --checkpoint STAGE --out P                reflow couplings
  rectflow distill  --config C --checkpoint TEACHER --pairs P --workdir W
  rectflow sample   --config C --checkpoint STAGE --out O               samples.npz + picture
  rectflow sample   --pretrained FOLDER --prompt P [--prompts_file F] --out O
                    [--config.sample.num_steps=N --config.sample.guidance_scale=S]
                    [--interpolate_seeds=A,B --config.sample.num_frames=K]     text to PNGs (no --config needed)
  rectflow eval     --config C --checkpoint STAGE [--out O]             metrics.json
  rectflow pipeline --config C --workdir W                              1-RF -> 2-RF -> distill + report

Any config value can be overridden: --config.train.num_steps=500.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

COMMANDS = ("train", "pairs", "distill", "sample", "eval", "pipeline")

_BASE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configlib.py")
# Defaults to the base config so that `sample --pretrained` needs no config file.
_CONFIG = config_flags.DEFINE_config_file("config", _BASE_CONFIG, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Stage directory (train, distill) or pipeline root.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A stage directory to read (teacher, sampler, eval).")
_PAIRS = flags.DEFINE_string("pairs", None, "A pair directory written by `rectflow pairs`.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bars.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "sample: a diffusers pipeline folder (2-RF, InstaFlow).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "sample --pretrained: a prompt (repeat for several).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "sample --pretrained: a file of prompts, one a line.")
flags.DEFINE_alias("prompts-file", "prompts_file")
_INTERPOLATE = flags.DEFINE_list("interpolate_seeds", None, "sample --pretrained: A,B: frames slerped between "
                                 "the two seeds' noise (config.sample.num_frames of them).")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False, "Read PyTorch .bin weights (needs torch; pickles can run code).")


class UsageError(ValueError):
    pass


def _need(flag, command: str):
    if not flag.value:
        raise UsageError(f"`rectflow {command}` needs --{flag.name}")
    return flag.value


def run(command: str) -> None:
    from rectflow_jax import parallel, pipeline

    config = _CONFIG.value
    if command == "sample" and _PRETRAINED.value:
        if _CHECKPOINT.value:
            raise UsageError("give `rectflow sample` either --checkpoint or --pretrained, not both")
        sample_pretrained(config, _PRETRAINED.value, _need(_OUT, command), progress=not _QUIET.value)
        return
    if not flags.FLAGS["config"].present:
        raise UsageError(f"`rectflow {command}` needs --config (e.g. configs/digits.py)")
    d = config.distributed
    parallel.initialize_distributed(d.coordinator, d.num_processes, d.process_id)
    progress = not _QUIET.value
    if command == "train":
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
            Path(_OUT.value).mkdir(parents=True, exist_ok=True)
            (Path(_OUT.value) / "metrics.json").write_text(text)
        print(text)
    elif command == "pipeline":
        work = _need(_WORKDIR, command)
        report = pipeline.run_pipeline(config, work, progress=progress)
        print(json.dumps(report["claims"], indent=2))
        print(f"report: {Path(work) / 'report' / 'report.md'}")


def sample_pretrained(config, pretrained: str, out: str, progress: bool) -> None:
    from rectflow_jax import text_to_image as t2i

    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        prompts += [line.strip() for line in Path(_PROMPTS_FILE.value).read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("`rectflow sample --pretrained` needs --prompt or --prompts_file")
    cfg = config.sample
    pipe = t2i.TextToImage.from_pretrained(pretrained, dtype=cfg.dtype, allow_pickle=_ALLOW_PICKLE.value)
    common = dict(num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, negative_prompt=cfg.negative_prompt,
                  batch_size=cfg.batch_size, height=cfg.height, width=cfg.width, save_latents=cfg.save_latents,
                  progress=progress)
    if _INTERPOLATE.value:
        try:
            seeds = tuple(int(s) for s in _INTERPOLATE.value)
        except ValueError:
            seeds = ()
        if len(seeds) != 2:
            raise UsageError(f"--interpolate_seeds takes two integers A,B, got {','.join(_INTERPOLATE.value)}")
        records = t2i.interpolate_to_folder(pipe, prompts, out, seeds=seeds, num_frames=cfg.num_frames, **common)
    else:
        records = t2i.generate_to_folder(pipe, prompts, out, seed=config.seed,
                                         images_per_prompt=cfg.images_per_prompt, **common)
    print(f"wrote {len(records)} images to {out} (prompts.json lists them)")


def _main(argv) -> None:
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax narrates every save and read
    ours = logging.getLogger("rectflow")
    ours.setLevel(logging.INFO)
    ours.addHandler(logging.StreamHandler())
    ours.propagate = False
    commands = [a for a in argv[1:]]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        raise UsageError(f"give exactly one command of {', '.join(COMMANDS)} (got {' '.join(commands) or 'none'})")
    run(commands[0])


def main() -> None:
    from rectflow_jax import checkpoint, teachers, train, weights
    from rectflow_jax.data import pairs

    expected = (UsageError, checkpoint.CheckpointError, pairs.PairDataError, teachers.IncompatibleTeacher,
                train.TrainingDiverged, weights.WeightLoadError, ValueError, OSError)
    try:
        app.run(_main, flags_parser=_parse_flags)
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
