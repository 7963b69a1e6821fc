"""ControlNet: diffusers' `ControlNetModel` (SD 1.x / 2.x) in Flax linen, NHWC.

A copy of the SD UNet's encoder (time embedding, conv_in, down blocks, mid block; the very
modules of models/sd_unet.py) that also reads a control image through a small conv stack
(`controlnet_cond_embedding`) and gives, through 1x1 convolutions (`controlnet_down_blocks_N`,
`controlnet_mid_block`, zero at the start of training), one residual per UNet skip plus one
for the mid block. The UNet adds them (`UNet2DConditionModel.__call__`'s
`down_block_additional_residuals` and `mid_block_additional_residual`).

Call: `module.apply({'params': p}, sample, timesteps, encoder_hidden_states, controlnet_cond,
conditioning_scale=1.0) -> (down_residuals, mid_residual)` with sample (B, h, w, in_channels),
timesteps (B,) or a scalar in SD units (0..1000), encoder_hidden_states (B, L, D) and
controlnet_cond (B or 1, h * f, w * f, conditioning_channels) in [0, 1] (RGB, see
control_image.load_control_image), f = 2 ** (len(conditioning_embedding_out_channels) - 1)
(8 for SD's). The residuals are float32 whatever the compute `dtype`, a tuple of (B, h_i, w_i,
C_i) in the UNet's skip order and (B, h_mid, w_mid, C_mid), each times `conditioning_scale`
(may be traced): diffusers' scaling without guess mode. With global_pool_conditions they are
averaged over H and W, (B, 1, 1, C).

Submodules carry the diffusers attribute names, so `from_pretrained` reads a diffusers
ControlNet folder (config.json, diffusion_pytorch_model.safetensors) and `save_pretrained`
writes one diffusers' ControlNetModel.from_pretrained loads. `from_unet` starts one from a UNet
as diffusers' ControlNetModel.from_unet does. Fields, `config`, `config_json` and the refusal
of unsupported keys (weights.UnsupportedConfigError naming the key) work as in sd_unet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rectflow_jax import weights
from rectflow_jax.models.layers import conv, remat_policy_name
from rectflow_jax.models.sd_unet import (
    _DOWN_BLOCKS, Shared, UNet2DConditionModel, UNetMidBlock2DCrossAttn, _per_block, _tuples, check_block_config,
    embed_time_and_encode)

Dtype = Any
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DEFAULT_CONDITIONING_EMBEDDING_OUT_CHANNELS = (16, 32, 96, 256)

# diffusers ControlNetModel config keys held as module fields (same names, meanings, defaults).
CONFIG_KEYS = (
    "in_channels", "conditioning_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "norm_num_groups",
    "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
    "use_linear_projection", "upcast_attention", "controlnet_conditioning_channel_order",
    "conditioning_embedding_out_channels", "global_pool_conditions",
)
# Keys supported only at these values (the diffusers default, or equivalents).
_ONLY = {
    "act_fn": ("silu", "swish"), "class_embed_type": (None,), "num_class_embeds": (None,),
    "addition_embed_type": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "controlnet_conditioning_channel_order": ("rgb", "bgr"),
}
# Keys that only reach the class / addition embeddings refused above; only_cross_attention
# is checked per block in from_config.
_INERT = ("addition_time_embed_dim", "projection_class_embeddings_input_dim", "addition_embed_type_num_heads",
          "only_cross_attention")
# The UNet config keys diffusers' ControlNetModel.from_unet carries over (it sets the rest).
_FROM_UNET_KEYS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
    "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type", "num_class_embeds",
    "upcast_attention", "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "mid_block_type",
    "addition_embed_type", "addition_time_embed_dim",
)
# Param subtrees from_unet copies from the UNet (time_proj has no params).
_COPIED_FROM_UNET = ("conv_in", "time_embedding", "down_blocks_", "mid_block")


def _copied_from_unet(top: str) -> bool:
    return any(top == p or (p.endswith("_") and top.startswith(p)) for p in _COPIED_FROM_UNET)


class ControlNetConditioningEmbedding(nn.Module):
    """diffusers' ControlNetConditioningEmbedding: control image -> (B, h, w, out_channels).

    conv_in, then per step a width-keeping conv and a stride-2 conv to the next width
    (`blocks_2i`, `blocks_2i+1`), SiLU after each, then conv_out to the UNet's first width.
    """
    out_channels: int
    block_out_channels: Sequence[int]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cond: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        channels = self.block_out_channels
        x = nn.silu(conv(channels[0], 3, name="conv_in", **kw)(cond))
        for i, (width, next_width) in enumerate(zip(channels[:-1], channels[1:])):
            x = nn.silu(conv(width, 3, name=f"blocks_{2 * i}", **kw)(x))
            x = nn.silu(conv(next_width, 3, strides=2, name=f"blocks_{2 * i + 1}", **kw)(x))
        return conv(self.out_channels, 3, name="conv_out", **kw)(x)


class ControlNetModel(nn.Module):
    """diffusers ControlNetModel; fields named and defaulted like its config keys.

    The UNet's heads quirk holds here too: without `num_attention_heads`, `attention_head_dim`
    is the number of heads. `layers_per_block` is one int (diffusers' ControlNet takes no list).
    """
    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | Sequence[int] = 1280
    transformer_layers_per_block: int | Sequence[int] = 1
    attention_head_dim: int | Sequence[int] = 8
    num_attention_heads: int | Sequence[int] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: Sequence[int] = DEFAULT_CONDITIONING_EMBEDDING_OUT_CHANNELS
    global_pool_conditions: bool = False
    # Not diffusers config: compute dtype, parameter dtype, per-block rematerialisation.
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = False
    config_json: str = "{}"

    @property
    def cond_scale_factor(self) -> int:
        """Control image size / latent size: each embedding step after the first halves it."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 controlnet_cond: jax.Array, conditioning_scale: jax.Array | float = 1.0
                 ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        self._check_inputs(sample, controlnet_cond)
        n = len(self.block_out_channels)
        heads = _per_block(self.num_attention_heads or self.attention_head_dim, n)
        depth = _per_block(self.transformer_layers_per_block, n)
        shared = Shared(self.norm_num_groups, self.norm_eps, self.use_linear_projection, self.upcast_attention,
                        remat_policy_name(self.remat), self.dtype, self.param_dtype)
        kw, context = shared.kw, encoder_hidden_states

        if self.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]  # diffusers flips the channel axis
        cond = ControlNetConditioningEmbedding(self.block_out_channels[0],
                                               tuple(self.conditioning_embedding_out_channels),
                                               name="controlnet_cond_embedding", **kw)(controlnet_cond)
        # diffusers' ControlNet has neither center_input_sample nor conv_in_kernel: always 3x3.
        x, emb, skips = embed_time_and_encode(self, sample, timesteps, context, (self.layers_per_block,) * n,
                                              heads, depth, shared, added_to_stem=cond)
        x = UNetMidBlock2DCrossAttn(heads[-1], depth[-1], self.mid_block_scale_factor, shared,
                                    name="mid_block")(x, emb, context)

        # One 1x1 conv per skip, each keeping its width.
        down = [conv(s.shape[-1], 1, name=f"controlnet_down_blocks_{i}", **kw)(s) for i, s in enumerate(skips)]
        mid = conv(x.shape[-1], 1, name="controlnet_mid_block", **kw)(x)
        scale = jnp.asarray(conditioning_scale, jnp.float32)
        down, mid = [r.astype(jnp.float32) * scale for r in down], mid.astype(jnp.float32) * scale
        if self.global_pool_conditions:
            pool = lambda r: jnp.mean(r, axis=(1, 2), keepdims=True)
            down, mid = [pool(r) for r in down], pool(mid)
        return tuple(down), mid

    def _check_inputs(self, sample: jax.Array, cond: jax.Array) -> None:
        if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
            raise ValueError(f"ControlNet sample must be (B, h, w, {self.in_channels}) NHWC, got {sample.shape}")
        f = self.cond_scale_factor
        want = (sample.shape[1] * f, sample.shape[2] * f, self.conditioning_channels)
        if cond.ndim != 4 or tuple(cond.shape[1:]) != want or cond.shape[0] not in (1, sample.shape[0]):
            raise ValueError(
                f"controlnet_cond must be (B or 1, {want[0]}, {want[1]}, {want[2]}) NHWC for a sample of shape "
                f"{tuple(sample.shape)} ({f}x the latent size, conditioning_channels {want[2]}), got "
                f"{tuple(cond.shape)}")

    # ------------------------------------------------------------------ config and weights

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> "ControlNetModel":
        """Module from a diffusers ControlNetModel config dict; `kwargs` set dtype, param_dtype, remat."""
        config = dict(config)
        n = len(config.get("block_out_channels", cls.block_out_channels))
        unsupported = weights.UnsupportedConfigError
        weights.check_config("ControlNet", config, CONFIG_KEYS + _INERT, _ONLY)
        if len(config.get("down_block_types", cls.down_block_types)) != n:
            raise weights.WeightLoadError("ControlNet config: block_out_channels and down_block_types differ in length")
        check_block_config("ControlNet", config, n, {"down_block_types": _DOWN_BLOCKS})
        if not isinstance(config.get("layers_per_block", 2), int):
            raise unsupported(f"ControlNet config layers_per_block={config['layers_per_block']!r} is not supported "
                              "(one int, as diffusers' ControlNetModel takes)")
        if not config.get("conditioning_embedding_out_channels", cls.conditioning_embedding_out_channels):
            raise unsupported("ControlNet config conditioning_embedding_out_channels must be a non-empty list")
        fields = {k: _tuples(config[k]) for k in CONFIG_KEYS if k in config}
        return cls(**fields, config_json=json.dumps(config, sort_keys=True), **kwargs)

    @property
    def config(self) -> dict[str, Any]:
        """The diffusers config: the one built from, with the current field values laid over."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in CONFIG_KEYS)}
        return {"_class_name": "ControlNetModel", **json.loads(self.config_json), **fields}

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array, ...]:
        """Smallest valid inputs (for init / eval_shape; param shapes do not depend on H, W)."""
        size = 2 ** (len(self.block_out_channels) - 1)
        cond = size * self.cond_scale_factor
        width = _per_block(self.cross_attention_dim, 1)[0]
        return (jnp.zeros((batch, size, size, self.in_channels), self.dtype), jnp.zeros((batch,), jnp.float32),
                jnp.zeros((batch, 1, width), self.dtype),
                jnp.zeros((batch, cond, cond, self.conditioning_channels), self.dtype))

    def abstract_params(self) -> dict[str, Any]:
        """The params' shapes and dtypes (jax.ShapeDtypeStruct), traced, nothing compiled."""
        return nn.unbox(jax.eval_shape(lambda: self.init(jax.random.key(0), *self.dummy_inputs())))["params"]

    @classmethod
    def from_pretrained(cls, folder: str | Path, subfolder: str | None = None, *, dtype: Dtype = jnp.float32,
                        param_dtype: Dtype = jnp.float32, remat: bool | str = False, allow_pickle: bool = False,
                        shardings: Any = None, on_host: bool = False) -> tuple["ControlNetModel", dict[str, Any]]:
        """(module, params) from a diffusers ControlNet folder (config.json and weights at its top
        unless `subfolder`). Params placed as UNet2DConditionModel.from_pretrained places them."""
        build = lambda config: cls.from_config(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
        return weights.load_pretrained(folder, subfolder, build, lambda module: module.dummy_inputs(),
                                       allow_pickle=allow_pickle, dtype=param_dtype, shardings=shardings,
                                       on_host=on_host)

    def save_pretrained(self, params: Mapping[str, Any], folder: str | Path) -> Path:
        """Writes config.json and diffusion_pytorch_model.safetensors that diffusers loads."""
        return weights.save_pretrained(folder, self.config, nn.unbox(params), WEIGHTS_NAME)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, unet_params: Mapping[str, Any] | None,
                  conditioning_channels: int = 3, *, controlnet_conditioning_channel_order: str = "rgb",
                  conditioning_embedding_out_channels: Sequence[int] = DEFAULT_CONDITIONING_EMBEDDING_OUT_CHANNELS,
                  seed: int = 0) -> tuple["ControlNetModel", dict[str, Any] | None]:
        """(module, params) started from a UNet, as diffusers' ControlNetModel.from_unet.

        The config takes the UNet's keys; conv_in, the time embedding, the down blocks and the
        mid block are the UNet's own arrays; the controlnet_* convs and the conditioning
        embedding's conv_out are zero, its other convs drawn from `seed` like torch's default
        Conv2d init (uniform within 1/sqrt(fan_in), weight and bias). dtype, param_dtype and
        remat follow the UNet module. `unet_params` None: (module, None).
        """
        if unet.conv_in_kernel != 3:
            raise weights.UnsupportedConfigError(
                f"UNet config conv_in_kernel={unet.conv_in_kernel} has no ControlNet (its conv_in is 3x3)")
        config = config_from_unet(unet.config, conditioning_channels=conditioning_channels,
                                  controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
                                  conditioning_embedding_out_channels=conditioning_embedding_out_channels)
        module = cls.from_config(config, dtype=unet.dtype, param_dtype=unet.param_dtype, remat=unet.remat)
        if unet_params is None:
            return module, None
        unet_params = nn.unbox(unet_params)
        abstract = traverse_util.flatten_dict(module.abstract_params())
        copied = traverse_util.flatten_dict({k: v for k, v in unet_params.items() if _copied_from_unet(k)})
        fresh = sorted(p for p in abstract if not _copied_from_unet(p[0]))
        wanted = {p for p in abstract if _copied_from_unet(p[0])}
        if set(copied) != wanted or any(tuple(copied[p].shape) != tuple(abstract[p].shape) for p in wanted):
            odd = sorted("/".join(p) for p in set(copied) ^ wanted) or sorted(
                "/".join(p) for p in wanted if tuple(copied[p].shape) != tuple(abstract[p].shape))
            raise weights.WeightLoadError(f"the UNet params do not fit its own config; differing: {', '.join(odd[:5])}")
        keys = jax.random.split(jax.random.key(seed), max(len(fresh), 1))
        params = dict(copied)
        for path, key in zip(fresh, keys):
            shape, dtype = abstract[path].shape, abstract[path].dtype
            if path[0] == "controlnet_cond_embedding" and path[1] != "conv_out":
                # torch's Conv2d init: kaiming_uniform(a=sqrt(5)) is uniform within 1/sqrt(fan_in),
                # and its bias draws from the same bound.
                fan_in = np.prod(abstract[path[:-1] + ("kernel",)].shape[:-1])
                bound = 1.0 / np.sqrt(fan_in)
                params[path] = jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
            else:  # the zero convs (diffusers' zero_module)
                params[path] = jnp.zeros(shape, dtype)
        return module, traverse_util.unflatten_dict(params)


def config_from_unet(unet_config: Mapping[str, Any], *, conditioning_channels: int = 3,
                     controlnet_conditioning_channel_order: str = "rgb",
                     conditioning_embedding_out_channels: Sequence[int] = DEFAULT_CONDITIONING_EMBEDDING_OUT_CHANNELS,
                     global_pool_conditions: bool = False) -> dict[str, Any]:
    """The ControlNetModel config diffusers' from_unet builds for a UNet config (its keys that apply)."""
    config = {k: unet_config[k] for k in _FROM_UNET_KEYS if k in unet_config}
    config.update(_class_name="ControlNetModel", conditioning_channels=conditioning_channels,
                  controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
                  conditioning_embedding_out_channels=list(conditioning_embedding_out_channels),
                  global_pool_conditions=global_pool_conditions)
    if "_diffusers_version" in unet_config:
        config["_diffusers_version"] = unet_config["_diffusers_version"]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
