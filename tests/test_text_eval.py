"""`rectflow eval` at a COCO protocol, end to end on random weights and a mock COCO made here.

What must hold: the protocol picks its captions and images as documented; the command
writes metrics.json (FID, CLIP score, images/s, the protocol, the step count), grid.png and
one shard per shard_size images; FID equals the Fréchet distance of the stored features to
the reference images' features; a killed run continues without regenerating the shards it
finished, and a rerun with other settings is refused.
"""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from rectflow_jax import evaluate, text_eval
from rectflow_jax.data import coco
from rectflow_jax.random_folder import CAPTION_WORDS, write_random_folder
from rectflow_jax.tokenizer import build_bpe, write_tokenizer

CAPTIONS = ["a red square", "a blue circle", "a green field", "a cat on a mat", "a dog in the snow",
            "a bowl of fruit", "a city at night"]


def write_mock_coco(root, sizes=((40, 30), (24, 36), (32, 32), (50, 20), (30, 40), (28, 28), (36, 24))):
    """A captions JSON in COCO's layout (two captions for some images, ids out of order) and its images."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    (root / "images").mkdir(parents=True)
    for n, (width, height) in enumerate(sizes):
        image_id = 100 + 7 * ((n * 3) % len(sizes))  # file order is not id order
        name = f"{image_id:012d}.png"  # lossless, so that tfds and PIL decode the same pixels
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        annotations.append({"id": 1000 + n, "image_id": image_id, "caption": f" {CAPTIONS[n]} "})
        if n % 2:  # a later (higher-id) caption that the protocol must not take
            annotations.append({"id": 5000 + n, "image_id": image_id, "caption": "a second caption"})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations[::-1]}))
    return root / "captions.json", root / "images"


def test_the_protocol_takes_each_images_first_caption_in_id_order_and_a_seeded_subset(tmp_path):
    captions, images = write_mock_coco(tmp_path)
    everything = coco.read_pairs(captions)
    pairs = coco.select_pairs(everything, 7)
    assert [p.image_id for p in pairs] == sorted(p.image_id for p in pairs)
    assert "a second caption" not in [p.caption for p in pairs]
    assert pairs[0].caption == pairs[0].caption.strip()
    subset = coco.select_pairs(everything, 4, seed=3)
    assert len(subset) == 4 and subset == coco.select_pairs(everything, 4, seed=3)
    assert {p.image_id for p in subset} <= {p.image_id for p in pairs}
    assert [p.image_id for p in subset] == sorted(p.image_id for p in subset)
    with pytest.raises(coco.EvalDataError, match="has 7 captioned images"):
        coco.select_pairs(everything, 8, origin=str(captions))
    # The FID resize: a centre square, then bicubic to the protocol's size.
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # the centre square is all white
    assert (coco.fid_image(wide, 5) == 255).all()
    assert coco.fid_image(np.full((8, 8, 3), 7, np.uint8), 8).shape == (8, 8, 3)


class FakeCocoImages(tfds.core.GeneratorBasedBuilder):
    """coco_captions' features (image, image/filename, image/id, captions) over the mock COCO's files."""

    VERSION = tfds.core.Version("1.1.0")
    code_path = None  # nothing to download, no checksums to look up
    SOURCE = None  # the mock's folder, set by the test

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="png"), "image/filename": tfds.features.Text(),
            "image/id": np.int64, "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64})}))

    def _split_generators(self, dl_manager):
        document = json.loads((self.SOURCE / "captions.json").read_text())
        images = sorted(document["images"], key=lambda i: i["file_name"])
        return {"val": self._generate_examples(images[:4], document), "test": self._generate_examples(images[4:],
                                                                                                        document)}

    def _generate_examples(self, images, document):
        for image in images:
            captions = [{"text": a["caption"], "id": a["id"]} for a in document["annotations"]
                        if a["image_id"] == image["id"]]
            yield image["id"], {"image": str(self.SOURCE / "images" / image["file_name"]),
                                "image/filename": image["file_name"], "image/id": image["id"], "captions": captions}


def test_a_tfds_coco_captions_gives_the_same_pairs_and_reference_images_as_the_files(tmp_path, monkeypatch):
    captions, images = write_mock_coco(tmp_path / "coco")
    monkeypatch.setattr(FakeCocoImages, "SOURCE", tmp_path / "coco")
    FakeCocoImages(data_dir=str(tmp_path / "tfds")).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    files = coco.CocoSource.from_config({"captions": str(captions), "images": str(images)})
    from_tfds = coco.CocoSource.from_config({"captions": "fake_coco_images:val+test",
                                             "data_dir": str(tmp_path / "tfds")})
    assert from_tfds.all_pairs() == files.all_pairs()
    pairs = coco.select_pairs(files.all_pairs(), 5, seed=1)
    by_id = lambda source: np.concatenate(list(source.reference_chunks(pairs, 12, chunk=2)))
    a, b = by_id(files), by_id(from_tfds)
    assert len(a) == len(b) == 5
    order = lambda images: np.lexsort(images.reshape(len(images), -1).T)  # tfds yields its own order
    np.testing.assert_array_equal(a[order(a)], b[order(b)])
    assert from_tfds.identity(pairs)["image_ids"] == [p.image_id for p in pairs]
    for bad, words in (({"captions": "fake_coco_images:nope", "data_dir": str(tmp_path / "tfds")}, "no split"),
                       ({"captions": "fake_coco_images:val", "images": str(images)}, "leave eval.images unset"),
                       ({"captions": str(captions)}, "--config.eval.images"),
                       ({"captions": "no/such/file.json"}, "neither an existing file")):
        with pytest.raises(coco.EvalDataError, match=words):
            coco.CocoSource.from_config(bad).all_pairs()


# ------------------------------------------------------------------------- the whole command

import jax  # noqa: E402

from cli_helpers import error_line, rectflow  # noqa: E402
from rectflow_jax import configlib, weights  # noqa: E402
from rectflow_jax import text_to_image as t2i  # noqa: E402
from rectflow_jax.models import inception  # noqa: E402
from rectflow_jax.models.clip import CLIPScorer  # noqa: E402

CONFIG = "configs/coco2017_5k.py"


def write_clip_folder(folder):
    """A tiny random transformers CLIPModel folder (ViT-L/14's layout, 28-pixel crops) with our BPE tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab = write_tokenizer(folder, *build_bpe(CAPTION_WORDS))
    eos = vocab["<|endoftext|>"]
    text = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos)
    vision = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)) \
        .save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"crop_size": 28, "size": 28}))
    return folder


def write_inception_weights(path):
    """pytorch-fid's tensor names and shapes, random values (positive BatchNorm variances)."""
    rng = np.random.default_rng(0)
    state = {}
    for name, shape in inception.state_dict_shapes().items():
        if name.endswith("running_var"):
            state[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name.endswith("running_mean") or name.endswith("bias"):
            state[name] = rng.normal(0, 0.1, shape).astype(np.float32)
        elif name.endswith("bn.weight"):
            state[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:  # conv kernels, scaled to keep activations O(1) through 90-odd layers
            fan_in = int(np.prod(shape[1:]))
            state[name] = rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
    weights.write_safetensors(path, state)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_eval")
    captions, images = write_mock_coco(root / "coco")
    folder = write_random_folder(root / "instaflow_tiny", kind="rectified_flow")
    overrides = [f"--config.eval.captions={captions}", f"--config.eval.images={images}",
                 f"--config.eval.inception_weights={write_inception_weights(root / 'inception.safetensors')}",
                 f"--config.eval.clip_model={write_clip_folder(root / 'clip')}",
                 f"--config.eval.stats_dir={root / 'stats'}", "--config.eval.num_images=7",
                 "--config.eval.fid_resolution=16", "--config.eval.shard_size=2", "--config.eval.batch_size=4",
                 "--config.sample.height=16", "--config.sample.width=16", "--config.sample.batch_size=2"]
    return root, folder, overrides


def load_config(overrides):
    config = configlib.load_config(CONFIG)
    for flag in overrides:
        key, value = flag.removeprefix("--config.").split("=", 1)
        section, name = key.split(".")
        config[section][name] = type(config[section][name])(value) if config[section][name] is not None else value
    return config


class Killed(Exception):
    pass


@pytest.mark.slow
def test_eval_writes_fid_and_clip_and_a_killed_run_resumes_without_regenerating(setup, monkeypatch):
    root, folder, overrides = setup
    out = root / "eval"
    # A first run, in this process, killed once its first shard is written.
    calls = []
    original = text_eval._Generator.__call__

    def dies_on_the_second_shard(self, indices, prompts):
        calls.append(list(indices))
        if len(calls) == 2:
            raise Killed
        return original(self, indices, prompts)

    monkeypatch.setattr(text_eval._Generator, "__call__", dies_on_the_second_shard)
    pipe = t2i.TextToImage.from_pretrained(folder)
    with pytest.raises(Killed):
        text_eval.evaluate_text_to_image(load_config(overrides), pipe, out, progress=False)
    first = out / "shards" / "shard_00000.npz"
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard_00000.npz"]  # no partial file left
    before = first.stat().st_mtime_ns, first.read_bytes()

    # The command continues: the finished shard is read, not made again.
    result = rectflow("eval", f"--config={CONFIG}", f"--pretrained={folder}", f"--out={out}", "--quiet", *overrides)
    assert "1 of 4 shards done, continuing" in result.stderr
    assert (first.stat().st_mtime_ns, first.read_bytes()) == before
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "coco2017_5k" and metrics["num_steps"] == 1 and metrics["images"] == 7
    assert metrics["images_per_second"] > 0 and (out / "grid.png").is_file()

    shards = [np.load(out / "shards" / f"shard_{k:05d}.npz") for k in range(4)]
    assert [list(s["index"]) for s in shards] == [[0, 1], [2, 3], [4, 5], [6]]
    pairs = coco.read_pairs(root / "coco" / "captions.json")
    assert [str(p) for s in shards for p in s["prompt"]] == [p.caption for p in pairs]
    assert (out / "grid.txt").read_text().splitlines()[0] == f"0: {pairs[0].caption}"

    # The figures are what the stored images give: Inception features, FID against the
    # reference images, and CLIP cosine scores with the captions.
    params = inception.load_inception_params(root / "inception.safetensors")
    features = jax.jit(inception.inception_features)
    for shard in shards[:1]:
        np.testing.assert_allclose(shard["inception"], features(params, shard["images"] / 255.0), rtol=1e-4,
                                   atol=1e-5)
    reference = coco.load_reference(root / "coco" / "images", pairs, 16)
    mu_ref, sigma_ref = evaluate.gaussian_statistics(np.asarray(features(params, reference / 255.0)))
    (stats,) = (root / "stats").iterdir()
    assert stats.name.startswith("coco2017_5k_")
    np.testing.assert_allclose(np.load(stats)["mu"], mu_ref, rtol=1e-4, atol=1e-5)
    mu, sigma = evaluate.gaussian_statistics(np.concatenate([s["inception"] for s in shards]))
    assert metrics["fid"] == pytest.approx(evaluate.frechet_distance_from_statistics(mu, sigma, mu_ref, sigma_ref),
                                           rel=1e-6)
    scorer = CLIPScorer.from_pretrained(root / "clip")
    images = np.concatenate([s["images"] for s in shards])  # generated at 16x16 = the FID resolution: as made
    scores = scorer.scores(images, [p.caption for p in pairs])
    np.testing.assert_allclose(np.concatenate([s["clip_score"] for s in shards]), scores, rtol=1e-4, atol=1e-5)
    assert metrics["clip_score"] == pytest.approx(float(np.mean(scores)), abs=1e-5)

    # Two processes (hosts of a pod) split the shards: 1 makes 1 and 3, then 0 makes 0 and 2 and sums up.
    split = root / "eval_split"
    config = load_config(overrides)
    assert text_eval.evaluate_text_to_image(config, pipe, split, False, process_index=1, process_count=2) is None
    assert sorted(p.name for p in (split / "shards").iterdir()) == ["shard_00001.npz", "shard_00003.npz"]
    assert not (split / "metrics.json").exists()
    again = text_eval.evaluate_text_to_image(config, pipe, split, False, process_index=0, process_count=2)
    assert again["fid"] == pytest.approx(metrics["fid"], rel=1e-4)
    for k in range(4):  # image i depends on (seed, i) only: the same images, whoever made them
        made = np.load(split / "shards" / f"shard_{k:05d}.npz")["images"].astype(int)
        # Shard 0 came from this process too; 1-3 from the command on one device (rounding may flip a level).
        assert np.abs(made - shards[k]["images"]).max() <= (0 if k == 0 else 1), k

    # Other settings in the same folder are refused, naming what changed.
    with pytest.raises(coco.EvalDataError, match="num_steps: 1 -> 2"):
        text_eval.evaluate_text_to_image(load_config([*overrides, "--config.sample.num_steps=2"]), pipe, out, False)


def test_eval_names_the_missing_protocol_inputs(tmp_path):
    line = error_line(rectflow("eval", f"--config={CONFIG}", f"--pretrained={tmp_path}", f"--out={tmp_path / 'o'}",
                               check=False))
    assert "--config.eval.captions" in line and "--config.eval.inception_weights" in line
