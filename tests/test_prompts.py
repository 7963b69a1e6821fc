"""Prompt sources: caption files through tfds, COCO captions, indexing, and every error path."""

import json

import ml_collections
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from rectflow_jax.configlib import ConfigError  # noqa: E402
from rectflow_jax.data import prompts as prompts_lib  # noqa: E402
from rectflow_jax.data.prompts import PromptFileError, host_indices, load_prompts  # noqa: E402


def load(path, data_dir, **options):
    return load_prompts(ml_collections.ConfigDict(dict(prompts=str(path), data_dir=str(data_dir), **options)))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path, columns):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def coco_document(annotations):
    return {"info": {}, "images": [], "annotations": annotations}


COCO_ANNOTATIONS = [  # images and captions deliberately out of id order
    {"image_id": 42, "id": 9, "caption": "A red bus on a street. "},
    {"image_id": 7, "id": 5, "caption": "two dogs  "},
    {"image_id": 42, "id": 3, "caption": "  a bus parked by the curb"},
    {"image_id": 7, "id": 1, "caption": "Dogs playing in the snow."},
    {"image_id": 100, "id": 2, "caption": "a lone tree"},
    {"image_id": 7, "id": 8, "caption": "a dog and a puppy"},
]


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "tfds"


# ------------------------------------------------------------------------ round trips


def test_txt_round_trip(tmp_path, data_dir):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat on a mat\n\n   \n  a dog in the fog  \r\nçà et là ✓\n")
    source = load(path, data_dir)
    assert source.num_prompts == 3
    assert source.prompts(range(3)) == ["a cat on a mat", "a dog in the fog", "çà et là ✓"]
    assert (data_dir / "caption_file").is_dir()  # prepared by tfds where data_dir says


def test_jsonl_round_trip_keeps_empty_prompts_and_exact_text(tmp_path, data_dir):
    records = [{"prompt": "first", "x": 1}, {"prompt": ""}, {"prompt": "  two\nlines "}, {"prompt": "snow ❄"}]
    source = load(write_jsonl(tmp_path / "p.jsonl", records), data_dir)
    assert source.prompts(range(source.num_prompts)) == ["first", "", "  two\nlines ", "snow ❄"]


@pytest.mark.parametrize("key", ["caption", "text"])
def test_jsonl_falls_back_to_caption_then_text(tmp_path, data_dir, key):
    source = load(write_jsonl(tmp_path / "p.jsonl", [{key: "a", "other": "x"}, {key: "b"}]), data_dir)
    assert source.prompts([0, 1]) == ["a", "b"]


def test_jsonl_prompt_key_picks_the_field(tmp_path, data_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "no", "alt": "yes"}, {"prompt": "no", "alt": "also"}])
    assert load(path, data_dir, prompt_key="alt").prompts([0, 1]) == ["yes", "also"]
    assert load(path, data_dir).prompts([0, 1]) == ["no", "no"]


def test_parquet_round_trip(tmp_path, data_dir):
    path = write_parquet(tmp_path / "p.parquet", {"text": ["a castle", "", "a boat ⛵"], "n": [1, 2, 3]})
    source = load(path, data_dir)  # default key 'prompt' absent: 'text' is used
    assert source.prompts(range(source.num_prompts)) == ["a castle", "", "a boat ⛵"]
    assert load(path, data_dir, prompt_key="text").prompts([0, 1, 2]) == ["a castle", "", "a boat ⛵"]


def test_coco_json_first_caption_of_each_image_in_id_order(tmp_path, data_dir):
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(coco_document(COCO_ANNOTATIONS)))
    source = load(path, data_dir)
    assert source.prompts(range(source.num_prompts)) == ["Dogs playing in the snow.", "a bus parked by the curb",
                                                         "a lone tree"]
    two = load(path, data_dir, captions_per_image=2)
    assert two.prompts(range(two.num_prompts)) == ["Dogs playing in the snow.", "two dogs", "a bus parked by the curb",
                                                   "A red bus on a street.", "a lone tree"]
    every = load(path, data_dir, captions_per_image=0)
    assert every.num_prompts == len(COCO_ANNOTATIONS)
    assert every.prompts(range(4)) == ["Dogs playing in the snow.", "two dogs", "a dog and a puppy",
                                       "a bus parked by the curb"]
    assert len({source.spec, two.spec, every.spec}) == 3


def test_coco_without_annotation_ids_keeps_file_order(tmp_path, data_dir):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(coco_document([{"image_id": 2, "caption": "b1"}, {"image_id": 1, "caption": "a1"},
                                              {"image_id": 2, "caption": "b0"}])))
    assert load(path, data_dir).prompts([0, 1]) == ["a1", "b1"]


def test_prompts_format_overrides_the_extension(tmp_path, data_dir):
    coco = tmp_path / "annotations.dat"
    coco.write_text(json.dumps(coco_document(COCO_ANNOTATIONS)))
    assert load(coco, data_dir, prompts_format="coco").num_prompts == 3
    lines = tmp_path / "list.data"
    lines.write_text("one\ntwo\n")
    assert load(lines, data_dir, prompts_format="txt").prompts([0, 1]) == ["one", "two"]


# -------------------------------------------------------------- content hash, no stale


def test_spec_follows_content_and_an_edited_file_is_never_served_stale(tmp_path, data_dir):
    path = tmp_path / "p.txt"
    path.write_text("alpha\nbeta\n")
    first = load(path, data_dir)
    path.write_text("alpha\ngamma\n")  # same path, same size, same prompt count
    second = load(path, data_dir)
    assert second.prompts([0, 1]) == ["alpha", "gamma"]
    assert second.spec != first.spec
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() in second.spec
    path.write_text("alpha\nbeta\n")
    back = load(path, data_dir)
    assert (back.spec, back.prompts([0, 1])) == (first.spec, ["alpha", "beta"])
    assert len(list((data_dir / "caption_file").iterdir())) == 2  # one prepared config per content


def test_a_prepared_file_is_read_from_the_tfds_cache(tmp_path, data_dir, monkeypatch):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"prompt": "cached"}])
    assert load(path, data_dir).prompts([0]) == ["cached"]

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed again although prepared")

    monkeypatch.setattr(prompts_lib, "parse_prompt_file", no_parsing)
    assert load(path, data_dir).prompts([0]) == ["cached"]
    spec = load(path, data_dir).spec
    moved = tmp_path / "moved.jsonl"
    path.rename(moved)  # the same content elsewhere is the same source, from the same cache
    assert load(moved, data_dir).spec == spec


def test_the_options_are_part_of_the_cache_name(tmp_path, data_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "caption": "c"}])
    assert load(path, data_dir).prompts([0]) == ["p"]
    assert load(path, data_dir, prompt_key="caption").prompts([0]) == ["c"]


def test_a_file_that_changes_while_prepared_is_refused(tmp_path, data_dir, monkeypatch):
    path = tmp_path / "p.txt"
    path.write_text("before\n")
    monkeypatch.setattr(prompts_lib, "_sha256_file", lambda p: "0" * 64)  # hashed, then edited
    with pytest.raises(PromptFileError, match="changed while") as err:
        load(path, data_dir)
    assert_names(err, path)


# -------------------------------------------------------------- indices, hosts, wrap


def test_prompts_by_index_are_deterministic_and_wrap(tmp_path, data_dir):
    path = tmp_path / "p.txt"
    path.write_text("p0\np1\np2\n")
    source = load(path, data_dir)
    again = load(path, tmp_path / "another_cache")  # prepared afresh elsewhere: the same prompts
    assert again.spec == source.spec
    assert source.prompts([2, 0, 2]) == ["p2", "p0", "p2"] == again.prompts([2, 0, 2])
    assert source.prompts([3, 4, 7, 3002]) == ["p0", "p1", "p1", "p2"]  # example k uses prompt k % 3
    assert source.prompts(np.arange(5, 7)) == ["p2", "p0"]
    assert source.prompts([]) == []
    with pytest.raises(ValueError, match="negative"):
        source.prompts([-1])
    with pytest.raises(TypeError):
        source.prompts([1.0])


@pytest.mark.parametrize("num_examples,count", [(10, 3), (7, 8), (0, 2), (1024, 4)])
def test_host_indices_split_the_examples_disjointly(num_examples, count):
    shares = [host_indices(num_examples, p, count) for p in range(count)]
    assert [i for share in shares for i in share] == list(range(num_examples))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shares == [host_indices(num_examples, p, count) for p in range(count)]
    with pytest.raises(ValueError):
        host_indices(num_examples, count, count)


# ------------------------------------------------------------------ tfds coco_captions


class FakeCocoCaptions(tfds.core.GeneratorBasedBuilder):
    """coco_captions' caption features (no images) in a tiny local dataset."""

    VERSION = tfds.core.Version("1.1.0")
    code_path = None  # as CaptionFile: no checksums to look up

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image/id": np.int64,
            "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
        }))

    def _split_generators(self, dl_manager):
        # 'test': two images without captions (tfds refuses a split without examples).
        return {"val": self._generate_examples(COCO_ANNOTATIONS), "test": self._generate_examples([], [3, 4])}

    def _generate_examples(self, annotations, image_ids=()):
        for image_id in {a["image_id"] for a in annotations} | set(image_ids):
            captions = [{"text": a["caption"], "id": a["id"]} for a in annotations if a["image_id"] == image_id]
            yield image_id, {"image/id": image_id, "captions": captions}


def test_tfds_coco_captions_match_the_annotation_file(tmp_path, data_dir):
    FakeCocoCaptions(data_dir=str(data_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco_document(COCO_ANNOTATIONS)))
    for per_image in (1, 2, 0):
        from_tfds = load("fake_coco_captions:val", data_dir, prompts_format="tfds", captions_per_image=per_image)
        from_file = load(path, data_dir, captions_per_image=per_image)
        assert from_tfds.num_prompts == from_file.num_prompts
        assert from_tfds.prompts(range(from_tfds.num_prompts)) == from_file.prompts(range(from_file.num_prompts))
        assert "fake_coco_captions/1.1.0 split val" in from_tfds.spec and "sha256:" in from_tfds.spec
    with pytest.raises(PromptFileError, match="no split 'nope'.*data.prompts|data.prompts.*no split 'nope'"):
        load("fake_coco_captions:nope", data_dir, prompts_format="tfds")
    with pytest.raises(PromptFileError, match="holds no captions"):
        load("fake_coco_captions:test", data_dir, prompts_format="tfds")


def test_coco_captions_not_prepared_is_one_clear_error(data_dir):
    data_dir.mkdir()
    with pytest.raises(PromptFileError, match="coco_captions.*data.prompts.*not prepared") as err:
        load("coco_captions:val", data_dir)  # auto: a name that is no file goes to tfds
    assert "data.data_dir" in str(err.value) and str(data_dir) in str(err.value)
    with pytest.raises(PromptFileError, match="does not exist"):
        load("no_such_tfds_dataset", data_dir, prompts_format="tfds")


# ---------------------------------------------------------------------------- errors


def assert_names(err, path):
    message = str(err.value)
    assert str(path) in message and "data.prompts" in message, message
    assert "\n" not in message.strip(), message


def test_missing_file(tmp_path, data_dir):
    path = tmp_path / "absent.txt"
    with pytest.raises(PromptFileError, match="does not exist") as err:
        load(path, data_dir)
    assert_names(err, path)


def test_directory_instead_of_file(tmp_path, data_dir):
    with pytest.raises(PromptFileError, match="is a directory") as err:
        load(tmp_path, data_dir)
    assert_names(err, tmp_path)


def test_unknown_extension(tmp_path, data_dir):
    path = tmp_path / "prompts.csv"
    path.write_text("a,b\n")
    with pytest.raises(PromptFileError, match=r"unknown extension '\.csv'.*data\.prompts_format") as err:
        load(path, data_dir)
    assert_names(err, path)


BAD_FILES = [
    ("empty.txt", "", "holds no prompts"),
    ("blank.txt", "\n   \n\t\n", "holds no prompts"),
    ("empty.jsonl", "\n\n", "holds no prompts"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), "not UTF-8"),
    ("bad_line.jsonl", '{"prompt": "ok"}\n\n{"prompt": "no end"\n', "not valid JSON on line 3"),
    ("list_line.jsonl", '{"prompt": "ok"}\n["a", "b"]\n', "JSON list on line 2, not an object"),
    ("no_key.jsonl", '{"title": "t", "url": "u"}\n', r"no key 'prompt' \(nor 'caption' or 'text'\) on line 1 "
                                                     r"\(keys there: \['title', 'url'\]\).*data.prompt_key"),
    ("key_lost.jsonl", '{"caption": "a"}\n{"prompt": "b"}\n', r"no key 'caption' on line 2.*\['prompt'\]"),
    ("number.jsonl", '{"prompt": "a"}\n{"prompt": 3}\n', "int at line 2, not text"),
    ("null.jsonl", '{"prompt": null}\n', r"no text at line 1 \(null\)"),
    ("surrogate.jsonl", '{"prompt": "\\ud800"}\n', "not valid Unicode"),
    ("broken.json", '{"annotations": [', "not valid JSON"),
    ("lines.json", '{"caption": "a"}\n{"caption": "b"}\n', "not valid JSON.*name it .jsonl"),
    ("plain.json", '["a", "b"]', r"not COCO captions.*found a JSON list"),
    ("no_annotations.json", '{"images": []}', r"not COCO captions.*found \['images'\]"),
    ("bad_entry.json", json.dumps(coco_document([{"image_id": 1, "caption": "a"}, {"id": 4, "caption": "b"}])),
     r"annotations\[1\] without 'image_id' and 'caption' \(found \['caption', 'id'\]\)"),
    ("empty_coco.json", json.dumps(coco_document([])), "holds no prompts"),
]


@pytest.mark.parametrize("name,content,match", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_caption_file(tmp_path, data_dir, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PromptFileError, match=match) as err:
        load(path, data_dir)
    assert_names(err, path)
    assert not list(data_dir.glob("caption_file/*/*"))  # nothing half-prepared is left to be served


def test_jsonl_with_an_explicit_key_does_not_fall_back(tmp_path, data_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [{"caption": "a"}])
    with pytest.raises(PromptFileError, match=r"no key 'alt' on line 1 \(keys there: \['caption'\]\)") as err:
        load(path, data_dir, prompt_key="alt")
    assert_names(err, path)


def test_parquet_without_the_column(tmp_path, data_dir):
    path = write_parquet(tmp_path / "p.parquet", {"url": ["u"], "width": [3]})
    with pytest.raises(PromptFileError, match=r"no column 'prompt' \(nor 'caption' or 'text'\) "
                                              r"\(columns: \['url', 'width'\]\).*data.prompt_key") as err:
        load(path, data_dir)
    assert_names(err, path)


def test_parquet_null_and_non_text_values(tmp_path, data_dir):
    nulls = write_parquet(tmp_path / "nulls.parquet", {"prompt": ["a", None]})
    with pytest.raises(PromptFileError, match=r"no text at row index 1 of column 'prompt' \(null\)") as err:
        load(nulls, data_dir)
    assert_names(err, nulls)
    numbers = write_parquet(tmp_path / "numbers.parquet", {"caption": [1, 2]})
    with pytest.raises(PromptFileError, match="int at row index 0 of column 'caption', not text") as err:
        load(numbers, data_dir)
    assert_names(err, numbers)


def test_corrupt_parquet(tmp_path, data_dir):
    good = write_parquet(tmp_path / "good.parquet", {"prompt": ["a", "b", "c"]})
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(PromptFileError, match="not a readable parquet file") as err:
        load(path, data_dir)
    assert_names(err, path)


def test_empty_parquet(tmp_path, data_dir):
    pa = pytest.importorskip("pyarrow")
    path = write_parquet(tmp_path / "empty.parquet", {"prompt": pa.array([], pa.string())})
    with pytest.raises(PromptFileError, match="holds no prompts") as err:
        load(path, data_dir)
    assert_names(err, path)


@pytest.mark.parametrize("options,match", [
    ({"prompts_format": "csv"}, "unknown data.prompts_format 'csv'"),
    ({"captions_per_image": -1}, "data.captions_per_image must be an integer >= 0"),
    ({"prompt_key": ""}, "data.prompt_key must be a non-empty string"),
])
def test_bad_options_are_config_errors(tmp_path, data_dir, options, match):
    path = tmp_path / "p.txt"
    path.write_text("a\n")
    with pytest.raises(ConfigError, match=match):
        load(path, data_dir, **options)


def test_prompts_not_set_is_a_config_error():
    with pytest.raises(ConfigError, match="data.prompts must name"):
        load_prompts(ml_collections.ConfigDict({"prompts": ""}))


def test_the_prepared_data_is_a_plain_tfds_dataset(tmp_path, data_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(5)])
    source = load(path, data_dir)
    (folder,) = data_dir.glob("caption_file/jsonl-*/1.0.0")
    builder = tfds.builder_from_directory(str(folder))  # readable without our code
    assert set(builder.info.features) == {"prompt", "index"} and list(builder.info.splits) == ["train"]
    rows = tfds.as_numpy(builder.as_dataset(split="train", batch_size=-1))
    assert sorted(zip(rows["index"].tolist(), [p.decode() for p in rows["prompt"]])) == \
        list(enumerate(source.prompts(range(5))))
