import json

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from distllm.errors import ConfigError, DataError
from distllm.tokenizer import (
    EOT,
    eot_id,
    fingerprint,
    load_tokenizer,
    parse_tokenizer,
    save_tokenizer,
    split_long,
    splits_exactly,
    train_tokenizer,
)

TRICKY = [
    "👩‍👩‍👧", "🦙", "日本語", "中文", "한국어", "e\u0301", "a\u0308\u0323", "\u200b", "\u200d", "\ufeff", "\x00",
    "\x1b[31m", "\x7f", "\r\n", "\r", "\t\t", "    ", "\n\n\n", " \u00a0 ", "\U0010ffff", "<|endoftext|>", "'s", "Ġ",
]  # fmt: skip


@pytest.fixture(scope="module")
def texts(tiny_corpus):
    return [path.read_text(encoding="utf-8") for path in sorted(tiny_corpus.glob("*.txt"))]


@pytest.fixture(scope="module")
def tok(texts):
    return train_tokenizer(texts, vocab_size=400, min_frequency=2)


# no explain phase: on Python 3.11 it traces every line (sys.settrace), which crawled inside the full suite
@settings(max_examples=150, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
@given(text=st.lists(st.one_of(st.text(), st.sampled_from(TRICKY))).map("".join))
def test_round_trip_arbitrary_unicode(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert eot_id(tok) not in ids  # not even for a literal "<|endoftext|>"


def test_every_byte_is_in_the_vocabulary(tok):
    vocab = tok.get_vocab()
    assert all(ch in vocab for ch in pre_tokenizers.ByteLevel.alphabet())
    assert tok.get_vocab_size() == 400


def test_eot_is_one_special_token(tok):
    eot = eot_id(tok)
    assert tok.id_to_token(eot) == EOT
    assert tok.get_added_tokens_decoder()[eot].special
    assert tok.decode([eot], skip_special_tokens=False) == EOT
    hello = tok.encode("hello").ids
    assert tok.decode(hello + [eot] + hello, skip_special_tokens=False) == f"hello{EOT}hello"


def test_fingerprint_is_stable_across_save_and_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    loaded = load_tokenizer(path)
    assert fingerprint(loaded) == fingerprint(tok)
    assert len(fingerprint(tok)) == 64
    assert (
        loaded.encode("A literal <|endoftext|> stays text").ids == tok.encode("A literal <|endoftext|> stays text").ids
    )
    assert eot_id(loaded) not in loaded.encode(EOT).ids


def test_fingerprint_differs_for_a_different_tokenizer(tok, texts):
    assert fingerprint(train_tokenizer(texts, vocab_size=399)) != fingerprint(tok)
    assert fingerprint(train_tokenizer(texts[1:], vocab_size=400)) != fingerprint(tok)


def test_load_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "garbage.json"
    bad.write_text("{not a tokenizer")
    with pytest.raises(DataError, match="garbage.json"):
        load_tokenizer(bad)


def test_vocab_too_small_for_the_byte_alphabet():
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        train_tokenizer(["some text"], vocab_size=100)


WORDS = [" ", "  ", " x", "\n", "word ", "12 ", "'s ", "(", "é "]


# no explain phase: on Python 3.11 it traces every line (sys.settrace), which crawled inside the full suite
@settings(max_examples=150, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
@given(
    text=st.lists(st.one_of(st.text(), st.sampled_from(TRICKY + WORDS))).map("".join),
    max_chars=st.integers(1, 40),
)
def test_long_documents_split_into_parts_with_the_same_ids(tok, text, max_chars):
    """``split_long`` cuts only where the byte-level pre-tokenizer starts a new piece anyway."""
    parts = split_long(text, max_chars)
    assert "".join(parts) == text
    ids = [i for part in parts for i in tok.encode(part, add_special_tokens=False).ids]
    assert ids == tok.encode(text, add_special_tokens=False).ids


def test_split_long_bounds_the_parts(texts):
    text = " ".join(texts)
    parts = split_long(text, 1000)
    assert "".join(parts) == text and len(parts) > len(text) // 1000
    assert all(len(p) <= 1000 for p in parts)
    assert split_long("x" * 50, 10) == ["x" * 50]  # no space to cut at: one part
    assert split_long("a b c d", 1) == ["a", " b", " c", " d"]  # every part moves on, even for tiny max_chars


def test_splits_exactly_only_for_gpt2_byte_level(tok):
    assert splits_exactly(tok)
    spec = json.loads(tok.to_str())
    spec["normalizer"] = {"type": "NFC"}
    assert not splits_exactly(parse_tokenizer(json.dumps(spec), "edited"))
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    assert not splits_exactly(parse_tokenizer(json.dumps(spec), "edited"))
