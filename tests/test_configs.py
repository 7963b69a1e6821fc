"""Every shipped config loads, validates, builds its data and model, and its docstring's commands parse."""

import re
import shlex
from pathlib import Path

import jax
import pytest
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

from rectflow_jax import cli, configlib, models, random_folder, train
from rectflow_jax.data import datasets

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path, tmp_path):
    config = configlib.load_config(path)
    if config.eval.protocol:  # an evaluation protocol (rectflow eval --pretrained): no data or model of its own
        assert config.eval.num_images > 0 and config.eval.fid_resolution > 0 and config.eval.shard_size > 0
        assert config.sample.height % 8 == 0 and config.sample.width % 8 == 0
        return
    for kind in configlib.STAGE_KINDS:
        stage = configlib.stage_config(config, kind)
        assert stage.train.num_steps > 0
    if config.data.name == "prompts":  # text to image: the model comes from the teacher folder
        config.teacher.pretrained = str(random_folder.write_random_folder(tmp_path / "sd"))
        assert config.model.pretrained == config.teacher.pretrained  # one flag sets both
        dataset = datasets.get_dataset(config.data)
        model = models.build_velocity_model(config.model, dataset.shape, dataset.num_classes)
        params = train.abstract_params(model, dataset.shape, dataset.num_classes)
        assert set(params) == {"unet"}  # the text encoder is frozen, outside the trained params
        return
    with tfds.testing.mock_data(num_examples=8):
        dataset = datasets.get_dataset(config.data)
        batch = next(dataset.batches(4, seed=0))
    assert batch["x1"].shape == (4, *dataset.shape)
    model = models.build_velocity_model(config.model, dataset.shape, dataset.num_classes)
    params = train.abstract_params(model, dataset.shape, dataset.num_classes)
    assert sum(p.size for p in jax.tree_util.tree_leaves(params)) > 1000


def lookup(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def docstring_commands(path: Path) -> list[list[str]]:
    """The `rectflow ...` commands of a config's docstring, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text().split('"""')[1])
    return [shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith("rectflow ")]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_docstring_commands_parse(path):
    """The command each config documents names a real command and flags; its overrides set valid values."""
    commands = docstring_commands(path)
    assert commands, f"{path.name}'s docstring gives no `rectflow` command"
    for argv in commands:
        assert argv[1] in cli.COMMANDS, argv
        names = [arg[2:].split("=")[0] for arg in argv[2:] if arg.startswith("--")]
        assert all(name in flags.FLAGS for name in names if not name.startswith("config.")), names
        # The config flag and its overrides, parsed as the CLI parses them, on their own flag set.
        config_args = [a for a in " ".join(argv[2:]).replace("--config ", "--config=").split()
                       if a.startswith("--config")]
        config_args = [re.sub(r"^--config=configs/", f"--config={ROOT}/configs/", a) for a in config_args]
        if not config_args:  # a command that reads no config (export)
            continue
        with_file = config_args[0].startswith("--config=")
        if not with_file:  # overrides of the base config (sample --pretrained)
            config_args = [f"--config={cli._BASE_CONFIG}", *config_args]
        own = flags.FlagValues()
        config_flag = config_flags.DEFINE_config_file("config", flag_values=own,
                                                      sys_argv=["rectflow", *config_args])
        own(["rectflow", *config_args])
        if with_file:
            assert Path(own["config"].config_filename.split(":")[0]).resolve() == path
        configlib.validate(config_flag.value)
        for override in config_args[1:]:
            key, value = override[len("--config."):].split("=", 1)
            assert str(lookup(config_flag.value, key)) == value  # the override took


def test_cifar10_model_is_ddpm_pp_sized():
    config = configlib.load_config(ROOT / "configs" / "cifar10.py")
    model = models.build_velocity_model(config.model, (32, 32, 3), 0)
    n = sum(p.size for p in jax.tree_util.tree_leaves(train.abstract_params(model, (32, 32, 3), 0)))
    assert 55e6 < n < 70e6, n  # DDPM++ (deep-ish, nf 128) is about 62M parameters


def test_stage_overrides_must_name_real_keys():
    config = configlib.base_config()
    config.stages.reflow.optim = dict(lrr=1.0)
    with pytest.raises(configlib.ConfigError, match="stages.reflow.optim.lrr names no key"):
        configlib.stage_config(config, "reflow")
    config.stages.reflow.optim = dict(lr=1.0)
    assert configlib.stage_config(config, "reflow").optim.lr == 1.0
    assert configlib.stage_config(config, "rf").optim.lr == config.optim.lr


def test_stage_overrides_merge_into_sampler_arguments():
    """A stage may pick another time sampler and set its arguments; the others keep theirs."""
    config = configlib.base_config()
    config.flow.uniform.eps = 0.01
    config.stages.reflow.flow = dict(time_sampler="u_shaped", u_shaped=dict(a=2.0))
    reflow, rf = configlib.stage_config(config, "reflow"), configlib.stage_config(config, "rf")
    assert (reflow.flow.time_sampler, reflow.flow.u_shaped.a, reflow.flow.uniform.eps) == ("u_shaped", 2.0, 0.01)
    assert (rf.flow.time_sampler, rf.flow.u_shaped.a) == ("uniform", configlib.base_config().flow.u_shaped.a)


TYPOS = [("stages.reflow.init", "teachr"), ("optim.schedule", "cosin"), ("optim.ema_warmup", "rampp"),
         ("flow.time_sampler", "u_shape"), ("flow.loss", "l1"), ("pairs.method", "rk4"), ("sample.method", "eular"),
         ("data.name", "digit"), ("model.name", "unet2")]


@pytest.mark.parametrize("key, typo", TYPOS, ids=[k for k, _ in TYPOS])
def test_a_typo_in_an_enumerated_key_is_one_clear_error(key, typo):
    config = configlib.base_config()
    config.update_from_flattened_dict({key: typo})
    with pytest.raises(ValueError, match=re.escape(f"{key}={typo!r} is not one of [")) as refused:
        configlib.stage_config(config, "rf")
    assert type(refused.value).__name__ == "ConfigError"


def test_a_typo_in_a_stage_override_names_the_stage():
    config = configlib.base_config()
    config.stages.distill.flow = dict(loss="l1")
    with pytest.raises(ValueError, match=re.escape("stages.distill: flow.loss='l1' is not one of")):
        configlib.stage_config(config, "rf")


def test_load_config_validates(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("from rectflow_jax.configlib import base_config\n\n"
                    "def get_config():\n    config = base_config()\n    config.optim.schedule = 'cosin'\n"
                    "    return config\n")
    with pytest.raises(ValueError, match=re.escape("optim.schedule='cosin' is not one of ['constant', 'cosine']")):
        configlib.load_config(path)


@pytest.mark.parametrize("setting, message", [
    ({"flow.u_shaped.eps": 1e-3}, "flow.u_shaped.eps is not an argument of the 'u_shaped' time sampler"),
    ({"flow.time_sampler_args": {"eps": 1e-3}}, "flow.time_sampler_args is not a config key"),
])
def test_time_sampler_arguments_are_checked(setting, message):
    config = configlib.base_config()
    for key, value in setting.items():
        section, name = key.rsplit(".", 1)
        lookup(config, section)[name] = value  # a new key, as a config file may add one
    with pytest.raises(configlib.ConfigError, match=re.escape(message)):
        configlib.validate(config)
