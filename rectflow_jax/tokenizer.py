"""CLIP byte-level BPE tokenizers built here (nothing downloaded), for transformers' CLIPTokenizer.

Why: tests and tiny pipelines need a CLIP tokenizer folder (vocab.json, merges.txt and the
configs, as released) without reaching the Hub. Two ways to get its (vocab, merges):

- `build_bpe(words)`: each word of a given list is one token `word</w>` (random_folder's
  tokenizer);
- `learn_bpe(texts)`: a BPE learned from a corpus by pair frequency, as BPE is trained,
  until every corpus word is one token (or `max_merges`).

Both lay the vocab out alike: the 256 byte symbols, the same 256 with the end-of-word mark
`</w>`, the merged tokens in merge order, then <|startoftext|> and <|endoftext|> as the last
two ids (<|endoftext|> is also unk and pad, as in CLIP and SD). `write_tokenizer` writes the
folder; `encode_words` is our own encoding, a reference for transformers' CLIPTokenizer.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

# `regex` (installed with transformers, a dependency) for \p{L} / \p{N}, CLIP's own pattern.
import regex

from rectflow_jax import storage

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"
# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, other runs.
CLIP_PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                             r"""[^\s\p{L}\p{N}]+""")
WHITESPACE = regex.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable character table (the base symbols of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _merge_pair(word: Sequence[str], pair: tuple[str, str]) -> list[str]:
    """`word` with every occurrence of `pair` merged, left to right (as CLIP's BPE merges)."""
    merged, i = [], 0
    while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def _bpe(symbols: Sequence[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word's symbols: merge the best-ranked adjacent pair until none is known."""
    word = list(symbols)
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word, word[1:])}
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        word = _merge_pair(word, best)
    return word


def _word_symbols(word: str, byte_map: Mapping[int, str]) -> list[str]:
    chars = [byte_map[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + EOW]


def _vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """The vocab of `merges`: 512 base symbols, merged tokens in merge order, BOS and EOS last."""
    base = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(base + [c + EOW for c in base])}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab


def check_words(words: Sequence[str]) -> list[str]:
    """The word list, lowercased and deduplicated in order; each must be letters only.

    CLIP's pre-tokenizer lowercases text and splits letters from digits, punctuation and
    spaces, so only an all-letter word can reach BPE whole.
    """
    seen: dict[str, None] = {}
    for word in words:
        if not isinstance(word, str) or not word or not word.isalpha():
            raise ValueError(f"vocab_words must be non-empty words of letters only, got {word!r}")
        seen.setdefault(word.lower(), None)
    return list(seen)


def build_bpe(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a CLIP BPE in which each of `words` is the single token `word</w>`.

    Merges are added word by word: while the word does not yet come out whole under the
    merges so far, the first two of its current pieces are merged, as the lowest-priority
    merge. A merge of lowest priority only applies once no earlier one does, so the words
    already made whole stay whole.
    """
    byte_map = bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in check_words(words):
        symbols = _word_symbols(word, byte_map)
        pieces = _bpe(symbols, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = _bpe(symbols, ranks)
    return _vocab(merges), merges


def pre_tokenize(text: str) -> list[str]:
    """CLIP's words of `text`: whitespace collapsed and stripped, lowercased, split by CLIP_PATTERN.

    As CLIP's SimpleTokenizer without its ftfy / HTML-unescape clean-up, but with the NFC
    normalisation both ftfy and transformers' CLIPTokenizer apply. Every digit is a word.
    """
    text = WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip().lower()
    return CLIP_PATTERN.findall(text)


def learn_bpe(texts: Iterable[str], *, max_merges: int | None = None,
              ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a CLIP BPE learned from `texts` by pair frequency.

    Each distinct word (pre_tokenize; the special tokens aside) starts as its byte symbols
    with `</w>` on the last; the adjacent pair most frequent over the corpus (each word
    counted as often as it occurs; ties to the lexicographically smallest pair, so the
    result depends on the corpus only, not its order) is merged everywhere, and again,
    until every word is one token or `max_merges` merges are made. Pairs are recounted
    after each merge: fine for prompt corpora, slow for large ones.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of texts, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("cannot learn a BPE from an empty corpus")
    counts = Counter(word for text in texts for word in pre_tokenize(text) if word not in (BOS, EOS))
    if not counts:
        raise ValueError(f"cannot learn a BPE from a corpus without words ({len(texts)} texts, none with a word)")
    byte_map = bytes_to_unicode()
    words = {tuple(_word_symbols(word, byte_map)): n for word, n in counts.items()}
    merges: list[tuple[str, str]] = []
    while max_merges is None or len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = {tuple(_merge_pair(word, best)): n for word, n in words.items()}
    return _vocab(merges), merges


def encode_words(text: str, vocab: Mapping[str, int], merges: Sequence[Sequence[str]]) -> list[int]:
    """Our ids of `text` under (vocab, merges), without BOS / EOS: the reference for CLIPTokenizer.

    As CLIP encodes: pre_tokenize, byte symbols, BPE by merge rank, vocab lookup; the special
    tokens written out map to their ids, and a piece not in the vocab to EOS (CLIP's unk).
    """
    ranks = {(a, b): i for i, (a, b) in enumerate(merges)}
    byte_map = bytes_to_unicode()
    ids = []
    for word in pre_tokenize(text):
        pieces = [word] if word in (BOS, EOS) else _bpe(_word_symbols(word, byte_map), ranks)
        ids.extend(vocab.get(piece, vocab[EOS]) for piece in pieces)
    return ids


def write_tokenizer(folder: str | Path, vocab: Mapping[str, int], merges: Sequence[Sequence[str]], *,
                    model_max_length: int = 77) -> dict[str, int]:
    """A CLIP tokenizer folder as released (vocab.json, merges.txt, configs); returns the vocab."""
    folder = storage.path(folder)  # a stage's tokenizer/ may be on gs://
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return dict(vocab)


def build_corpus_tokenizer(texts: Iterable[str], folder: str | Path, *, model_max_length: int = 77,
                           max_merges: int | None = None):
    """transformers' CLIPTokenizer of a BPE learned from `texts` (learn_bpe), written to `folder`."""
    import transformers  # slow to import; only this function needs it

    write_tokenizer(folder, *learn_bpe(texts, max_merges=max_merges), model_max_length=model_max_length)
    with storage.local_copy(folder) as local:  # transformers reads local folders only
        return transformers.CLIPTokenizer.from_pretrained(local)
