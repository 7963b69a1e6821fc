"""LoRA files for our Flax SD UNet and CLIP text encoder: read in the layouts people share, then merged.

    params = {"unet": unet_params, "text_encoder": clip_params}      # a 'vae' entry is left alone
    style = read_lora("style.safetensors", params)
    merged = merge(params, [style], [0.8])     # W + 0.8 * (alpha / rank) * delta, on each targeted kernel
    loras, scales = load_loras(["a.safetensors:0.7", "b.safetensors:0.3"], params)   # the CLI's FILE[:SCALE]

File layouts (safetensors; told apart by the key names, one layout a file):
  peft       what diffusers' `save_lora_weights` and PEFT write: `unet.<module>.lora_A.weight` (down)
             and `.lora_B.weight` (up), `text_encoder.<module>...` with transformers' module names,
             `text_model.encoder.layers.0.self_attn.q_proj` (or without `text_model.`, as
             transformers >= 5 names them; both are read). alpha: the PEFT LoraConfig diffusers
             packs into the header, `__metadata__["lora_adapter_metadata"]` = JSON of
             {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {...}, "unet.rank_pattern":
             {...}, "text_encoder.lora_alpha": ...} (un-prefixed keys, as `save_lora_adapter` of one
             model writes, serve every component); or per-module `<prefix>.<module>.alpha` tensors,
             which come first where a file has both.
  diffusers  older diffusers names of the same factors: `.lora.down.weight` / `.lora.up.weight`,
             `.lora_linear_layer.down/up.weight`, attention processors' `attn1.processor.to_q_lora.down.weight`
             (to_out_lora is to_out.0; self_attn.to_q_lora is q_proj in the text encoder).
  kohya      sd-scripts / A1111: `lora_unet_<module, dots as underscores>.lora_down.weight`, `.lora_up.weight`,
             `.alpha`; `lora_te_<text-encoder module>` (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`).
             Underscore names are mapped back through a table built from the params of every
             dense / conv module, so nothing is guessed and a name two modules share is refused.
Keys without a component prefix are the UNet's (the text encoder's when they start `text_model.`).

The scale of a module is alpha / rank (alpha / sqrt(rank) under PEFT's use_rslora). Without any
alpha it is 1 (alpha = rank), as diffusers does (peft_utils.get_peft_kwargs mirrors the rank into
lora_alpha); a kohya `.alpha` of 0 also means alpha = rank, as in sd-scripts.

A target is any kernel: attention to_q/k/v/out.0, ff.net.0.proj, ff.net.2, proj_in/out (1x1
convs in SD 1.x, dense in 2.x), time_emb_proj, resnet and sampler convs, CLIP's q/k/v/out_proj,
fc1/fc2. Torch factors are down (r, in) or (r, in, kh, kw) and up (out, r) or (out, r, 1, 1); a
1x1 conv takes either form. They are stored in Flax layout with the scale folded into `up`:
`down` shaped like the kernel with its last (output) axis replaced by r, `up` (r, out), so a
kernel's update is tensordot(down, up, 1) (HWIO for convs, (in, out) for dense).

`merge` is pure and jittable, the scales possibly traced: merged once eagerly, sampling costs
what it did without LoRA; merged inside a compiled sampler from the base params and the
factors (`[l.factors for l in loras]`, device_put once), the scales are runtime inputs and
change without a reload or a recompile. Reading is strict: every key that matches no module,
every mis-shaped or unpaired factor and every adapter kind that is not a plain LoRA (LoHa,
LoKr, DoRA, LoCon's lora_mid) is named in one LoRAError, with the file; SDXL files (lora_te1_ /
lora_te2_, text_encoder_2.) are refused as such.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rectflow_jax import storage, weights

COMPONENTS = ("unet", "text_encoder")
TEXT_PREFIX = "text_model."  # transformers < 5 (and released files) name the CLIP modules with it
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
_KOHYA_ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_PEFT_ROLES = {".lora_A.weight": "down", ".lora_B.weight": "up",
               ".lora_A.default.weight": "down", ".lora_B.default.weight": "up"}
_DIFFUSERS_ROLES = {".lora.down.weight": "down", ".lora.up.weight": "up",
                    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up"}
# Attention processors' LoRA (diffusers < 0.19): `<attn>.processor.to_q_lora.down.weight`.
_PROCESSOR = re.compile(r"(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PROCESSOR_TARGETS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                      "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
# Tensors of adapters that are not a plain LoRA: merging only the low-rank part would be wrong.
_FOREIGN = re.compile(r"(hada_|lokr_|\.lora_mid\.|dora_scale|lora_magnitude_vector|lora_embedding_|"
                      r"\.lora_B(\.default)?\.bias$|\.diff(_b)?$)")
_SDXL = re.compile(r"^(lora_te1_|lora_te2_|text_encoder_2\.)")
_LDM_UNET = re.compile(r"^(input_blocks|middle_block|output_blocks)_")  # kohya on the original SD UNet


class LoRAError(weights.WeightLoadError):
    """A LoRA file that cannot be applied to these params; the message names the file and every offending key."""


@dataclasses.dataclass(frozen=True, eq=False)
class LoRA:
    """One LoRA file read against a model: factors in Flax layout with alpha / rank folded in.

    `factors[component]["/"-joined Flax path of the kernel"] = (down, up)`, float32 numpy; a
    plain pytree (pass `lora.factors` into jit). `ranks` are the distinct ranks of the file.
    """
    source: str
    layout: str                   # 'peft', 'diffusers' or 'kohya'
    ranks: tuple[int, ...]
    factors: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]

    @property
    def num_targets(self) -> int:
        return sum(len(by_path) for by_path in self.factors.values())

    def __repr__(self) -> str:
        counts = ", ".join(f"{c} {len(f)}" for c, f in self.factors.items())
        return f"LoRA({self.source!r}, layout={self.layout}, ranks={self.ranks}, targets: {counts})"


# ----------------------------------------------------------------------------- specs


def parse_lora_spec(text: str) -> tuple[str, float]:
    """'FILE' or 'FILE:SCALE' -> (file, scale), scale 1.0 by default (weights.parse_scaled_path)."""
    return weights.parse_scaled_path(text, "LoRA", default=1.0)


# ----------------------------------------------------------------------------- the model's targets


@dataclasses.dataclass(frozen=True)
class _Target:
    name: str                     # PyTorch module name (text encoder: with text_model.)
    path: str                     # '/'-joined Flax path of the kernel
    shape: tuple[int, ...]        # the kernel's shape, Flax layout


def _targets(params: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, _Target | None]]:
    """(component, 'dotted' | 'kohya') -> every name a file may give a dense / conv module.

    Names are PyTorch's (weights.torch_name, as the loaders map every leaf), for the text encoder
    both with and without text_model.; kohya's are the same with dots as underscores. A name two
    modules share maps to None (refused, never guessed).
    """
    table: dict[tuple[str, str], dict[str, _Target | None]] = {}
    for component in COMPONENTS:
        if component not in params:
            continue
        dotted, kohya = table.setdefault((component, "dotted"), {}), table.setdefault((component, "kohya"), {})
        for path, leaf in traverse_util.flatten_dict(params[component]).items():
            if path[-1] != "kernel":
                continue
            name = weights.torch_name(path).removesuffix(".weight")
            target = _Target(TEXT_PREFIX + name if component == "text_encoder" else name, "/".join(path),
                             tuple(leaf.shape))
            for names, alias in [(dotted, a) for a in {target.name, name}] + \
                                [(kohya, a.replace(".", "_")) for a in {target.name, name}]:
                names[alias] = target if names.get(alias, target) == target else None
    return table


# ----------------------------------------------------------------------------- reading


def _header_metadata(file: str | Path) -> dict[str, str]:
    """The safetensors header's __metadata__ (string values)."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return header.get("__metadata__") or {}


def _adapter_configs(file: str | Path) -> dict[str, dict[str, Any]]:
    """component -> the PEFT LoraConfig fields diffusers stored for it ('*' for un-prefixed fields)."""
    raw = _header_metadata(file).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoRAError(f"LoRA {str(file)!r}: its header's {METADATA_KEY} is not JSON: {err}") from None
    if not isinstance(packed, dict):
        raise LoRAError(f"LoRA {str(file)!r}: its header's {METADATA_KEY} is not a JSON object of LoraConfig fields")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        component, dot, field = key.partition(".")
        if dot and component in COMPONENTS + ("text_encoder_2",):
            configs.setdefault(component, {})[field] = value
        else:
            configs.setdefault("*", {})[key] = value
    return configs


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """(layout, component, module as the file names it, 'down' | 'up' | 'alpha'), or None if no layout has it."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            module, dot, rest = key[len(prefix):].partition(".")
            role = _KOHYA_ROLES.get(dot + rest)
            return ("kohya", component, module, role) if role else None
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        component, rest = ("text_encoder" if key.startswith(TEXT_PREFIX) else "unet"), key
    if match := _PROCESSOR.search(rest):
        module = rest[:match.start()] + "." + _PROCESSOR_TARGETS[component][match.group(1)]
        return "diffusers", component, module, match.group(2)
    for layout, roles in (("peft", _PEFT_ROLES), ("diffusers", _DIFFUSERS_ROLES)):
        for suffix, role in roles.items():
            if rest.endswith(suffix):
                return layout, component, rest[:-len(suffix)].replace(".processor", ""), role
    if rest.endswith(".alpha"):
        return "peft", component, rest[:-len(".alpha")].replace(".processor", ""), "alpha"
    return None


def _pattern_value(patterns: Mapping[str, Any], names: Sequence[str], default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key,
    a regex, that matches the end of a module name at a dot. Tried on each spelling of the name."""
    for pattern, value in patterns.items():
        if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
            return value
    return default


def _torch_shapes(kernel: tuple[int, ...]) -> str:
    if len(kernel) == 2:
        return f"down (r, {kernel[0]}), up ({kernel[1]}, r)"
    kh, kw, cin, cout = kernel
    return f"down (r, {cin}, {kh}, {kw}), up ({cout}, r, 1, 1)"


def _flax_factors(down: np.ndarray, up: np.ndarray, kernel: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """torch (down, up) -> (kernel[:-1] + (r,), (r, out)) in float32, or None if they do not fit the kernel."""
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        return None
    rank = down.shape[0]
    if up.shape[1] != rank:
        return None
    down, up = down.astype(np.float32), up.reshape(up.shape[:2]).astype(np.float32)
    if len(kernel) == 2:  # Dense (in, out); a 1x1-conv LoRA fits it too
        if down.ndim == 4 and down.shape[2:] != (1, 1):
            return None
        flax_down = down.reshape(rank, -1).T
    elif down.ndim == 2:  # a linear LoRA on a 1x1 conv (SD 1.x proj_in / proj_out)
        if kernel[:2] != (1, 1):
            return None
        flax_down = down.T.reshape(1, 1, down.shape[1], rank)
    else:
        flax_down = down.transpose(2, 3, 1, 0)  # (r, in, kh, kw) -> (kh, kw, in, r), as OIHW -> HWIO
    flax_up = up.T
    if flax_down.shape[:-1] != kernel[:-1] or flax_up.shape[1] != kernel[-1]:
        return None
    return flax_down, flax_up


def _listed(label: str, keys: Sequence[str]) -> str:
    return f"{label} ({len(keys)}): {', '.join(sorted(keys))}"


def read_lora(file: str | os.PathLike, params: Mapping[str, Any]) -> LoRA:
    """The LoRA in a safetensors `file`, checked against `params` ({'unet': ..., 'text_encoder': ...}).

    Only the params' structure and shapes are read (jax.eval_shape results do). Raises one
    LoRAError naming every key that does not fit.
    """
    source = os.fspath(file)
    storage.require_local(source, "LoRA file", LoRAError)
    if not Path(source).is_file():
        raise LoRAError(f"LoRA file {source!r} does not exist or is not a file")
    try:
        tensors = weights.read_safetensors(source)
    except (OSError, ValueError, KeyError, struct.error) as err:
        raise LoRAError(f"LoRA {source!r} is not a readable safetensors file: {err}") from None
    configs = _adapter_configs(source)
    sdxl = sorted(k for k in tensors if _SDXL.match(k))
    if sdxl or "text_encoder_2" in configs:
        found_in = (f"{len(sdxl)} keys for a second text encoder, such as {', '.join(sdxl[:3])}" if sdxl
                    else "adapter metadata for a text_encoder_2")
        raise LoRAError(f"LoRA {source!r} is an SDXL LoRA ({found_in}); only SD 1.x / 2.x LoRAs are supported")

    targets = _targets(params)
    foreign, unknown, absent = [], [], []
    layouts: set[str] = set()
    # (component, target name or the file's module name when it matches nothing) -> role -> (tensor, key)
    modules: dict[tuple[str, str], dict[str, tuple[np.ndarray, str]]] = {}
    found: dict[tuple[str, str], _Target | None] = {}
    ambiguous_names: set[tuple[str, str]] = set()
    duplicates = []
    for key, value in tensors.items():
        if _FOREIGN.search(key):
            foreign.append(key)
            continue
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        layout, component, module, role = split
        if role != "alpha" or layout == "kohya":
            layouts.add(layout)
        names = targets.get((component, "kohya" if layout == "kohya" else "dotted"))
        if names is None:
            absent.append(key)
            continue
        target = names.get(module)
        entry = (component, target.name if target else module)
        found[entry] = target
        if target is None and module in names:  # a name two modules share
            ambiguous_names.add(entry)
        if role in modules.setdefault(entry, {}):
            duplicates.append(key)
            continue
        modules[entry][role] = (value, key)

    if not modules and not foreign:
        sample = ", ".join(sorted(tensors)[:3])
        raise LoRAError(f"LoRA {source!r} is not a LoRA file: none of its {len(tensors)} tensors is named as a LoRA "
                        f"factor of a supported layout (peft lora_A/lora_B, diffusers lora.down/up, kohya "
                        f"lora_unet_/lora_te_); its keys begin {sample}")
    if "kohya" in layouts and len(layouts) > 1:
        raise LoRAError(f"LoRA {source!r} mixes kohya keys with diffusers/PEFT ones ({', '.join(sorted(layouts))}); "
                        "a file holds one layout")

    factors: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    unmatched, ambiguous, unpaired, misshaped, bad_alpha, bad_rank = [], [], [], [], [], []
    ranks = set()
    for (component, name), parts in sorted(modules.items()):
        keys = [key for _, key in parts.values()]
        target = found[(component, name)]
        if target is None:
            (ambiguous if (component, name) in ambiguous_names else unmatched).extend(keys)
            continue
        if "down" not in parts or "up" not in parts:
            unpaired.extend(keys)
            continue
        (down, down_key), (up, up_key) = parts["down"], parts["up"]
        fitted = _flax_factors(np.asarray(down), np.asarray(up), target.shape)
        if fitted is None:
            misshaped.append(f"{down_key} {tuple(down.shape)} / {up_key} {tuple(up.shape)} ({target.name} takes "
                             f"{_torch_shapes(target.shape)})")
            continue
        rank = int(down.shape[0])
        config = configs.get(component, configs.get("*", {}))
        spellings = (target.name, target.name.removeprefix(TEXT_PREFIX))
        if "r" in config or config.get("rank_pattern"):
            stated = int(_pattern_value(config.get("rank_pattern") or {}, spellings, config.get("r", rank)))
            if stated != rank:
                bad_rank.append(f"{down_key} (rank {rank}; the adapter metadata says {stated})")
                continue
        if config.get("use_dora"):
            foreign.append(down_key)
            continue
        alpha = None
        if "alpha" in parts:
            value, alpha_key = parts["alpha"]
            value = np.asarray(value, np.float64)
            if value.size != 1 or not np.isfinite(value).all():
                bad_alpha.append(f"{alpha_key} {tuple(value.shape)}")
                continue
            alpha = float(value.reshape(()))
            if alpha == 0 and "kohya" in layouts:  # sd-scripts reads alpha 0 (or none) as alpha = rank
                alpha = None
        if alpha is None and ("lora_alpha" in config or config.get("alpha_pattern")):
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, spellings,
                                         config.get("lora_alpha", rank)))
        alpha = float(rank) if alpha is None else alpha
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        ranks.add(rank)
        down_f, up_f = fitted
        factors.setdefault(component, {})[target.path] = (down_f, up_f * np.float32(scale))

    problems = []
    if absent:
        have = ", ".join(sorted({c for c, _ in targets})) or "neither unet nor text_encoder"
        problems.append(_listed(f"keys for a component the params lack (they have {have})", absent))
    ldm = any(_LDM_UNET.match(k.removeprefix("lora_unet_")) for k in unmatched)
    for label, keys in (
            ("keys of adapters that are not a plain LoRA (LoHa, LoKr, DoRA, LoCon lora_mid, bias)", foreign),
            ("keys of no LoRA layout", unknown),
            ("keys matching no dense or conv module of the model"
             + (" (input_blocks/middle_block/output_blocks are the original SD UNet's names, not diffusers')"
                if ldm else ""), unmatched),
            ("keys naming two modules at once", ambiguous), ("keys given twice", duplicates),
            ("factors without their pair", unpaired), ("mis-shaped factors", misshaped),
            ("alphas that are not one finite number", bad_alpha), ("ranks contradicting the metadata", bad_rank)):
        if keys:
            problems.append(_listed(label, keys))
    if problems:
        raise LoRAError(f"LoRA {source!r} does not fit the model: " + "; ".join(problems))
    return LoRA(source, "+".join(sorted(layouts)), tuple(sorted(ranks)), factors)


def load_loras(specs_or_files: Sequence[str | os.PathLike | tuple[str | os.PathLike, float]],
               params: Mapping[str, Any]) -> tuple[list[LoRA], list[float]]:
    """(LoRAs, scales) from 'FILE[:SCALE]' strings, paths (scale 1) or (file, scale) pairs.

    Every file is read before any error is raised: one LoRAError covers all that do not fit.
    """
    pairs = []
    for spec in specs_or_files:
        if isinstance(spec, str):
            pairs.append(parse_lora_spec(spec))
        elif isinstance(spec, os.PathLike):
            pairs.append((os.fspath(spec), 1.0))
        else:
            file, scale = spec
            pairs.append((os.fspath(file), float(scale)))
    loras, errors = [], []
    for file, _ in pairs:
        try:
            loras.append(read_lora(file, params))
        except LoRAError as err:
            errors.append(str(err))
    if errors:
        raise LoRAError("\n".join(errors))
    return loras, [scale for _, scale in pairs]


# ----------------------------------------------------------------------------- applying


def delta(down: jax.Array, up: jax.Array) -> jax.Array:
    """A kernel's low-rank update (its scale already in `up`), in float32."""
    return jnp.tensordot(jnp.asarray(down, jnp.float32), jnp.asarray(up, jnp.float32), axes=1)


def _scale_vector(scales: Any, count: int) -> Sequence[Any]:
    if scales is None:
        return [1.0] * count
    if isinstance(scales, (list, tuple)):
        if len(scales) != count:
            raise ValueError(f"{count} LoRAs but {len(scales)} scales")
        return [jnp.asarray(s, jnp.float32) for s in scales]
    vector = jnp.asarray(scales, jnp.float32)
    if vector.ndim == 0:
        vector = jnp.broadcast_to(vector, (count,))
    if vector.shape != (count,):
        raise ValueError(f"{count} LoRAs but scales of shape {vector.shape}")
    return vector


def merge(params: Mapping[str, Any], loras: Sequence[LoRA | Mapping[str, Any]],
          scales: Sequence[float] | jax.Array | float | None = None) -> dict[str, Any]:
    """`params` with W + sum_i scales[i] * delta_i on every kernel a LoRA targets; other leaves untouched.

    The updates are summed in float32 and added to W in float32, and the result is cast back to
    W's dtype. Pure and jittable: `loras` may be LoRA objects or their `factors` (pytrees, e.g.
    jit arguments) and `scales` Python floats, one number for all, or a (traced) array of
    len(loras) (default: all 1).
    """
    trees = [lora.factors if isinstance(lora, LoRA) else lora for lora in loras]
    scale_of = _scale_vector(scales, len(trees))
    merged = dict(params)
    for component in sorted({c for tree in trees for c, by_path in tree.items() if by_path}):
        if component not in params:
            raise LoRAError(f"a LoRA targets the {component}, which the params lack (they have "
                            f"{', '.join(sorted(params))})")
        flat = traverse_util.flatten_dict(params[component], sep="/")
        updates: dict[str, jax.Array] = {}
        for i, tree in enumerate(trees):
            for path, (down, up) in tree.get(component, {}).items():
                update = scale_of[i] * delta(down, up)
                updates[path] = updates[path] + update if path in updates else update
        bad = sorted(f"{path} {tuple(u.shape)}" + (f" (the param is {tuple(flat[path].shape)})" if path in flat else
                                                   " (no such param)")
                     for path, u in updates.items() if path not in flat or tuple(flat[path].shape) != u.shape)
        if bad:
            raise LoRAError(f"LoRA updates that do not fit the {component} params: {', '.join(bad)}")
        for path, update in updates.items():
            kernel = flat[path]
            flat[path] = (jnp.asarray(kernel, jnp.float32) + update).astype(kernel.dtype)
        merged[component] = traverse_util.unflatten_dict(flat, sep="/")
    return merged
