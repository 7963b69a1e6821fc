"""CLIP score: the Flax CLIPModel, preprocessing and scorer against transformers, on random weights.

Two tiny layouts with the structural choices of the CLIPs used for CLIP score: OpenAI's
ViT-L/14 (quick_gelu, the legacy eos_token_id 2, a legacy preprocessor_config.json) and
LAION's ViT-g/14 in transformers format (gelu, the tokenizer's EOS id, intermediate sizes
that are no multiple of the width). Both have patch 14 and a projection_dim unlike either
width. Parity figures (max |ours - transformers| / max |transformers|) print with pytest -s.
"""

import functools
import json
import shutil

import jax
import numpy as np
import pytest

from rectflow_jax import random_folder, tokenizer, weights
from rectflow_jax.models import clip as clip_lib
from rectflow_jax.models.clip import CLIPModel, CLIPPreprocessor, CLIPScorer, cosine_similarity
from rectflow_jax.models.clip_text import CLIPTextModel, eos_positions
from rectflow_jax.models.clip_vision import CLIPVisionModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

TINY_TOWERS = dict(num_hidden_layers=2, num_attention_heads=4)
LAYOUTS = {
    # openai/clip-vit-large-patch14: quick_gelu, config eos_token_id 2 (bos 0, pad 1) from before PR #24773.
    "vit_l14": dict(
        text=dict(hidden_size=32, intermediate_size=128, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0,
                  pad_token_id=1, projection_dim=24),
        vision=dict(hidden_size=48, intermediate_size=192, hidden_act="quick_gelu", image_size=28, patch_size=14,
                    projection_dim=24),
        projection_dim=24,
        preprocessor={"crop_size": 28, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                      "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(clip_lib.OPENAI_CLIP_MEAN),
                      "image_std": list(clip_lib.OPENAI_CLIP_STD), "resample": 3, "size": 32}),
    # laion/CLIP-ViT-g-14-laion2B-s12B-b42K: gelu, vision 1408 / 6144 (ratio 4.36), text 1024, projection 1024.
    "vit_g14": dict(
        text=dict(hidden_size=40, intermediate_size=160, hidden_act="gelu", projection_dim=36),
        vision=dict(hidden_size=44, intermediate_size=192, hidden_act="gelu", image_size=42, patch_size=14,
                    projection_dim=36),
        projection_dim=36,
        preprocessor={"crop_size": {"height": 42, "width": 42}, "do_center_crop": True, "do_convert_rgb": True,
                      "do_normalize": True, "do_rescale": True, "do_resize": True,
                      "image_mean": list(clip_lib.OPENAI_CLIP_MEAN), "image_processor_type": "CLIPImageProcessor",
                      "image_std": list(clip_lib.OPENAI_CLIP_STD), "resample": 3, "rescale_factor": 1 / 255,
                      "size": {"shortest_edge": 42}}),
}
PROMPTS = ["a photo of a cat sitting on a wooden table", "two dogs running on the beach at sunset",
           "Zebra? 42 ünïcode words here!", " ".join(["a red car on the road"] * 20)]  # the last > 77 tokens


def perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # so that zero-initialised tensors cannot hide a wrong mapping
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def rel_err(name, ours, ref):
    err = float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())
    print(f"\n[clip_score] {name}: max rel |diff| {err:.2e}")  # the parity figures, with pytest -s
    return err


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """layout -> (transformers CLIPModel, folder written by save_pretrained with tokenizer and preprocessor)."""
    out = {}
    for seed, (name, spec) in enumerate(LAYOUTS.items()):
        folder = tmp_path_factory.mktemp(name)
        vocab = tokenizer.write_tokenizer(folder, *tokenizer.build_bpe(random_folder.CAPTION_WORDS))
        text = {**TINY_TOWERS, "vocab_size": len(vocab), "bos_token_id": vocab[tokenizer.BOS],
                "eos_token_id": vocab[tokenizer.EOS], "pad_token_id": vocab[tokenizer.EOS], **spec["text"]}
        config = transformers.CLIPConfig(text_config=text, vision_config={**TINY_TOWERS, **spec["vision"]},
                                         projection_dim=spec["projection_dim"])
        torch.manual_seed(seed)
        model = perturb(transformers.CLIPModel(config), seed)
        model.save_pretrained(folder)
        (folder / clip_lib.PREPROCESSOR_NAME).write_text(json.dumps(spec["preprocessor"]))
        out[name] = model, folder
    return out


@functools.cache
def scorer(folder):
    return CLIPScorer.from_pretrained(folder)


@functools.cache  # equal modules share one compilation across tests
def jitted(module, method):
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method=method))


IMAGE_HW = {"vit_l14": (50, 70), "vit_g14": (64, 64)}  # any image size


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_transformers(layouts, layout):
    """Embeddings and scores through our whole path (preprocess, tokenise, embed, cosine) against
    transformers' CLIPImageProcessor (PIL), CLIPTokenizer and CLIPModel."""
    model, folder = layouts[layout]
    ours = scorer(folder)
    spec, clip = LAYOUTS[layout], ours.model
    assert clip.vision_model.hidden_act == clip.text_model.hidden_act == spec["vision"]["hidden_act"]
    assert clip.text_model.eos_token_id == model.config.text_config.eos_token_id
    np.testing.assert_array_equal(ours.params["logit_scale"], model.logit_scale.detach().numpy())  # a bare leaf
    images = np.random.default_rng(1).integers(0, 256, (len(PROMPTS),) + IMAGE_HW[layout] + (3,), dtype=np.uint8)
    ids = transformers.CLIPTokenizer.from_pretrained(folder)(PROMPTS, padding="max_length", truncation=True,
                                                             max_length=77, return_tensors="pt").input_ids
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image_ref = model.get_image_features(pixel_values=pixels)["pooler_output"].numpy()
        text_ref = model.get_text_features(input_ids=ids)["pooler_output"].numpy()
        out = model(input_ids=ids, pixel_values=pixels)

    assert ours.tokenize(PROMPTS).shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ours.tokenize(PROMPTS), ids.numpy())
    image = ours.image_embeds(images)
    assert image.shape == (len(PROMPTS), spec["projection_dim"]) and image.dtype == np.float32
    assert rel_err(f"{layout} image_embeds", image, image_ref) <= 1e-4
    assert rel_err(f"{layout} text_embeds", ours.text_embeds(PROMPTS), text_ref) <= 1e-4

    scores = ours.scores(images, PROMPTS)
    ref = (out.image_embeds * out.text_embeds).sum(-1).numpy()  # transformers' normalised embeds
    assert scores.shape == (len(PROMPTS),) and scores.dtype == np.float32
    print(f"\n[clip_score] {layout} scores: max |diff| {np.abs(scores - ref).max():.2e}")
    np.testing.assert_allclose(scores, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="prompts"):
        ours.scores(images, PROMPTS[:2])


def test_cosine_similarity_pairs_rows():
    a = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]], np.float32)
    b = np.array([[2.0, 0.0], [-3.0, -4.0], [0.0, 5.0]], np.float32)
    np.testing.assert_allclose(cosine_similarity(a, b), [1.0, -1.0, 2 ** -0.5], rtol=1e-6)


PREPROCESSOR_CONFIGS = [
    {},  # CLIPImageProcessor's defaults: shortest edge 224, crop 224
    {"size": 30, "crop_size": 28},  # legacy ints
    {"size": {"shortest_edge": 30}, "crop_size": {"height": 28, "width": 26}},
    {"size": {"height": 21, "width": 33}, "crop_size": {"height": 28, "width": 28}, "resample": 2},
    {"do_resize": False, "crop_size": {"height": 28, "width": 27}},  # odd zero padding of small images
    {"size": 28, "crop_size": 28, "do_normalize": False, "rescale_factor": 0.5},
]


@pytest.mark.parametrize("config", PREPROCESSOR_CONFIGS)
def test_preprocessing_matches_clip_image_processor(config):
    ours, ref = CLIPPreprocessor.from_config(config), CLIPImageProcessorPil(**config)
    rng = np.random.default_rng(0)
    # Landscape and portrait with odd edges, one smaller than the crop (zero padding), extreme ratios.
    for hw in ((37, 53), (61, 40), (21, 19), (7, 90), (300, 200)):
        images = rng.integers(0, 256, (2,) + hw + (3,), dtype=np.uint8)
        expected = ref(list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        got = ours.pixel_values(images)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, expected, err_msg=str(hw))  # bit for bit: same ops, same order


def test_preprocessor_from_folder(tmp_path):
    assert clip_lib.preprocessor_from_folder(tmp_path) == CLIPPreprocessor()  # no file: the defaults
    (tmp_path / clip_lib.PREPROCESSOR_NAME).write_text(json.dumps(LAYOUTS["vit_l14"]["preprocessor"]))
    loaded_ = clip_lib.preprocessor_from_folder(tmp_path)
    assert (loaded_.shortest_edge, loaded_.crop_hw) == (32, (28, 28))


@pytest.mark.parametrize("eos", [2, 7])
def test_pooled_output_picks_transformers_eos_position(eos, tmp_path):
    """eos_token_id 2: argmax of the ids; otherwise the first eos_token_id. Rows where the two disagree."""
    cfg = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
               bos_token_id=0, eos_token_id=eos, pad_token_id=1)
    model = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)), 0)
    ids = np.ones((3, 77), np.int64)
    ids[:, 0] = 0
    ids[0, [3, 9]], ids[0, 5] = eos, 40      # first EOS at 3, largest id at 5
    ids[1, [12, 30]], ids[1, 2] = eos, 49    # first EOS at 12, largest id at 2
    ids[2, 20], ids[2, 60] = eos, 45         # first EOS at 20, largest id at 60
    first_eos, largest = np.array([3, 12, 20]), np.array([5, 2, 60])
    expected = largest if eos == 2 else first_eos
    np.testing.assert_array_equal(eos_positions(ids, eos), expected)
    model.save_pretrained(tmp_path)
    clip, params = CLIPTextModel.from_pretrained(tmp_path, None)
    assert clip.eos_token_id == eos
    ours = jitted(clip, CLIPTextModel.pooled_output)(params, ids)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).pooler_output.numpy()
    assert rel_err(f"pooled eos_token_id={eos}", ours, ref) <= 1e-4


def test_legacy_config_dicts_read_as_transformers():
    """LAION's conversions carry text_config_dict / vision_config_dict beside stale tower configs."""
    config = transformers.CLIPConfig(text_config=dict(hidden_size=32, num_attention_heads=4, eos_token_id=2),
                                     vision_config=dict(hidden_size=48, num_attention_heads=4, patch_size=16)
                                     ).to_dict()
    config["text_config_dict"] = dict(hidden_act="gelu", hidden_size=40, num_attention_heads=4, num_hidden_layers=3)
    config["vision_config_dict"] = dict(hidden_act="gelu", hidden_size=44, num_attention_heads=4, patch_size=14)
    ref = transformers.CLIPConfig.from_dict(json.loads(json.dumps(config)))  # it updates nested dicts in place
    clip = CLIPModel.from_config(config)
    for ours, theirs in ((clip.text_model, ref.text_config), (clip.vision_model, ref.vision_config)):
        fields = [f for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "hidden_act", "layer_norm_eps", "eos_token_id", "patch_size", "image_size")
                  if hasattr(ours, f)]
        assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    assert clip.text_model.eos_token_id == 49407 and clip.vision_model.patch_size == 14


TEXT = dict(hidden_size=32, num_attention_heads=4)


@pytest.mark.parametrize("config, key", [
    ({"vision_config": {"hidden_act": "relu"}}, "hidden_act"),
    ({"text_config": {**TEXT, "hidden_act": "silu"}}, "hidden_act"),
    ({"vision_config": {"attention_dropout": 0.1}}, "attention_dropout"),
    ({"vision_config": {"image_size": [224, 196]}}, "image_size"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, "model_type"),
    ({"model_type": "siglip"}, "model_type"),
    ({"logit_bias_init_value": -10.0}, "logit_bias_init_value"),
    ({"vision_config": {"use_head": True}}, "use_head"),
])
def test_unsupported_config_refused_by_name(config, key):
    with pytest.raises(weights.UnsupportedConfigError, match=key):
        CLIPModel.from_config({"model_type": "clip", "projection_dim": 24, **config})


@pytest.mark.parametrize("config, key", [
    ({"do_pad": True}, "do_pad"),
    ({"size": {"shortest_edge": 224, "longest_edge": 300}}, "size"),
    ({"default_to_square": True}, "default_to_square"),
    ({"crop_pct": 0.9}, "crop_pct"),
])
def test_unsupported_preprocessor_refused_by_name(config, key):
    with pytest.raises(weights.UnsupportedConfigError, match=key):
        CLIPPreprocessor.from_config(config)


def test_missing_and_misshaped_tensors_named(layouts, tmp_path):
    model, folder = layouts["vit_l14"]
    shutil.copy(folder / "config.json", tmp_path)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    del state["logit_scale"], state["text_projection.weight"]
    state["vision_model.embeddings.class_embedding"] = state["vision_model.embeddings.class_embedding"][:-1]
    weights.write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.raises(weights.WeightLoadError, match=r"missing 2: logit_scale, text_projection\.weight") as err:
        CLIPModel.from_pretrained(tmp_path)
    assert "vision_model.embeddings.class_embedding" in str(err.value)
    state["text_projection.weight"] = model.text_projection.weight.detach().numpy()
    weights.write_safetensors(tmp_path / "model.safetensors", state)  # now only the bare tensors are wrong
    with pytest.raises(weights.WeightLoadError, match="missing 1: logit_scale") as err:
        CLIPModel.from_pretrained(tmp_path)
    assert "mis-shaped 1: vision_model.embeddings.class_embedding (47,) (expected (48,)" in str(err.value)


def test_pickle_weights_only_when_allowed(layouts, tmp_path):
    model, folder = layouts["vit_l14"]
    shutil.copy(folder / "config.json", tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(weights.WeightLoadError, match="allow_pickle"):
        CLIPModel.from_pretrained(tmp_path)
    _, params = CLIPModel.from_pretrained(tmp_path, allow_pickle=True)
    jax.tree.map(np.testing.assert_array_equal, params, scorer(folder).params)


def test_vision_model_folder_matches_transformers(tmp_path):
    """A standalone transformers CLIPVisionModel folder: last_hidden_state (non-causal) and pooled."""
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=28, patch_size=7, hidden_act="gelu")
    model = perturb(transformers.CLIPVisionModel(config), 3)
    model.save_pretrained(tmp_path)
    vision, params = CLIPVisionModel.from_pretrained(tmp_path)
    pixels = np.random.default_rng(2).standard_normal((2, 28, 28, 3)).astype(np.float32)
    hidden, pooled = jax.jit(lambda p, x: vision.apply({"params": p}, x))(params, pixels)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    assert hidden.shape == (2, 17, 32)
    assert rel_err("vision last_hidden_state", hidden, out.last_hidden_state.numpy()) <= 1e-4
    assert rel_err("vision pooled", pooled, out.pooler_output.numpy()) <= 1e-4
    with pytest.raises(ValueError, match="28, 28, 3"):
        vision.apply({"params": params}, pixels[:, :14])
