"""CLIP BPE tokenizers learned from a corpus (rectflow_jax.tokenizer), read back by transformers.

What must hold: learn_bpe merges the most frequent pair first and stops once every corpus
word is one token (or at max_merges); transformers' CLIPTokenizer, loading the folder we
write, gives every corpus word one id and encodes any text, seen or not, as our own
encode_words does; the files depend on the corpus only; digits are words of their own.
"""

import json
import random

import pytest

from rectflow_jax import tokenizer as clip_bpe

transformers = pytest.importorskip("transformers")

CORPUS = ["a handwritten seven", "the digit 7", "the number seven", "a handwritten three", "the digit 3",
          "the number three", "a drawing of the digit 42", "Seven, written by hand"]
UNSEEN = ["A Scribbled 7, by hand!", "sevenfold", "the digit 1234567890", "it's a <|startoftext|> seven",
          "café  naïve\tthree", "cafe\u0301 decomposed", "日本語 7", ""]
FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def read_bpe(folder):
    """(vocab, merges) as written to `folder`."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    header, *lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert header == "#version: 0.2"
    return vocab, [tuple(line.split(" ")) for line in lines]


def corpus_words(texts):
    return sorted({word for text in texts for word in clip_bpe.pre_tokenize(text)})


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """(transformers CLIPTokenizer, vocab, merges) learned from CORPUS."""
    folder = tmp_path_factory.mktemp("corpus_tokenizer")
    tokenizer = clip_bpe.build_corpus_tokenizer(CORPUS, folder)
    return (tokenizer, *read_bpe(folder))


def test_corpus_words_are_one_id_each(learned):
    tokenizer, vocab, _ = learned
    for word in corpus_words(CORPUS):
        assert tokenizer(word, add_special_tokens=False).input_ids == [vocab[word + "</w>"]], word
    for text in CORPUS:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
        assert tokens == [clip_bpe.BOS, *(word + "</w>" for word in clip_bpe.pre_tokenize(text)), clip_bpe.EOS]
    # Special tokens last, as random_folder lays them out (a CLIPTextConfig's ids follow).
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        len(vocab) - 2, len(vocab) - 1, len(vocab) - 1, len(vocab) - 1)
    assert len(tokenizer) == len(vocab) and tokenizer.model_max_length == 77


@pytest.mark.parametrize("text", CORPUS + UNSEEN)
def test_transformers_encodes_as_encode_words(learned, text):
    tokenizer, vocab, merges = learned
    ours = clip_bpe.encode_words(text, vocab, merges)
    assert tokenizer(text).input_ids == [tokenizer.bos_token_id, *ours, tokenizer.eos_token_id]


def test_unseen_words_come_in_pieces(learned):
    tokenizer, vocab, merges = learned
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("sevenfold", add_special_tokens=False).input_ids)
    assert len(pieces) > 1 and "".join(pieces) == "sevenfold</w>" and pieces[-1].endswith("</w>")
    assert "sevenfold</w>" not in vocab


def test_unknown_pieces_are_eos():
    """As CLIP's unk: a piece missing from the vocab encodes as <|endoftext|>."""
    vocab, merges = clip_bpe.learn_bpe(["ab"])
    del vocab["ab</w>"]
    assert clip_bpe.encode_words("ab a ab", vocab, merges) == [vocab[clip_bpe.EOS], vocab["a</w>"], vocab[clip_bpe.EOS]]


def test_decode_round_trips_corpus_text(learned):
    tokenizer = learned[0]

    def decode(text):
        return tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True)

    for text in CORPUS[:6]:  # lowercase words and single digits
        assert decode(text) == text
    # CLIP decodes each word followed by a space: punctuation and the digits of a number come back apart.
    for text in CORPUS:
        assert decode(text) == " ".join(clip_bpe.pre_tokenize(text))
    assert decode("Seven, written by hand") == "seven , written by hand"
    assert decode("a drawing of the digit 42") == "a drawing of the digit 4 2"


def test_first_merge_is_the_most_frequent_pair():
    # "cd" three times outweighs "ab" once; unweighted the two would tie and "ab" (smaller) go first.
    _, merges = clip_bpe.learn_bpe(["cd cd cd ab"])
    assert merges == [("c", "d</w>"), ("a", "b</w>")]
    # (a, t</w>) in four words beats (t, h) and (h, e</w>) in "the" twice; ties go to the smaller pair.
    _, merges = clip_bpe.learn_bpe(["the cat on the mat", "a hat", "a bat"])
    assert merges[0] == ("a", "t</w>")
    assert clip_bpe.learn_bpe(["ab cd"])[1] == [("a", "b</w>"), ("c", "d</w>")]


def test_merges_stop_when_every_word_is_whole():
    vocab, merges = clip_bpe.learn_bpe(CORPUS)
    byte_map = clip_bpe.bytes_to_unicode()

    def whole_words(merges):
        ranks = {pair: i for i, pair in enumerate(merges)}
        return sum(clip_bpe._bpe(clip_bpe._word_symbols(word, byte_map), ranks) == [word + "</w>"]
                   for word in corpus_words(CORPUS))

    assert whole_words(merges) == len(corpus_words(CORPUS)) > whole_words(merges[:-1])
    assert clip_bpe.learn_bpe(CORPUS, max_merges=len(merges) + 5) == (vocab, merges)
    capped_vocab, capped = clip_bpe.learn_bpe(CORPUS, max_merges=5)
    assert capped == merges[:5] and len(capped_vocab) == 512 + len({a + b for a, b in capped}) + 2
    assert list(capped_vocab)[-2:] == [clip_bpe.BOS, clip_bpe.EOS]
    assert list(vocab)[:512] == list(capped_vocab)[:512] == list(clip_bpe.build_bpe(["x"])[0])[:512]


def test_capped_tokenizer_still_agrees(tmp_path):
    tokenizer = clip_bpe.build_corpus_tokenizer(CORPUS, tmp_path, max_merges=10, model_max_length=16)
    vocab, merges = read_bpe(tmp_path)
    assert len(merges) == 10 and tokenizer.model_max_length == 16
    for text in CORPUS + UNSEEN:
        assert tokenizer(text).input_ids == [tokenizer.bos_token_id, *clip_bpe.encode_words(text, vocab, merges),
                                             tokenizer.eos_token_id]
    assert len(tokenizer("a handwritten seven", add_special_tokens=False).input_ids) > 3  # words in pieces


def test_same_corpus_same_files(tmp_path):
    shuffled = list(CORPUS)
    random.Random(0).shuffle(shuffled)
    assert shuffled != CORPUS
    for name, texts in (("first", CORPUS), ("again", CORPUS), ("shuffled", shuffled),
                        ("generator", (text for text in CORPUS))):
        clip_bpe.write_tokenizer(tmp_path / name, *clip_bpe.learn_bpe(texts))
    for name in ("again", "shuffled", "generator"):
        for file in FILES:
            assert (tmp_path / name / file).read_bytes() == (tmp_path / "first" / file).read_bytes(), (name, file)


def test_digits_are_words_of_their_own(learned):
    assert clip_bpe.pre_tokenize("  The digit\t42!  ") == ["the", "digit", "4", "2", "!"]
    assert clip_bpe.pre_tokenize("It's 7's") == ["it", "'s", "7", "'s"]
    tokenizer = learned[0]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("the digit 42", add_special_tokens=False).input_ids)
    assert tokens == ["the</w>", "digit</w>", "4</w>", "2</w>"]


def test_empty_corpus_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        clip_bpe.build_corpus_tokenizer([], tmp_path / "empty")
    with pytest.raises(ValueError, match="empty corpus"):
        clip_bpe.learn_bpe(iter([]))
    with pytest.raises(ValueError, match="without words"):
        clip_bpe.build_corpus_tokenizer(["", "  \n", "\t"], tmp_path / "blank")
    with pytest.raises(TypeError, match="not one string"):
        clip_bpe.learn_bpe("a handwritten seven")
    assert not (tmp_path / "empty").exists() and not (tmp_path / "blank").exists()
