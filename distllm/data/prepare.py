"""``distllm prepare``: corpus -> tokenizer.json + train/val token shards + manifest.json.

1. Load the documents (``corpus.load_corpus``) and split them by document: a fixed-seed random
   ``data.val_fraction`` of them (at least one) is held out for validation, at least one stays
   for training; both splits keep corpus order.
2. Train a byte-level BPE tokenizer on the training documents (at most the first
   ``TOKENIZER_TRAIN_CHARS`` characters), or use ``tokenizer.path``, whose vocabulary is then
   whatever it is. It is saved as ``<data.dir>/tokenizer.json``.
3. Tokenize each split, appending ``<|endoftext|>`` after every document, and write the tokens
   into shards of at most ``data.shard_tokens`` tokens (``train_000000.bin``, ``val_000000.bin``,
   ...). Only one shard of tokens is held in memory. By default (``data.num_proc`` None or 1)
   tokenization runs in this process and the Rust tokenizer spreads each batch of about
   ``TASK_BYTES`` of text over all cores with threads: on 2 cores this measured ~10-30% faster
   than worker processes. With ``data.num_proc`` = k > 1, k worker processes (one thread each)
   tokenize batches, written in order; that scales better on many-core machines, where the
   per-token Python work of a single process becomes the bottleneck.
4. Write ``manifest.json`` last (atomically): its presence marks a complete directory.

Re-running always rebuilds: the old manifest is removed first, then the old tokenizer and shards,
so an interrupted rebuild never looks complete. The output depends only on the corpus and the
config, not on ``num_proc``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from tokenizers import Tokenizer
from tqdm import tqdm

from distllm.config import Config
from distllm.data.corpus import load_corpus
from distllm.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TOKENIZER_FILE,
    dtype_for_vocab,
    write_manifest,
    write_shard,
)
from distllm.errors import DataError
from distllm.tokenizer import eot_id, fingerprint, load_tokenizer, save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

SPLIT_SEED = 0
"""Seed of the train/val document split (fixed: the split must not change with train.seed)."""
TOKENIZER_TRAIN_CHARS = 2_000_000_000
"""The tokenizer is trained on at most this many characters of training text."""
TASK_BYTES = 1 << 20
"""Text per tokenization task handed to a worker process."""


def prepare(cfg: Config) -> dict:
    """Build ``cfg.data.dir`` from ``cfg.data.source``; return the manifest."""
    start = time.perf_counter()
    data_dir = Path(cfg.data.dir)
    progress = cfg.logging.progress

    docs = load_corpus(cfg.data)
    is_val = split_documents(len(docs), cfg.data.val_fraction, cfg.data.source)
    if cfg.tokenizer.path is not None:
        tok = load_tokenizer(cfg.tokenizer.path)
        tok.no_truncation()
        tok.no_padding()
    else:
        tok = train_tokenizer(_training_text(docs, ~is_val), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency,
                              progress=progress and sys.stderr.isatty())  # its bars leave blank lines in logs
    eot, vocab_size, fp = eot_id(tok), tok.get_vocab_size(), fingerprint(tok)
    dtype = dtype_for_vocab(vocab_size)

    _clear(data_dir)
    save_tokenizer(tok, data_dir / TOKENIZER_FILE)
    num_proc = cfg.data.num_proc or 1
    doc_bytes = _document_bytes(docs)
    splits = {}
    for split in SPLITS:
        indices = np.flatnonzero(is_val if split == "val" else ~is_val)
        tasks = _tasks(indices, doc_bytes[indices])
        writer = _ShardWriter(data_dir, split, cfg.data.shard_tokens, dtype, fp)
        with tqdm(total=len(indices), unit="doc", desc=f"tokenize {split}", disable=not progress, leave=False) as bar:
            for tokens, num_docs in _tokenize(docs, tasks, tok, eot, dtype, num_proc):
                writer.add(tokens)
                bar.update(num_docs)
        splits[split] = {"num_tokens": writer.num_tokens, "num_documents": len(indices), "shards": writer.close()}

    manifest = {
        "format_version": FORMAT_VERSION,
        "source": cfg.data.source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": {"file": TOKENIZER_FILE, "fingerprint": fp, "vocab_size": vocab_size, "eot_id": eot},
        "dtype": dtype.name,
        "splits": splits,
    }
    write_manifest(data_dir, manifest)
    log.info(
        "prepared %s: %d documents (%d train / %d val), %s train + %s val tokens, vocab %d, %.1fs -> %s",
        cfg.data.source, len(docs), splits["train"]["num_documents"], splits["val"]["num_documents"],
        f"{splits['train']['num_tokens']:,}", f"{splits['val']['num_tokens']:,}", vocab_size,
        time.perf_counter() - start, data_dir,
    )  # fmt: skip
    return manifest


def split_documents(num_docs: int, val_fraction: float, source: str = "corpus") -> np.ndarray:
    """Boolean mask of validation documents: a fixed-seed random ``val_fraction`` (>= 1, leaving >= 1 for training)."""
    if num_docs < 2:
        raise DataError(
            f"corpus {source} has {num_docs} non-empty document; need at least 2 (one is held out for validation)"
        )
    num_val = min(max(1, round(num_docs * val_fraction)), num_docs - 1)
    is_val = np.zeros(num_docs, dtype=bool)
    is_val[np.random.default_rng(SPLIT_SEED).choice(num_docs, size=num_val, replace=False)] = True
    return is_val


def _training_text(docs: datasets.Dataset, mask: np.ndarray, batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches of the masked documents, up to TOKENIZER_TRAIN_CHARS characters."""
    chars = 0
    for start in range(0, len(docs), batch_size):
        keep = mask[start : start + batch_size]
        texts = [t for t, k in zip(docs[start : start + batch_size]["text"], keep) if k]
        yield texts
        chars += sum(map(len, texts))
        if chars >= TOKENIZER_TRAIN_CHARS:
            return


def _clear(data_dir: Path) -> None:
    """Remove the outputs of a previous prepare, manifest first."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MANIFEST).unlink(missing_ok=True)
    for pattern in (TOKENIZER_FILE, "train_*.bin", "val_*.bin", "*.tmp"):
        for path in data_dir.glob(pattern):
            path.unlink()


class _ShardWriter:
    """Fill a buffer of ``shard_tokens`` tokens; write ``{split}_{i:06d}.bin`` each time it is full."""

    def __init__(self, data_dir: Path, split: str, shard_tokens: int, dtype: np.dtype, fingerprint: str):
        self.data_dir, self.split, self.fingerprint = data_dir, split, fingerprint
        self.buffer = np.empty(shard_tokens, dtype=dtype)  # pages are only committed as they are filled
        self.filled = 0
        self.num_tokens = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            n = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + n] = tokens[:n]
            self.filled += n
            self.num_tokens += n
            tokens = tokens[n:]
            if self.filled == len(self.buffer):
                self._flush()

    def close(self) -> list[dict]:
        if self.filled:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        path = self.data_dir / f"{self.split}_{len(self.shards):06d}.bin"
        self.shards.append(write_shard(path, self.buffer[: self.filled], self.fingerprint))
        self.filled = 0


# --------------------------------------------------------------------------- tokenization

_worker: dict = {}
"""State of a tokenization process (the parent's, or a pool worker's after ``_init_worker``)."""


def _init_worker(docs: datasets.Dataset, tok: Tokenizer, eot: int, dtype: np.dtype) -> None:
    tok.encode_special_tokens = True  # not pickled: a literal "<|endoftext|>" in a document is plain text
    _worker.update(docs=docs, tok=tok, eot=eot, dtype=dtype)


def _encode(indices: np.ndarray) -> tuple[np.ndarray, int]:
    """Token ids of the documents ``indices``, each followed by EOT, as one flat array."""
    tok, eot = _worker["tok"], _worker["eot"]
    texts = _worker["docs"][indices.tolist()]["text"]
    flat: list[int] = []
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (no offsets) needs tokenizers>=0.21
    for encoding in encode_batch(texts, add_special_tokens=False):
        flat.extend(encoding.ids)
        flat.append(eot)
    return np.array(flat, dtype=_worker["dtype"]), len(texts)


def _tokenize(
    docs: datasets.Dataset, tasks: list[np.ndarray], tok: Tokenizer, eot: int, dtype: np.dtype, num_proc: int
) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (tokens, number of documents) for each task (a run of document indices), in order."""
    if num_proc <= 1 or len(tasks) <= 1:
        _init_worker(docs, tok, eot, dtype)
        try:
            yield from map(_encode, tasks)
        finally:
            _worker.clear()
        return
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    with _tokenizers_threads_off(), ctx.Pool(min(num_proc, len(tasks)), _init_worker, (docs, tok, eot, dtype)) as pool:
        yield from pool.imap(_encode, tasks)


def _document_bytes(docs: datasets.Dataset) -> np.ndarray:
    """UTF-8 size of every document, read from the Arrow column without decoding."""
    return np.concatenate(
        [pc.binary_length(b["text"]).to_numpy(zero_copy_only=False) for b in docs.with_format("arrow").iter(10_000)]
        or [np.zeros(0, dtype=np.int64)]
    )


def _tasks(indices: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Split ``indices`` (documents of ``sizes`` bytes) into consecutive runs of about TASK_BYTES of text each."""
    task_of = (np.cumsum(sizes) - sizes) // TASK_BYTES  # a document starts the task its first byte falls in
    return [t for t in np.split(indices, np.flatnonzero(np.diff(task_of)) + 1) if len(t)]


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
