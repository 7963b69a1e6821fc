"""LoRA files (rectflow_jax/lora.py) against diffusers' load_lora_weights + fuse_lora / set_adapters.

On a random SD folder (random_folder.write_random_folder), random LoRAs with non-zero A and B:
  A: rank 4, alpha 8 on the UNet (attention q/k/v/out, ff.net.0.proj / ff.net.2, the 1x1-conv
     proj_in / proj_out, time_emb_proj and the resnets' 3x3 conv1, a LoCon-style conv LoRA) and
     alpha 2 on every text-encoder projection; written by diffusers' save_lora_weights (PEFT
     keys, alpha in the header metadata) and, from the same factors, as kohya keys with `.alpha`.
  B: rank 4 with a rank_pattern (conv1 at rank 2) and an alpha_pattern (proj_in at 3), its
     text-encoder keys with transformers 4's `text_model.` prefix; PEFT layout only.
"""

from __future__ import annotations

import gc
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from rectflow_jax import lora, random_folder, weights  # noqa: E402
from rectflow_jax.models.clip_text import CLIPTextModel  # noqa: E402
from rectflow_jax.models.sd_unet import UNet2DConditionModel  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                "time_emb_proj", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK, UNET_ALPHA, TEXT_ALPHA = 4, 8, 2
PATTERNS = {"rank_pattern": {"conv1": 2}, "alpha_pattern": {"proj_in": 3}}  # LoRA B only


def _pipe(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _write_loras(folder, out, seed, patterns):
    """A random LoRA saved by diffusers (PEFT layout, metadata alpha); and its kohya twin unless `patterns`."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = _pipe(folder)
    extra = PATTERNS if patterns else {}
    configs = {"unet": LoraConfig(r=RANK, lora_alpha=UNET_ALPHA, target_modules=UNET_TARGETS,
                                  init_lora_weights=False, **extra),
               "text_encoder": LoraConfig(r=RANK, lora_alpha=TEXT_ALPHA, target_modules=TEXT_TARGETS,
                                          init_lora_weights=False)}
    pipe.unet.add_adapter(configs["unet"])
    pipe.text_encoder.add_adapter(configs["text_encoder"])
    with torch.no_grad():  # every factor of a size that moves the outputs clearly
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.3)
    layers = {c: {k: v.detach().clone() for k, v in get_peft_model_state_dict(getattr(pipe, c)).items()}
              for c in configs}
    if patterns:  # released files name the text encoder's modules as transformers 4 did
        layers["text_encoder"] = {"text_model." + k.removeprefix("text_model."): v
                                  for k, v in layers["text_encoder"].items()}
    peft_dir = out / f"peft_{seed}"
    diffusers.StableDiffusionPipeline.save_lora_weights(
        peft_dir, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict())
    files = {"peft": peft_dir / "pytorch_lora_weights.safetensors"}
    if not patterns:
        kohya = {}
        for component, prefix, alpha in (("unet", "lora_unet_", UNET_ALPHA), ("text_encoder", "lora_te_", TEXT_ALPHA)):
            for key, value in layers[component].items():
                module, role = key.rsplit(".lora_", 1)
                if component == "text_encoder":
                    module = "text_model." + module.removeprefix("text_model.")
                name = prefix + module.replace(".", "_")
                kohya[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = value.numpy()
                kohya[f"{name}.alpha"] = np.asarray(alpha, np.float32)
        files["kohya"] = out / f"kohya_{seed}.safetensors"
        weights.write_safetensors(files["kohya"], kohya)
    del pipe
    gc.collect()
    return files


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 8, 8, 4), dtype=np.float32), np.asarray([999.0, 420.0], np.float32),
            rng.integers(0, 50, (2, 77)).astype(np.int32))


def _torch_outputs(pipe, x, t, ids):
    with torch.no_grad():
        text = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64))).last_hidden_state
        out = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                        encoder_hidden_states=text).sample
    return text.numpy(), out.numpy().transpose(0, 2, 3, 1)


def _forward_eager(models, params, x, t, ids):
    unet, clip = models
    text = clip.apply({"params": params["text_encoder"]}, ids)
    return text, unet.apply({"params": params["unet"]}, x, t, text)


_forward = jax.jit(_forward_eager)


TRACES = []


@jax.jit
def _forward_unmerged(models, params, factors, scales, x, t, ids):
    """The LoRAs merged inside the compiled call: base params, factors and scales are runtime inputs."""
    TRACES.append(1)
    return _forward_eager(models, lora.merge(params, factors, scales), x, t, ids)


def _ours(setup, params, x, t, ids):
    return tuple(np.asarray(a) for a in _forward(setup["models"], params, x, t, ids))


@pytest.fixture(scope="module", autouse=True)
def _transformers_peft_gate():
    """transformers >= 5.24 refuses peft < 0.22 (its MIN_PEFT_VERSION) for every adapter call on the
    text encoder, and 0.21 is the newest peft released as of writing. The adapter API used here
    (add_adapter / load_adapter of LoRA layers) works with 0.21, so the gate alone is lifted."""
    from importlib.metadata import version

    from packaging.version import Version
    from transformers.integrations import peft as transformers_peft

    minimum = getattr(transformers_peft, "MIN_PEFT_VERSION", "0")
    with pytest.MonkeyPatch.context() as patch:
        if Version(version("peft")) < Version(minimum):
            patch.setattr(transformers_peft, "check_peft_version", lambda min_version: None)
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, _transformers_peft_gate):
    root = tmp_path_factory.mktemp("lora")
    folder = random_folder.write_random_folder(root / "sd")
    unet, unet_params = UNet2DConditionModel.from_pretrained(folder, "unet")
    clip, clip_params = CLIPTextModel.from_pretrained(folder, "text_encoder")
    return {"folder": folder, "a": _write_loras(folder, root, 0, patterns=False),
            "b": _write_loras(folder, root, 1, patterns=True), "models": _Models(unet, clip),
            "params": {"unet": unet_params, "text_encoder": clip_params}}


class _Models(tuple):
    """(unet, clip) as one static jit argument: a pytree with no leaves."""

    def __new__(cls, unet, clip):
        return super().__new__(cls, (unet, clip))


jax.tree_util.register_pytree_node(_Models, lambda m: ((), tuple(m)), lambda aux, _: _Models(*aux))


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_one_lora_matches_fused_diffusers(setup, layout):
    folder, params, x, t, ids = setup["folder"], setup["params"], *_inputs()
    file = setup["a"][layout]
    pipe = _pipe(folder)
    base_text, base_unet = _torch_outputs(pipe, x, t, ids)
    pipe.load_lora_weights(str(file), adapter_name="a")
    pipe.fuse_lora(lora_scale=0.8)
    ref_text, ref_unet = _torch_outputs(pipe, x, t, ids)
    del pipe

    loaded = lora.read_lora(file, params)
    assert loaded.layout == layout and loaded.ranks == (RANK,)
    assert {c: len(f) for c, f in loaded.factors.items()} == {"unet": 64, "text_encoder": 12}
    text, out = _ours(setup, lora.merge(params, [loaded], [0.8]), x, t, ids)
    traces = len(TRACES)
    unmerged = [np.asarray(a) for a in _forward_unmerged(setup["models"], params, [loaded.factors],
                                                         jnp.asarray([0.8]), x, t, ids)]
    _forward_unmerged(setup["models"], params, [loaded.factors], jnp.asarray([0.3]), x, t, ids)
    retraced = len(TRACES) - traces
    rel = {"text encoder": _rel(text, ref_text), "UNet": _rel(out, ref_unet),
           "text encoder unmerged": _rel(unmerged[0], ref_text), "UNet unmerged": _rel(unmerged[1], ref_unet)}
    moved = (_rel(ref_text, base_text), _rel(ref_unet, base_unet))
    print(f"\n[lora] {layout}: {loaded.num_targets} targets; max|diff|/max|ref| vs diffusers fuse_lora(0.8): "
          + ", ".join(f"{k} {v:.1e}" for k, v in rel.items())
          + f"; the LoRA moves diffusers' text by {moved[0]:.2f}, UNet by {moved[1]:.2f} (relative); "
          f"traces for two scales: {retraced} (this layout), {len(TRACES)} (all)")
    assert max(rel.values()) <= 1e-4
    assert min(moved) > 0.05  # the LoRA changes both outputs: the comparison can fail
    assert retraced <= 1 and len(TRACES) == 1  # a new scale (or another file of the same targets) reuses the trace


def test_two_loras_at_their_scales_match_diffusers(setup):
    """LoRA A (kohya) at 0.7 and B (PEFT, rank / alpha patterns, text_model. keys) at 0.3, unfused."""
    folder, params, x, t, ids = setup["folder"], setup["params"], *_inputs(1)
    pipe = _pipe(folder)
    pipe.load_lora_weights(str(setup["a"]["kohya"]), adapter_name="a")
    pipe.load_lora_weights(str(setup["b"]["peft"]), adapter_name="b")
    conv1 = pipe.unet.down_blocks[0].resnets[0].conv1
    proj_in = pipe.unet.down_blocks[0].attentions[0].proj_in
    reference_scalings = (conv1.scaling["b"], proj_in.scaling["b"], conv1.r["b"])  # set_adapters scales them
    pipe.set_adapters(["a", "b"], [0.7, 0.3])
    ref_text, ref_unet = _torch_outputs(pipe, x, t, ids)
    del pipe

    loras, scales = lora.load_loras([f"{setup['a']['kohya']}:0.7", (setup["b"]["peft"], 0.3)], params)
    assert scales == [0.7, 0.3] and loras[1].ranks == (2, 4)
    # B's own scalings: alpha 8 / rank 2 on conv1 (rank_pattern), 3 / 4 on proj_in (alpha_pattern), as PEFT's.
    assert reference_scalings == (4.0, 0.75, 2)
    text, out = _ours(setup, lora.merge(params, loras, scales), x, t, ids)
    traced = _forward_unmerged(setup["models"], params, [l.factors for l in loras], jnp.asarray(scales), x, t, ids)
    rel = (_rel(text, ref_text), _rel(out, ref_unet), _rel(traced[1], ref_unet))
    print(f"\n[lora] two LoRAs (kohya 0.7 + PEFT with patterns 0.3) vs diffusers set_adapters: "
          f"text encoder {rel[0]:.1e}, UNet merged {rel[1]:.1e}, UNet unmerged {rel[2]:.1e}")
    assert max(rel) <= 1e-4


def test_no_alpha_means_scale_one_as_in_diffusers(setup, tmp_path):
    """A PEFT file without metadata or alphas: alpha = rank (scale 1) here and in diffusers."""
    tensors = {k: v for k, v in weights.read_safetensors(setup["a"]["peft"]).items() if k.startswith("unet.")}
    weights.write_safetensors(tmp_path / "bare.safetensors", tensors)  # writes no __metadata__
    pipe = _pipe(setup["folder"])
    pipe.load_lora_weights(str(tmp_path / "bare.safetensors"), adapter_name="bare")
    scalings = {m.scaling["bare"] for m in pipe.unet.modules() if hasattr(m, "scaling") and "bare" in m.scaling}
    del pipe
    loaded = lora.read_lora(tmp_path / "bare.safetensors", setup["params"])
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
    up = loaded.factors["unet"]["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel"][1]
    print(f"\n[lora] no alpha: diffusers' scalings {sorted(scalings)}")
    assert scalings == {1.0} and set(loaded.factors) == {"unet"}
    np.testing.assert_array_equal(up, tensors[key].T)
    # With the metadata the same tensors carry alpha / rank = 8 / 4.
    with_metadata = lora.read_lora(setup["a"]["peft"], setup["params"])
    up_scaled = with_metadata.factors["unet"]["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel"][1]
    np.testing.assert_allclose(up_scaled, up * UNET_ALPHA / RANK, rtol=1e-6)


def test_older_diffusers_names_read_as_the_same_factors(setup, tmp_path):
    """`.lora.down/up`, `lora_linear_layer` and attention processors' `to_q_lora` name the PEFT factors."""
    peft_tensors = weights.read_safetensors(setup["b"]["peft"])

    def old_name(key):
        key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        key = re.sub(r"\.(attn[12])\.(to_q|to_k|to_v)\.lora\.", r".\1.processor.\2_lora.", key)
        key = re.sub(r"\.(attn[12])\.to_out\.0\.lora\.", r".\1.processor.to_out_lora.", key)
        key = re.sub(r"\.self_attn\.(q|k|v|out)_proj\.lora\.",
                     lambda m: f".self_attn.to_{'out' if m[1] == 'out' else m[1]}_lora.", key)
        return key.replace(".mlp.fc1.lora.", ".mlp.fc1.lora_linear_layer.")

    old = {old_name(k): v for k, v in peft_tensors.items()}
    assert any(".processor.to_out_lora.down.weight" in k for k in old) and any("self_attn.to_v_lora" in k for k in old)
    weights.write_safetensors(tmp_path / "peft.safetensors", peft_tensors)  # both without the metadata
    weights.write_safetensors(tmp_path / "old.safetensors", old)
    new, older = (lora.read_lora(tmp_path / f, setup["params"]) for f in ("peft.safetensors", "old.safetensors"))
    assert (new.layout, older.layout) == ("peft", "diffusers") and new.num_targets == older.num_targets == 76
    for component, by_path in new.factors.items():
        for path, (down, up) in by_path.items():
            np.testing.assert_array_equal(older.factors[component][path][0], down)
            np.testing.assert_array_equal(older.factors[component][path][1], up)


def test_bad_files_are_refused_naming_every_key(setup, tmp_path):
    params = setup["params"]
    tensors = weights.read_safetensors(setup["a"]["kohya"])
    to_q = next(k for k in sorted(tensors) if k.endswith("attn1_to_q.lora_down.weight"))
    bad = dict(tensors)
    bad["lora_unet_down_blocks_0_attentions_0_nonexistent.lora_down.weight"] = np.zeros((4, 8), np.float32)
    bad["lora_unet_down_blocks_0_attentions_0_nonexistent.lora_up.weight"] = np.zeros((8, 4), np.float32)
    bad[to_q] = np.zeros((4, tensors[to_q].shape[1] + 1), np.float32)
    bad["lora_unet_conv_in.lora_up.weight"] = np.zeros((32, 4), np.float32)  # no down
    weights.write_safetensors(tmp_path / "bad.safetensors", bad)
    with pytest.raises(lora.LoRAError) as err:
        lora.read_lora(tmp_path / "bad.safetensors", params)
    message = str(err.value)
    print(f"\n[lora] error: {message[:400]}")
    for expected in ("bad.safetensors", "nonexistent.lora_down.weight", "nonexistent.lora_up.weight", to_q,
                     "lora_unet_conv_in.lora_up.weight", "matching no", "mis-shaped", "without their pair"):
        assert expected in message

    # Only one component in the params: the text encoder's keys are named.
    with pytest.raises(lora.LoRAError, match="lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        lora.read_lora(setup["a"]["kohya"], {"unet": params["unet"]})
    cases = {
        "loha": ({"lora_unet_conv_in.hada_w1_a": np.zeros((2, 2), np.float32)}, "not a plain LoRA"),
        "sdxl": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((2, 2), np.float32)},
                 "SDXL"),
        "unet": ({"conv_in.weight": np.zeros((32, 4, 3, 3), np.float32)}, "not a LoRA file"),
        "alpha": ({"lora_unet_conv_in.lora_down.weight": np.zeros((2, 4, 3, 3), np.float32),
                   "lora_unet_conv_in.lora_up.weight": np.zeros((32, 2, 1, 1), np.float32),
                   "lora_unet_conv_in.alpha": np.zeros((2,), np.float32)}, r"lora_unet_conv_in\.alpha"),
    }
    for name, (content, pattern) in cases.items():
        weights.write_safetensors(tmp_path / f"{name}.safetensors", content)
        with pytest.raises(lora.LoRAError, match=pattern):
            lora.read_lora(tmp_path / f"{name}.safetensors", params)
    # load_loras reads every file before raising, and names each that does not fit.
    with pytest.raises(lora.LoRAError) as err:
        lora.load_loras([str(tmp_path / "loha.safetensors"), f"{tmp_path / 'unet.safetensors'}:0.5"], params)
    assert "loha.safetensors" in str(err.value) and "unet.safetensors" in str(err.value)
    with pytest.raises(lora.LoRAError, match="does not exist"):
        lora.read_lora(tmp_path / "missing.safetensors", params)


def test_conv_factor_layouts_give_one_kernel_update():
    """A 1x1 conv kernel takes (r, in) or (r, in, 1, 1) downs; a 3x3 one (r, in, 3, 3); all as torch's W + B @ A."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float32)
    torch_delta = b @ a  # (out, in)
    for down in (a, a[:, :, None, None]):
        flax_down, flax_up = lora._flax_factors(down, b[:, :, None, None], (1, 1, 5, 3))
        np.testing.assert_allclose(np.asarray(lora.delta(flax_down, flax_up))[0, 0], torch_delta.T, rtol=1e-6)
        flax_down, flax_up = lora._flax_factors(down, b, (5, 3))  # a Dense kernel (in, out)
        np.testing.assert_allclose(np.asarray(lora.delta(flax_down, flax_up)), torch_delta.T, rtol=1e-6)
    a3 = rng.standard_normal((2, 5, 3, 3)).astype(np.float32)
    flax_down, flax_up = lora._flax_factors(a3, b[:, :, None, None], (3, 3, 5, 3))
    expected = np.einsum("or,rihw->hwio", b, a3)  # torch OIHW delta in HWIO
    np.testing.assert_allclose(np.asarray(lora.delta(flax_down, flax_up)), expected, rtol=1e-5)
    assert lora._flax_factors(a3, b, (1, 1, 5, 3)) is None and lora._flax_factors(a, b, (3, 3, 5, 3)) is None


def test_merge_keeps_dtype_and_untargeted_leaves():
    params = {"unet": {"a": {"kernel": jnp.ones((3, 2), jnp.bfloat16), "bias": jnp.zeros(2)},
                       "b": {"kernel": jnp.ones((3, 2))}}}
    factors = {"unet": {"a/kernel": (np.ones((3, 1), np.float32), np.full((1, 2), 0.5, np.float32))}}
    merged = lora.merge(params, [factors, factors], [1.0, 2.0])
    assert merged["unet"]["a"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(merged["unet"]["a"]["kernel"], np.float32), 2.5)
    assert merged["unet"]["b"]["kernel"] is params["unet"]["b"]["kernel"]
    assert merged["unet"]["a"]["bias"] is params["unet"]["a"]["bias"]
    np.testing.assert_array_equal(np.asarray(lora.merge(params, [factors], 2.0)["unet"]["a"]["kernel"],
                                             np.float32), 2.0)
    assert lora.merge(params, [], None) == params
    with pytest.raises(ValueError, match="2 LoRAs but 1 scales"):
        lora.merge(params, [factors, factors], [1.0])
    with pytest.raises(lora.LoRAError, match="text_encoder"):
        lora.merge(params, [{"text_encoder": factors["unet"]}], [1.0])


@pytest.mark.parametrize("text, expected", [
    ("a.safetensors", ("a.safetensors", 1.0)), ("a.safetensors:0.7", ("a.safetensors", 0.7)),
    ("dir/a.safetensors:-0.5", ("dir/a.safetensors", -0.5)), ("a.safetensors:1e-1", ("a.safetensors", 0.1)),
    ("gs://bucket/a.safetensors", ("gs://bucket/a.safetensors", 1.0)),
    ("gs://bucket/a.safetensors:0.25", ("gs://bucket/a.safetensors", 0.25)),
    ("/tmp/odd:name.safetensors", ("/tmp/odd:name.safetensors", 1.0))])
def test_parse_lora_spec(text, expected):
    assert lora.parse_lora_spec(text) == expected


@pytest.mark.parametrize("text", ["", "a.safetensors:nan", "a.safetensors:inf"])
def test_parse_lora_spec_refuses(text):
    with pytest.raises(ValueError):
        lora.parse_lora_spec(text)
