"""A Stable Diffusion UNet as our text-conditioned velocity model (2-RF, InstaFlow).

v(x, t | text) = unet(x, (1 - t) * 1000, clip(input_ids)): the UNet is called at SD
timestep (1 - t) * 1000, InstaFlow's convention, so a one-step model is called once at
1000. The CLIP text encoder runs inside the step on cond['input_ids'] and is frozen: its
params sit under 'text_encoder', outside the optimiser (see `FROZEN`), and are read from
the pretrained folder rather than from our checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from rectflow_jax import weights
from rectflow_jax.models.clip_text import CLIPTextModel
from rectflow_jax.models.sd_unet import UNet2DConditionModel

# Config keys of model.name = 'sd_unet' besides the name.
MODEL_KEYS = ("pretrained", "dtype", "param_dtype", "remat", "clip_skip")


class SDVelocity(nn.Module):
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    clip_skip: int = 0
    # Top-level param collections that never train (loaded from `pretrained`).
    frozen: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def __call__(self, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array] | None = None,
                 train: bool = False) -> jax.Array:
        del train  # the SD UNet has no dropout
        if cond is None or "input_ids" not in cond:
            raise ValueError("the SD velocity model is text-conditioned: cond must hold 'input_ids'")
        context = jax.lax.stop_gradient(self.text_encoder(cond["input_ids"], self.clip_skip))
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
        if not config.get("pretrained"):
            raise ConfigError("model 'sd_unet' needs model.pretrained: the diffusers folder whose UNet and text "
                              "encoder it uses (set --config.teacher.pretrained=FOLDER)")
        folder = Path(config["pretrained"])
        dtype = jnp.dtype(config.get("dtype", "float32"))
        param_dtype = jnp.dtype(config.get("param_dtype", "float32"))
        unet = UNet2DConditionModel.from_config(weights.read_config(weights.resolve_folder(folder, "unet")),
                                                dtype=dtype, param_dtype=param_dtype,
                                                remat=bool(config.get("remat", False)))
        text = CLIPTextModel.from_config(weights.read_config(weights.resolve_folder(folder, "text_encoder")),
                                         dtype=dtype, param_dtype=param_dtype)
        return cls(unet=unet, text_encoder=text, clip_skip=int(config.get("clip_skip", 0)))


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
