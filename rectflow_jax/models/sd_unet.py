"""Stable Diffusion UNet: diffusers' `UNet2DConditionModel` (SD 1.x / 2.x) in Flax linen, NHWC.

Submodules carry the diffusers attribute names (`down_blocks_0/attentions_1/...`), so
`rectflow_jax.weights` maps every leaf to its PyTorch tensor: `from_pretrained` reads a
diffusers `unet/` folder and `save_pretrained` writes one that diffusers loads back.

Call: `module.apply({'params': p}, sample, timesteps, encoder_hidden_states,
down_block_additional_residuals=None, mid_block_additional_residual=None)` with sample
(B, H, W, C), timesteps (B,) or a scalar in SD units (0..1000) and encoder_hidden_states
(B, L, D); returns (B, H, W, out_channels) in float32 whatever the compute `dtype`.
The residuals (a ControlNet's outputs, models/controlnet.py) are diffusers': one per skip,
in the order the skips are made (conv_in, every down-block layer, every downsampler),
each added to its skip, and one added to the mid block's output; both or neither.

The module's fields are the diffusers config keys it implements, under their diffusers
names and meanings; `config_json` keeps the whole config.json it was built from (a string,
so the module stays hashable) and `module.config` gives it back with the fields laid over.
Config features outside SD 1.x / 2.x, and keys the port does not know, raise
weights.UnsupportedConfigError (a NotImplementedError too) naming the key.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rectflow_jax import weights
from rectflow_jax.models.layers import (
    FF_LAYOUT, Downsample2D, ResnetBlock2D, Upsample2D, attention, constrain, conv, dense, group_norm, layer_norm,
    remat_policy_name, rematerialised, sinusoidal_embedding)

Dtype = Any
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# diffusers config keys held as module fields (same names, same meanings, same defaults).
CONFIG_KEYS = (
    "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
    "down_block_types", "mid_block_type", "up_block_types", "block_out_channels", "layers_per_block",
    "downsample_padding", "mid_block_scale_factor", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "upcast_attention", "conv_in_kernel", "conv_out_kernel",
)
# Keys supported only at these values (the diffusers default, or equivalents).
_ONLY = {
    "act_fn": ("silu", "swish"), "dropout": (0,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "num_class_embeds": (None,), "addition_embed_type": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "resnet_time_scale_shift": ("default",), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "reverse_transformer_layers_per_block": (None,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
}
# Keys diffusers passes only to blocks, embeddings and mid blocks refused here (Simple*,
# ResnetDownsample, class / addition embeddings), so no value of theirs reaches a UNet
# this port builds. only_cross_attention is checked per block in from_config.
_INERT = ("resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm", "mid_block_only_cross_attention",
          "addition_embed_type_num_heads", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
          "only_cross_attention")
_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has cross-attention
_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _per_block(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _residual(residual: jax.Array, target: jax.Array, what: str) -> jax.Array:
    """`residual` checked to add onto `target` without changing its shape, in its dtype.

    Broadcasting is allowed (a global_pool_conditions ControlNet gives (B, 1, 1, C)), as torch's
    addition allows it in diffusers; growing the target is not.
    """
    shape = tuple(getattr(residual, "shape", ()))
    try:
        fits = len(shape) == target.ndim and jnp.broadcast_shapes(shape, target.shape) == target.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{what} has shape {shape}; it must match (or broadcast to) the UNet's "
                         f"{tuple(target.shape)} there")
    return jnp.asarray(residual).astype(target.dtype)


def check_block_config(model: str, config: Mapping[str, Any], n: int, block_types: Mapping[str, Mapping]) -> None:
    """The block settings this port refuses, shared by the UNet and the ControlNet built from its blocks."""
    unsupported = weights.UnsupportedConfigError
    if "norm_num_groups" in config and config["norm_num_groups"] is None:
        raise unsupported(f"{model} config norm_num_groups=None is not supported")
    if any(_per_block(config.get("only_cross_attention", False), n)):
        raise unsupported(f"{model} config only_cross_attention=True is not supported")
    for key, known in block_types.items():
        for kind in config.get(key, ()):
            if kind not in known:
                raise unsupported(f"{model} config {key} entry {kind!r} is not supported (only {list(known)})")
    if len(set(_per_block(config.get("cross_attention_dim", 1280), n))) > 1:
        raise unsupported(f"{model} config cross_attention_dim differing per block is not supported")
    if any(isinstance(v, (list, tuple)) for v in _per_block(config.get("transformer_layers_per_block", 1), n)):
        raise unsupported(f"{model} config transformer_layers_per_block nested per layer is not supported")


def _tuples(value: Any) -> Any:
    """JSON lists -> tuples, so config values can be (hashable) module fields."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class Shared:
    """Settings every block shares (one hashable field instead of seven)."""
    groups: int
    eps: float
    use_linear_projection: bool
    upcast_attention: bool
    remat: str     # a layers.REMAT_POLICIES name
    dtype: Dtype
    param_dtype: Dtype

    @property
    def kw(self) -> dict[str, Dtype]:
        return {"dtype": self.dtype, "param_dtype": self.param_dtype}

    def resnet(self, out_channels: int, name: str, output_scale_factor: float = 1.0) -> nn.Module:
        """A ResnetBlock2D with these norm settings (rematerialised under `remat`), named `name`."""
        block = rematerialised(ResnetBlock2D, self.remat)
        return block(out_channels, self.groups, self.eps, output_scale_factor, name=name, **self.kw)


class Attention(nn.Module):
    heads: int
    dim_head: int
    shared: Shared

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        return attention(x, context, heads=self.heads, inner=self.heads * self.dim_head,
                         upcast=self.shared.upcast_attention, **self.shared.kw)


class GEGLU(nn.Module):
    features: int
    shared: Shared

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Value and gate halves each split over 'tensor' the same way, so the product stays local.
        proj = dense(2 * self.features, axes=("embed", "ff"), name="proj", **self.shared.kw)(x)
        h, gate = (constrain(half, FF_LAYOUT) for half in jnp.split(proj, 2, axis=-1))
        return h * jax.nn.gelu(gate, approximate=False)  # torch F.gelu is the exact (erf) form


class FeedForward(nn.Module):
    shared: Shared

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(4 * x.shape[-1], self.shared, name="net_0")(x)  # net_1 is dropout: no params
        return dense(x.shape[-1], axes=("ff", "embed"), name="net_2", **self.shared.kw)(constrain(h, FF_LAYOUT))


class BasicTransformerBlock(nn.Module):
    heads: int
    dim_head: int
    shared: Shared

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        norm = lambda name: layer_norm(1e-5, name=name, **self.shared.kw)
        attn = lambda name: Attention(self.heads, self.dim_head, self.shared, name=name)
        x = x + attn("attn1")(norm("norm1")(x))
        x = x + attn("attn2")(norm("norm2")(x), context)
        return x + FeedForward(self.shared, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    heads: int
    depth: int
    shared: Shared

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        s, kw = self.shared, self.shared.kw
        b, height, width, channels = x.shape
        dim_head = channels // self.heads  # diffusers floors: inner width may be < channels
        inner = self.heads * dim_head
        # Dense (SD 2.x) and 1x1 conv (SD 1.x) are the same map on NHWC; they differ only in
        # the stored tensor layout, which must round-trip to diffusers.
        proj = ((lambda f, name: dense(f, name=name, **kw)) if s.use_linear_projection
                else (lambda f, name: conv(f, 1, name=name, **kw)))
        h = group_norm(s.groups, 1e-6, name="norm", **kw)(x)  # fixed 1e-6, not the UNet norm_eps
        h = proj(inner, "proj_in")(h).reshape(b, height * width, inner)
        block = rematerialised(BasicTransformerBlock, s.remat)
        for i in range(self.depth):
            h = block(self.heads, dim_head, s, name=f"transformer_blocks_{i}")(h, context)
        return x + proj(channels, "proj_out")(h.reshape(b, height, width, inner))


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D when `attention`, else DownBlock2D."""
    attention: bool
    out_channels: int
    num_layers: int
    heads: int
    depth: int
    add_downsample: bool
    downsample_padding: int
    shared: Shared

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for i in range(self.num_layers):
            x = self.shared.resnet(self.out_channels, f"resnets_{i}")(x, temb)
            if self.attention:
                x = Transformer2DModel(self.heads, self.depth, self.shared, name=f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.downsample_padding, name="downsamplers_0", **self.shared.kw)(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D when `attention`, else UpBlock2D; consumes one skip per resnet."""
    attention: bool
    out_channels: int
    heads: int
    depth: int
    add_upsample: bool
    shared: Shared

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size):
        for i, skip in enumerate(reversed(skips)):
            x = self.shared.resnet(self.out_channels, f"resnets_{i}")(jnp.concatenate([x, skip], -1), temb)
            if self.attention:
                x = Transformer2DModel(self.heads, self.depth, self.shared, name=f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(name="upsamplers_0", **self.shared.kw)(x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    heads: int
    depth: int
    output_scale_factor: float
    shared: Shared

    @nn.compact
    def __call__(self, x, temb, context):
        res = lambda i: self.shared.resnet(x.shape[-1], f"resnets_{i}", self.output_scale_factor)
        x = res(0)(x, temb)
        x = Transformer2DModel(self.heads, self.depth, self.shared, name="attentions_0")(x, context)
        return res(1)(x, temb)


class TimestepEmbedding(nn.Module):
    features: int
    shared: Shared

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(dense(self.features, name="linear_1", **self.shared.kw)(x))
        return dense(self.features, name="linear_2", **self.shared.kw)(x)


def embed_time_and_encode(module: nn.Module, sample: jax.Array, timesteps: jax.Array | float,
                          context: jax.Array, layers: Sequence[int], heads: Sequence[int], depth: Sequence[int],
                          shared: Shared, conv_in_kernel: int = 3, added_to_stem: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """The encoder the UNet and the ControlNet share: time embedding, conv_in (plus `added_to_stem`, a
    ControlNet's conditioning embedding) and the down blocks. Returns (x, emb, skips); call it from
    `module`'s compact method, whose submodules these become (the param names are diffusers')."""
    n = len(module.block_out_channels)
    ch0 = module.block_out_channels[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), sample.shape[:1])
    emb = sinusoidal_embedding(t, ch0, flip_sin_to_cos=module.flip_sin_to_cos, freq_shift=module.freq_shift)
    emb = TimestepEmbedding(4 * ch0, shared, name="time_embedding")(emb)
    x = conv(ch0, conv_in_kernel, padding=(conv_in_kernel - 1) // 2, name="conv_in", **shared.kw)(sample)
    if added_to_stem is not None:
        x = x + added_to_stem
    skips = [x]
    for i, (kind, ch) in enumerate(zip(module.down_block_types, module.block_out_channels)):
        x, res = DownBlock(_DOWN_BLOCKS[kind], ch, layers[i], heads[i], depth[i], i < n - 1,
                           module.downsample_padding, shared, name=f"down_blocks_{i}")(x, emb, context)
        skips += res
    return x, emb, skips


class UNet2DConditionModel(nn.Module):
    """diffusers UNet2DConditionModel; fields named and defaulted like its config keys.

    Note the diffusers quirk kept here: without `num_attention_heads`, `attention_head_dim`
    is the NUMBER of heads (per block if a sequence); the head width is channels // heads.
    `num_attention_heads` takes precedence when set (diffusers' own UNet2DConditionModel
    refuses that key with a ValueError, so such configs only come from elsewhere).
    """
    sample_size: Any = None  # carried for pipelines; any H, W works
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int | Sequence[int] = 2
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
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # Not diffusers config: compute dtype (e.g. bf16), parameter dtype, per-block rematerialisation.
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = False   # layers.REMAT_POLICIES: 'none', 'full', 'dots_saveable' (True: 'full')
    config_json: str = "{}"

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 down_block_additional_residuals: Sequence[jax.Array] | None = None,
                 mid_block_additional_residual: jax.Array | None = None) -> jax.Array:
        n = len(self.block_out_channels)
        heads = _per_block(self.num_attention_heads or self.attention_head_dim, n)
        layers = _per_block(self.layers_per_block, n)
        depth = _per_block(self.transformer_layers_per_block, n)
        shared = Shared(self.norm_num_groups, self.norm_eps, self.use_linear_projection, self.upcast_attention,
                        remat_policy_name(self.remat), self.dtype, self.param_dtype)
        kw, context = shared.kw, encoder_hidden_states

        if self.center_input_sample:
            sample = 2 * sample - 1.0
        x, emb, skips = embed_time_and_encode(self, sample, timesteps, context, layers, heads, depth, shared,
                                              self.conv_in_kernel)
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            # diffusers reads down residuals alone as T2I-Adapter ones and ignores a mid one alone.
            raise ValueError("down_block_additional_residuals and mid_block_additional_residual go together "
                             "(a ControlNet's outputs): pass both or neither")
        if down_block_additional_residuals is not None:
            residuals = tuple(down_block_additional_residuals)
            if len(residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(residuals)} tensors; this UNet makes "
                                 f"{len(skips)} skips (conv_in, each down-block layer, each downsampler)")
            # Added to the skips only, as diffusers does: the running sample goes on unchanged.
            skips = [skip + _residual(r, skip, f"down_block_additional_residuals[{i}]")
                     for i, (skip, r) in enumerate(zip(skips, residuals))]
        if self.mid_block_type is not None:
            x = UNetMidBlock2DCrossAttn(heads[-1], depth[-1], self.mid_block_scale_factor, shared,
                                        name="mid_block")(x, emb, context)
        if mid_block_additional_residual is not None:
            x = x + _residual(mid_block_additional_residual, x, "mid_block_additional_residual")
        for i, kind in enumerate(self.up_block_types):
            j = n - 1 - i  # the down block this up block mirrors
            k = layers[j] + 1
            res, skips = skips[-k:], skips[:-k]
            upsample_size = skips[-1].shape[1:3] if skips else None
            x = UpBlock(_UP_BLOCKS[kind], self.block_out_channels[j], heads[j], depth[j], i < n - 1, shared,
                        name=f"up_blocks_{i}")(x, tuple(res), emb, context, upsample_size)

        x = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kw)(x))
        x = conv(self.out_channels, self.conv_out_kernel, padding=(self.conv_out_kernel - 1) // 2,
                 name="conv_out", **kw)(x)
        return x.astype(jnp.float32)

    # ------------------------------------------------------------------ config and weights

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> "UNet2DConditionModel":
        """Module from a diffusers config dict; `kwargs` set dtype, param_dtype, remat."""
        config = dict(config)
        n = len(config.get("block_out_channels", cls.block_out_channels))
        weights.check_config("UNet", config, CONFIG_KEYS + _INERT, _ONLY)
        check_block_config("UNet", config, n, {"down_block_types": _DOWN_BLOCKS, "up_block_types": _UP_BLOCKS})
        fields = {k: _tuples(config[k]) for k in CONFIG_KEYS if k in config}
        return cls(**fields, config_json=json.dumps(config, sort_keys=True), **kwargs)

    @property
    def config(self) -> dict[str, Any]:
        """The diffusers config: the one built from, with the current field values laid over."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in CONFIG_KEYS)}
        return {"_class_name": "UNet2DConditionModel", **json.loads(self.config_json), **fields}

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Smallest valid inputs (for init / eval_shape; param shapes do not depend on H, W)."""
        size = 2 ** (len(self.block_out_channels) - 1)
        width = _per_block(self.cross_attention_dim, 1)[0]
        return (jnp.zeros((batch, size, size, self.in_channels), self.dtype), jnp.zeros((batch,), jnp.float32),
                jnp.zeros((batch, 1, width), self.dtype))

    @classmethod
    def from_pretrained(cls, folder: str | Path, subfolder: str | None = "unet", *, dtype: Dtype = jnp.float32,
                        param_dtype: Dtype = jnp.float32, remat: bool | str = False, allow_pickle: bool = False,
                        shardings: Any = None, on_host: bool = False) -> tuple["UNet2DConditionModel", dict[str, Any]]:
        """(module, params) from a diffusers folder.

        Params are jax.Arrays in `param_dtype` on the default device, or placed by
        `shardings` (one Sharding, or a tree of them like the params); numpy if `on_host`.
        """
        build = lambda config: cls.from_config(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
        return weights.load_pretrained(folder, subfolder, build, lambda module: module.dummy_inputs(),
                                       allow_pickle=allow_pickle, dtype=param_dtype, shardings=shardings,
                                       on_host=on_host)

    def save_pretrained(self, params: Mapping[str, Any], folder: str | Path) -> Path:
        """Writes config.json and diffusion_pytorch_model.safetensors that diffusers loads."""
        return weights.save_pretrained(folder, self.config, nn.unbox(params), WEIGHTS_NAME)
