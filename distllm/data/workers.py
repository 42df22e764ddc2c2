"""The per-piece work of ``distllm prepare``, run in worker processes (or in the main one).

``run_tasks`` maps a task function over pieces with a process pool (``fork`` on Linux) and
yields results as they finish; ``scan_piece`` and ``tokenize_piece`` are the two tasks. A
worker holds one piece's batch of text (``BATCH_BYTES``) and its tokens, never more, and writes
its output to files that appear complete or not at all (temp file, fsync, rename) before its
result reaches the main process, which records it in the journal.

With one process the tasks run in the main process and the Rust tokenizer spreads each batch
over all cores with threads; with k > 1, k single-threaded processes each take whole pieces.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

from distllm.data import dedup
from distllm.data.corpus import Bad, Piece, read_piece
from distllm.data.shards import SPLITS
from distllm.tokenizer import split_long, splits_exactly

BATCH_BYTES = 1 << 20
"""Text per ``encode_batch`` call (the Rust tokenizer needs ~450 bytes per token while encoding)."""
LONG_DOC_CHARS = 1 << 20
"""Longer documents are encoded in parts (``tokenizer.split_long``: the same ids, bounded memory)."""
SHOW_BAD = 5
"""Names of files that are not text kept per piece (and reported in all)."""

_state: dict = {}
"""What the tasks of this process share, set by ``init_scan`` / ``init_tokenize``."""


@contextmanager
def run_tasks(fn: Callable, tasks: list, num_proc: int, init: Callable, initargs: tuple) -> Iterator[Iterator]:
    """``with run_tasks(...) as results``: ``fn(task)`` for each task, in completion order, in
    ``num_proc`` processes (in this one when 1, or for a single task). Leaving the block stops
    the workers at once (also on Ctrl-C, which the workers themselves ignore)."""
    if num_proc <= 1 or len(tasks) <= 1:
        init(*initargs)
        try:
            yield map(fn, tasks)
        finally:
            _state.clear()
        return
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    with _tokenizers_threads_off(), ctx.Pool(min(num_proc, len(tasks)), _init_child, (init, initargs)) as pool:
        yield pool.imap_unordered(fn, tasks)  # the pool terminates its workers on leaving the block


def _init_child(init: Callable, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the whole process group: the main process handles it
    init(*initargs)


@contextmanager
def _tokenizers_threads_off():
    """Worker processes tokenize single-threaded (and the Rust library does not warn about the fork)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


class Doc(NamedTuple):
    position: int
    """Among the usable documents of its piece."""
    text: str


def usable(piece: Piece, field: str, limit: int | None) -> Iterator[Doc | Bad | None]:
    """Each usable document of ``piece`` (the first ``limit``); ``Bad`` for input that is not
    text; None for an empty (whitespace-only) document."""
    position = 0
    for doc in read_piece(piece, field):
        if isinstance(doc, Bad):
            yield doc
        elif not doc or doc.isspace():
            yield None
        else:
            if limit is not None and position >= limit:
                return
            yield Doc(position, doc)
            position += 1


def kept(piece: Piece, field: str, limit: int | None, dup_dir: Path | None) -> Iterator[Doc]:
    """The documents of ``piece`` that go into the shards: usable, and not a later copy (``dup_dir``)."""
    skip = set(dedup.duplicates_of(piece.index, dup_dir).tolist()) if dup_dir is not None else set()
    for item in usable(piece, field, limit):
        if isinstance(item, Doc) and item.position not in skip:
            yield item


# --------------------------------------------------------------------------- scan


def init_scan(field: str, base: int, hashes_dir: Path | None) -> None:
    _state.update(field=field, base=base, hashes_dir=hashes_dir)


def scan_piece(task: tuple[Piece, int | None]) -> dict:
    """Counts, input that is not text, and hashes of one piece (to ``hashes_dir/PIECE.npy`` for dedup).

    ``val`` counts documents below the base split threshold; ``min_hi``/``max_hi`` bound the
    hashes (as strings: JSON numbers lose uint64 precision in other readers)."""
    piece, limit = task
    docs = empty = bad = nbytes = val = 0
    min_hi, max_hi = 2**64, -1
    examples: list[str] = []
    entries = array("Q")  # hi, lo, position of each document (24 bytes per document, for dedup)
    for item in usable(piece, _state["field"], limit):
        if item is None:
            empty += 1
        elif isinstance(item, Bad):
            bad += 1
            if item.path not in examples and len(examples) < SHOW_BAD:
                examples.append(item.path)
        else:
            hi, lo = dedup.doc_hash(item.text)
            docs += 1
            nbytes += len(item.text.encode("utf-8"))
            val += hi < _state["base"]
            min_hi, max_hi = min(min_hi, hi), max(max_hi, hi)
            if _state["hashes_dir"] is not None:
                entries.extend((hi, lo, item.position))
    if _state["hashes_dir"] is not None:
        _state["hashes_dir"].mkdir(parents=True, exist_ok=True)
        path = _state["hashes_dir"] / f"{piece.index:06d}.npy"
        dedup.write_hashes(path, np.frombuffer(entries, dtype=np.uint64).reshape(-1, 3))
    return {"scan": piece.index, "limit": limit, "docs": docs, "empty": empty, "bad": bad, "bad_examples": examples,
            "bytes": nbytes, "val": val, "min_hi": str(min_hi), "max_hi": str(max_hi)}  # fmt: skip


# --------------------------------------------------------------------------- tokenize


class TokenizeSpec(NamedTuple):
    """What every tokenize task needs besides its piece (passed once to each worker)."""

    tok_json: str
    eot: int
    dtype: str
    threshold: int
    """Documents whose hash ``hi`` is below it go to validation."""
    field: str
    out_dir: Path
    dup_dir: Path | None

    def path(self, piece: int, split: str) -> Path:
        return self.out_dir / f"{piece:06d}.{split}"


def init_tokenize(spec: TokenizeSpec) -> None:
    tok = Tokenizer.from_str(spec.tok_json)
    tok.encode_special_tokens = True  # not serialized: a literal "<|endoftext|>" in a document is plain text
    _state.update(spec=spec, tok=tok, exact_split=splits_exactly(tok))


def tokenize_piece(task: tuple[Piece, int | None]) -> dict:
    """Tokenize one piece into ``PIECE.train`` and ``PIECE.val`` (raw tokens, EOT after each
    document), fsynced; return its journal record ``{"piece", "train": [docs, tokens], "val": ...}``."""
    piece, limit = task
    spec: TokenizeSpec = _state["spec"]
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = {s: spec.path(piece.index, s).with_name(f"{spec.path(piece.index, s).name}.tmp") for s in SPLITS}
    writers = {s: _SplitWriter(tmp[s]) for s in SPLITS}
    try:
        for doc in kept(piece, spec.field, limit, spec.dup_dir):
            split = "val" if dedup.doc_hash(doc.text)[0] < spec.threshold else "train"
            parts = split_long(doc.text, LONG_DOC_CHARS) if _state["exact_split"] else [doc.text]
            writers[split].add(parts)
        for w in writers.values():
            w.finish()
    finally:
        for w in writers.values():
            w.file.close()
    record: dict = {"piece": piece.index}
    for s in SPLITS:
        os.replace(tmp[s], spec.path(piece.index, s))
        record[s] = [writers[s].docs, writers[s].tokens]
    return record


class _SplitWriter:
    """Batch one split's documents of a piece, encode each batch, append the tokens to a file."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.texts: list[str] = []
        self.ends: list[bool] = []  # EOT after this text?
        self.size = self.docs = self.tokens = 0

    def add(self, parts: list[str]) -> None:
        self.texts.extend(parts)
        self.ends.extend([False] * (len(parts) - 1) + [True])
        self.size += sum(map(len, parts))
        self.docs += 1
        if self.size >= BATCH_BYTES:
            self._flush()

    def finish(self) -> None:
        self._flush()
        self.file.flush()
        os.fsync(self.file.fileno())

    def _flush(self) -> None:
        if self.texts:
            tokens = encode(self.texts, self.ends)
            self.file.write(memoryview(tokens).cast("B"))  # (ndarray.tofile hides ENOSPC behind its own message)
            self.tokens += len(tokens)
        self.texts, self.ends, self.size = [], [], 0


def encode(texts: list[str], ends: list[bool]) -> np.ndarray:
    """Token ids of ``texts``, with EOT after each text that ends a document, as one flat array."""
    spec: TokenizeSpec = _state["spec"]
    tok: Tokenizer = _state["tok"]
    flat: list[int] = []
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (no offsets) needs tokenizers>=0.21
    for encoding, end in zip(encode_batch(texts, add_special_tokens=False), ends):
        flat.extend(encoding.ids)
        if end:
            flat.append(spec.eot)
    return np.array(flat, dtype=spec.dtype)
