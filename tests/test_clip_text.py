"""Parity of the Flax CLIPTextModel with transformers' PyTorch one, and its weight I/O."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rectflow_jax import weights
from rectflow_jax.models.clip_text import CLIPTextModel

from storage_dtype import assert_storage_follows_param_dtype

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=1000,
            max_position_embeddings=77, bos_token_id=998, eos_token_id=999, pad_token_id=1)
SD15 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=49408,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
            projection_dim=768)


def torch_clip(cfg, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    with torch.no_grad():  # so that zero-initialised tensors cannot hide a wrong mapping
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def prompt_ids(cfg, lengths=(5, 12, 75), seed=0):
    """Tokenised-prompt pattern: BOS, words, EOS, then padding (EOS as in SD 1.x, or 0 as in SD 2.x)."""
    rng = np.random.default_rng(seed)
    bos, eos = cfg["bos_token_id"], cfg["eos_token_id"]
    ids = np.full((len(lengths), 77), eos, np.int64)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, 1:n + 1], ids[row, n + 1] = bos, rng.integers(2, bos, n), eos
    ids[1, 14:] = 0
    return ids


def rel_err(ours, ref):
    err = float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
    print(f"\n[clip_text] {test}: max rel |diff| {err:.2e}")  # the parity figures, with pytest -s
    return err


@functools.cache  # equal modules share one compilation across tests
def jitted(clip, clip_skip=0):
    return jax.jit(lambda p, ids: clip.apply({"params": p}, ids, clip_skip=clip_skip))


def torch_hidden(model, ids, clip_skip=0):
    """last_hidden_state, or final_layer_norm of an earlier layer like diffusers' clip_skip."""
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
        if clip_skip:
            return model.final_layer_norm(out.hidden_states[-1 - clip_skip]).numpy()
        return out.last_hidden_state.numpy()


def saved(cfg, folder):
    model = torch_clip(cfg)
    model.save_pretrained(folder / "text_encoder", safe_serialization=True)
    return model, folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, folder holding its `text_encoder` subfolder)."""
    return saved(TINY, tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_matches_transformers(act, tmp_path):
    cfg = {**TINY, "hidden_act": act}
    model, folder = saved(cfg, tmp_path)
    clip, params = CLIPTextModel.from_pretrained(folder)
    assert clip.hidden_act == act
    ids = prompt_ids(cfg)
    ours = jitted(clip)(params, ids)
    assert ours.shape == (3, 77, 32) and ours.dtype == jnp.float32
    assert rel_err(ours, torch_hidden(model, ids)) <= 1e-4


def test_clip_skip_matches_penultimate_layer(tiny):
    model, folder = tiny
    clip, params = CLIPTextModel.from_pretrained(folder)
    ids = prompt_ids(TINY)
    assert rel_err(jitted(clip, 1)(params, ids), torch_hidden(model, ids, clip_skip=1)) <= 1e-4


def test_sd15_size_matches_transformers(tmp_path):
    model, folder = saved(SD15, tmp_path)
    clip, params = CLIPTextModel.from_pretrained(folder)
    ids = prompt_ids(SD15)
    assert rel_err(jitted(clip)(params, ids), torch_hidden(model, ids)) <= 1e-4


def test_export_loads_in_transformers(tiny, tmp_path):
    _, folder = tiny
    clip, params = CLIPTextModel.from_pretrained(folder)
    rng = np.random.default_rng(1)  # new values, so transformers can only match through our export
    params = jax.tree.map(lambda p: p + 0.02 * rng.standard_normal(p.shape, np.float32), params)
    clip.save_pretrained(params, tmp_path / "text_encoder")

    exported = tmp_path / "text_encoder"
    assert json.loads((exported / "config.json").read_text()) == json.loads(
        (folder / "text_encoder" / "config.json").read_text())
    # Released checkpoints (and transformers 4) name tensors text_model.*; so do we.
    assert all(k.startswith("text_model.") for k in weights.read_safetensors(exported / "model.safetensors"))
    model = transformers.CLIPTextModel.from_pretrained(exported).eval()
    ids = prompt_ids(TINY)
    assert rel_err(jitted(clip)(params, ids), torch_hidden(model, ids)) <= 1e-4
    _, reloaded = CLIPTextModel.from_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)


def test_legacy_position_ids_buffer_ignored(tiny, tmp_path):
    model, folder = tiny
    state = {f"text_model.{k}": v.numpy() for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    (tmp_path / "text_encoder").mkdir()
    shutil.copy(folder / "text_encoder" / "config.json", tmp_path / "text_encoder")
    weights.write_safetensors(tmp_path / "text_encoder" / "model.safetensors", state)
    _, params = CLIPTextModel.from_pretrained(tmp_path)
    _, expected = CLIPTextModel.from_pretrained(folder)
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_bf16_compute_close(tiny):
    model, folder = tiny
    clip, params = CLIPTextModel.from_pretrained(folder, dtype=jnp.bfloat16)
    ids = prompt_ids(TINY)
    assert rel_err(jitted(clip)(params, ids), torch_hidden(model, ids)) <= 5e-2


def test_storage_dtype_is_param_dtype(tiny):
    _, folder = tiny
    assert_storage_follows_param_dtype(CLIPTextModel, folder, TINY)


def test_misshaped_tensor_names_it(tiny, tmp_path):
    model, folder = tiny
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["encoder.layers.1.mlp.fc1.weight"] = state["encoder.layers.1.mlp.fc1.weight"][:, :-1]
    (tmp_path / "text_encoder").mkdir()
    shutil.copy(folder / "text_encoder" / "config.json", tmp_path / "text_encoder")
    weights.write_safetensors(tmp_path / "text_encoder" / "model.safetensors", state)
    with pytest.raises(weights.WeightLoadError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight"):
        CLIPTextModel.from_pretrained(tmp_path)


def test_unsupported_config_raises():
    with pytest.raises(NotImplementedError, match="hidden_act"):
        CLIPTextModel.from_config({**TINY, "hidden_act": "relu"})
