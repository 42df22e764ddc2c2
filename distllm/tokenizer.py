"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with one special token, ``<|endoftext|>``.

Every byte is in the base vocabulary, so any Unicode text encodes without unknown tokens and
``decode(encode(text)) == text``. ``<|endoftext|>`` (EOT) separates documents in the token
stream; it is only ever inserted by ``distllm prepare``: the literal string ``<|endoftext|>``
inside a document is encoded as ordinary text (``encode_special_tokens = True``), so a document
can never fake a document boundary.

``fingerprint`` identifies a tokenizer by content: the sha256 of its canonical JSON. Shards and
the manifest record it, and training refuses a tokenizer.json whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from distllm.durable import write_durably
from distllm.errors import ConfigError, DataError

EOT = "<|endoftext|>"
MIN_VOCAB_SIZE = 257
"""256 byte tokens plus EOT."""


def train_tokenizer(
    texts: Iterable[str] | Iterable[list[str]], vocab_size: int, min_frequency: int = 2, progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (strings or batches of strings); ``progress``
    shows the tokenizers library's own progress bars (counting pairs, computing merges).

    The vocabulary may come out smaller than ``vocab_size`` when the text has too few pairs
    that occur ``min_frequency`` times; use ``tok.get_vocab_size()`` for the real size.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"tokenizer.vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {EOT}), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer.json; DataError if it is missing or not a tokenizer."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"tokenizer file not found: {p}")
    return parse_tokenizer(p.read_bytes(), str(p))


def parse_tokenizer(data: bytes | str, origin: str) -> Tokenizer:
    """A tokenizer from the text of a tokenizer.json (read from ``origin``, named in errors)."""
    try:
        tok = Tokenizer.from_str(data.decode("utf-8") if isinstance(data, bytes) else data)
    except Exception as e:  # tokenizers raises plain Exception for any parse error; bytes may not be UTF-8
        raise DataError(f"could not read tokenizer {origin}: {e}") from None
    tok.encode_special_tokens = True  # not serialized, so set it on every load
    return tok


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write ``tok`` as JSON, atomically and durably (``distllm.durable``)."""
    write_durably(path, tok.to_str())


def fingerprint(tok: Tokenizer) -> str:
    """sha256 hex of the canonical (sorted-key, compact) JSON of ``tok``; stable across save/load."""
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def eot_id(tok: Tokenizer) -> int:
    """Id of the document separator ``<|endoftext|>``; DataError if the tokenizer lacks it."""
    i = tok.token_to_id(EOT)
    if i is None:
        raise DataError(f"the tokenizer has no '{EOT}' token, which distllm uses to separate documents")
    return i


# --------------------------------------------------------------------------- long documents

_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_SAFE_CUT = re.compile(r"(?<=\S) (?=\S)")
"""A space with a non-space on both sides: the GPT-2 pre-tokenizer always starts a new piece there."""


def splits_exactly(tok: Tokenizer) -> bool:
    """True if ``split_long`` keeps ``tok``'s ids: a byte-level BPE with the GPT-2 pre-tokenizer
    (as ``train_tokenizer`` makes) and no normalizer."""
    spec = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and (spec.get("model") or {}).get("type") == "BPE"
        and all(pre.get(k) == v for k, v in _GPT2_BYTE_LEVEL.items())
    )


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into parts of about ``max_chars`` at spaces between two non-spaces.

    The GPT-2 pre-tokenizer (``' ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+'``) starts a
    new pre-token at such a space whatever follows or precedes, and BPE never merges across
    pre-tokens, so encoding the parts one by one gives the ids of the whole text, with memory
    bounded by ``max_chars`` instead of the document (the Rust tokenizer needs ~450 bytes per
    token). A stretch without such a space longer than ``max_chars`` stays in one part.
    """
    if len(text) <= max_chars:
        return [text]
    parts, start = [], 0
    while len(text) - start > max_chars:
        cut = None
        for m in _SAFE_CUT.finditer(text, start + max(1, max_chars // 2), start + max_chars + 1):  # the last one
            cut = m.start()
        if cut is None:  # no safe space in the second half of the window: look further on
            m = _SAFE_CUT.search(text, start + max_chars)
            if m is None:
                break
            cut = m.start()
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return parts


# --------------------------------------------------------------------------- bytes of tokens


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level pre-tokenizer's character for each byte (GPT-2's table), inverted: char -> byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to code points
    256, 257, ... in byte order, so every vocabulary string is made of visible characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """The UTF-8 bytes each token id stands for (index = id); special tokens (``<|endoftext|>``) stand for none.

    Exact for a byte-level BPE (what ``train_tokenizer`` makes, and GPT-2-style tokenizer.json files):
    concatenating the bytes of a document's tokens gives the document's UTF-8 text. Other tokenizers
    get each token decoded on its own, which is approximate where a token holds part of a character.
    """
    spec = json.loads(tok.to_str())
    specials = {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
    vocab = tok.get_vocab(with_added_tokens=True)  # str -> id
    out = [b""] * tok.get_vocab_size(with_added_tokens=True)
    byte_level = (spec.get("model") or {}).get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel"
    alphabet = _byte_level_alphabet() if byte_level else None
    for text, i in vocab.items():
        if i in specials:
            continue
        if alphabet is not None and all(c in alphabet for c in text):
            out[i] = bytes(alphabet[c] for c in text)
        else:
            out[i] = tok.decode([i], skip_special_tokens=False).encode("utf-8")
    return out


def token_byte_lengths(tok: Tokenizer):
    """(vocab,) int64 numpy array: UTF-8 bytes per token id (0 for special tokens), for bits per byte."""
    import numpy as np

    return np.array([len(b) for b in token_bytes(tok)], dtype=np.int64)
