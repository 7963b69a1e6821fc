"""A Stable Diffusion UNet as our text-conditioned velocity model (2-RF, InstaFlow).

v(x, t | text) = unet(x, (1 - t) * 1000, clip(input_ids)): the UNet is called at SD
timestep (1 - t) * 1000, InstaFlow's convention, so a one-step model is called once at
1000. The CLIP text encoder runs inside the step on cond['input_ids'].

Two ways to configure it:
  - `pretrained: FOLDER`, a diffusers folder: the UNet and text encoder configs are read
    from it, and the text encoder is frozen: its params sit under 'text_encoder', outside
    the optimiser and our checkpoints (`frozen`), read from the folder.
  - `unet: {...}` and `text_encoder: {...}`, a diffusers UNet2DConditionModel config and a
    transformers CLIPTextConfig written in the experiment config: both are ours, trained
    from scratch (the text-conditioned digits' teacher) and kept in the checkpoints; a
    later stage keeps the text encoder as it was with `train.freeze = ('text_encoder',)`.
The same UNet is a diffusion model when trained on flow.objective 'diffusion': it is then
shown x_tau at t = 1 - tau / 1000, i.e. at its own SD timestep tau.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from rectflow_jax import weights
from rectflow_jax.models.clip_text import CLIPTextModel
from rectflow_jax.models.sd_unet import UNet2DConditionModel

# Config keys of model.name = 'sd_unet' besides the name.
MODEL_KEYS = ("pretrained", "unet", "text_encoder", "dtype", "param_dtype", "remat", "clip_skip")


class SDVelocity(nn.Module):
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    clip_skip: int = 0
    text_encoder_from_folder: bool = True  # False: configured inline, trained with the UNet

    @property
    def frozen(self) -> tuple[str, ...]:
        """Top-level param collections that never train and live outside checkpoints."""
        return ("text_encoder",) if self.text_encoder_from_folder else ()

    def __call__(self, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array] | None = None,
                 train: bool = False) -> jax.Array:
        del train  # the SD UNet has no dropout
        if cond is None or "input_ids" not in cond:
            raise ValueError("the SD velocity model is text-conditioned: cond must hold 'input_ids'")
        context = self.text_encoder(cond["input_ids"], self.clip_skip)
        if self.text_encoder_from_folder:
            context = jax.lax.stop_gradient(context)
        v = self.unet(x.astype(self.unet.dtype), (1.0 - t) * 1000.0, context.astype(self.unet.dtype))
        return v.astype(x.dtype)

    def example_cond(self, batch: int) -> dict[str, jax.Array]:
        return {"input_ids": jnp.zeros((batch, self.text_encoder.max_position_embeddings), jnp.int32)}

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> "SDVelocity":
        """The module of a config `model = {name: 'sd_unet', pretrained: FOLDER, ...}` (configs only)."""
        from rectflow_jax.configlib import ConfigError

        unknown = sorted(set(config) - set(MODEL_KEYS))
        if unknown:
            raise ConfigError(f"unknown keys for model 'sd_unet': {unknown}; valid: {sorted(MODEL_KEYS)}")
        inline = [k for k in ("unet", "text_encoder") if config.get(k)]
        if config.get("pretrained") and inline:
            raise ConfigError(f"model 'sd_unet' takes its configs from model.pretrained or from model.{inline[0]}, "
                              "not both")
        if not config.get("pretrained") and len(inline) < 2:
            raise ConfigError("model 'sd_unet' needs model.pretrained (the diffusers folder whose UNet and text "
                              "encoder it uses: --config.teacher.pretrained=FOLDER), or both model.unet and "
                              "model.text_encoder (their diffusers / transformers configs, trained from scratch)")
        dtype = jnp.dtype(config.get("dtype", "float32"))
        param_dtype = jnp.dtype(config.get("param_dtype", "float32"))
        if inline:
            unet_config, text_config = dict(config["unet"]), dict(config["text_encoder"])
        else:
            folder = Path(config["pretrained"])
            unet_config = weights.read_config(weights.resolve_folder(folder, "unet"))
            text_config = weights.read_config(weights.resolve_folder(folder, "text_encoder"))
        unet = UNet2DConditionModel.from_config(unet_config, dtype=dtype, param_dtype=param_dtype,
                                                remat=config.get("remat", False))
        text = CLIPTextModel.from_config(text_config, dtype=dtype, param_dtype=param_dtype)
        return cls(unet=unet, text_encoder=text, clip_skip=int(config.get("clip_skip", 0)),
                   text_encoder_from_folder=not inline)


def load_frozen(model: SDVelocity, folder: str | Path, *, shardings: Any = None) -> dict[str, Any]:
    """The frozen params ({'text_encoder': ...}) from the pretrained folder."""
    _, params = CLIPTextModel.from_pretrained(folder, "text_encoder", dtype=model.text_encoder.dtype,
                                              param_dtype=model.text_encoder.param_dtype, shardings=shardings)
    return {"text_encoder": params}


def load_unet_params(model: SDVelocity, folder: str | Path) -> dict[str, Any]:
    """{'unet': params} from a folder's unet/: a 2-RF stage's initialisation from its teacher."""
    unet, params = UNet2DConditionModel.from_pretrained(folder, "unet", dtype=model.unet.dtype,
                                                        param_dtype=model.unet.param_dtype)
    if unet.config_json != model.unet.config_json:
        raise weights.WeightLoadError(f"{str(folder)!r}: its UNet config differs from the one this model was built "
                                      "from (model.pretrained)")
    return {"unet": params}
