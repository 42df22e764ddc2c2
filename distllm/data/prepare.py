"""``distllm prepare``: corpus -> tokenizer.json + train/val token shards + manifest.json, at any scale.

The corpus is cut into pieces (``corpus.plan_pieces``: about ``piece_bytes()`` of input each,
decided by the sorted file list alone) that worker processes read independently
(``workers``); the corpus order is (piece, position in piece). Nothing holds the corpus in
memory: a worker holds a batch of text, the main process one shard per split and a few hundred
bytes of bookkeeping per file and per piece.

1. Scan (all processes): read every piece, skip input that is not text (reported: count and
   the first file names), drop empty documents, hash the rest (``dedup.doc_hash``). The hash
   decides the split (``dedup.split_threshold``: validation iff ``hi < val_fraction * 2**64``,
   moved so that neither split is empty) and, with ``data.dedup``, finds exact duplicates
   (``dedup.find_duplicates``, on disk; the first copy in corpus order is kept).
2. Tokenizer: ``tokenizer.path``, or a byte-level BPE trained on at most
   ``data.tokenizer_sample_bytes`` of training text (all of it if the corpus is smaller, else
   the first ``sample / pieces`` characters of every piece, so the sample spans the corpus).
3. Tokenize (all processes): each piece's documents, ``<|endoftext|>`` after each, into one
   token file per split in the work directory (fsynced, then journaled). The main process
   concatenates the pieces in order into shards of exactly ``data.shard_tokens`` tokens (the
   last one shorter): a shard's bytes depend only on the corpus and the settings, not on the
   number of processes or on interruptions.
4. ``manifest.json`` last, after every shard and the tokenizer are durable (fsync) or uploaded;
   then the work directory is removed.

Interrupted (Ctrl-C, kill, full disk, lost connection)? Run the same command again: the journal
(``journal.Journal``) lets it redo only what is missing. The work directory is
``data.dir/.prepare`` for a local ``data.dir``, ``CACHE/prepare-<slug>-<hash of the URL>`` for a
remote one (``data.cache_dir``, default ``~/.cache/distllm/data``); it is discarded when the
settings or the corpus files (paths, sizes, modification times) change.

An existing ``data.dir``:

* holding a complete dataset (``manifest.json``) made from the same settings and files: nothing
  to do; made from anything else: refused unless ``data.overwrite``;
* a ``tokenizer.json`` that differs from the one this prepare makes is never replaced unless
  ``data.overwrite`` is set, and never when a complete checkpoint in ``run.dir`` was trained
  with it (checkpoints record their tokenizer's fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from distllm.config import Config
from distllm.data import dedup, workers
from distllm.data.corpus import Piece, Source, hub_name, is_hub, local_source, plan_pieces, spool_hub
from distllm.data.journal import INTERRUPT_ENV, Interrupts, Journal
from distllm.data.output import Output, open_output
from distllm.data.shards import FORMAT_VERSION, HEADER_SIZE, MANIFEST, SPLITS, TOKENIZER_FILE, dtype_for_vocab
from distllm.data.storage import default_cache_root, is_url
from distllm.data.workers import init_scan, init_tokenize, run_tasks, scan_piece, tokenize_piece
from distllm.errors import DataError
from distllm.progress import Progress
from distllm.tokenizer import (
    eot_id,
    fingerprint,
    load_tokenizer,
    parse_tokenizer,
    save_tokenizer,
    split_long,
    train_tokenizer,
)

__all__ = ["INTERRUPT_ENV", "prepare", "piece_bytes"]

log = logging.getLogger(__name__)

PREPARE_VERSION = 1
"""Changes whenever the same corpus and settings would give different shards."""
MIN_PIECE_BYTES = 1 << 20
MAX_PIECE_BYTES = 64 << 20
TARGET_PIECES = 1024
"""A piece is ``input bytes / TARGET_PIECES``, within [MIN_PIECE_BYTES, MAX_PIECE_BYTES]."""
SPOOL_FILE_BYTES = 64 << 20
"""A Hugging Face stream is spooled into local JSON-lines files of this size."""
WORK_DIR = ".prepare"
SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin(\.tmp)?$")


def prepare(cfg: Config) -> dict:
    """Build ``cfg.data.dir`` from ``cfg.data.source`` (or finish an interrupted build); return the manifest."""
    start = time.perf_counter()
    d = cfg.data
    source = None if is_hub(d.source) else local_source(d)  # checks the corpus before anything is written
    key = _key(cfg, source)
    work = _work_dir(d)
    out = open_output(d.dir, work / "staging", d.storage_options)
    existing = _read_manifest(out)
    if existing is not None and not d.overwrite:
        if existing.get("prepare", {}).get("key") != key:
            made = "by an older distllm" if "prepare" not in existing else "from other settings or corpus files"
            raise DataError(
                f"data.dir {out} already holds a prepared dataset ({MANIFEST}, from {existing.get('source')}) made "
                f"{made}; set data.overwrite=true to replace it, or choose another data.dir"
            )
        log.info("%s is already prepared from this corpus with these settings; nothing to do", out)
        shutil.rmtree(work, ignore_errors=True)  # left behind if a build stopped after its manifest
        return existing
    journal = Journal(work, key)
    try:
        return _build(cfg, source, key, out, journal, Interrupts.from_env(), start)
    except KeyboardInterrupt:
        log.warning("prepare interrupted; finished work is kept in %s: run the same command again to finish", work)
        raise
    finally:
        journal.close()


@dataclass
class _Corpus:
    """The scanned corpus: its pieces in use, their scan records, totals, the split threshold."""

    origin: str
    field: str
    pieces: list[Piece]
    scans: list[dict]
    totals: dict
    threshold: int
    dup_dir: Path | None
    """Where the duplicates are listed (``data.dedup``), else None."""


def _build(cfg, source: Source | None, key: str, out: Output, journal: Journal, interrupts: Interrupts,
           start: float) -> dict:  # fmt: skip
    d = cfg.data
    num_proc = d.num_proc or _cpu_count()
    times = [time.perf_counter()]
    corpus = _scan_corpus(cfg, source, journal, num_proc, interrupts)
    times.append(time.perf_counter())
    tok = _tokenizer(cfg, corpus, journal)
    eot, vocab_size, fp = eot_id(tok), tok.get_vocab_size(), fingerprint(tok)
    dtype = dtype_for_vocab(vocab_size)
    _check_tokenizer_replacement(out, fp, cfg)
    times.append(time.perf_counter())

    # from here on data.dir changes: it stops looking complete first
    out.prepare()
    out.delete(MANIFEST)
    if _read_fingerprint(out) != fp:
        out.put_text(TOKENIZER_FILE, tok.to_str())
    spec = workers.TokenizeSpec(tok.to_str(), eot, dtype.str, corpus.threshold, corpus.field,
                                journal.dir / "tokens", corpus.dup_dir)  # fmt: skip
    writers = {s: _ShardWriter(out, s, d.shard_tokens, dtype, fp, journal, interrupts) for s in SPLITS}
    _tokenize(corpus, spec, writers, num_proc, journal, interrupts, cfg.logging.progress)
    shards = {s: writers[s].close() for s in SPLITS}
    times.append(time.perf_counter())

    names = {entry["file"] for s in SPLITS for entry in shards[s]}
    for name in out.names():
        if SHARD_NAME.match(name) and name not in names:
            out.delete(name)  # shards of an older, larger build
    manifest = _manifest(cfg, key, corpus, journal, shards, vocab_size, eot, fp, dtype)
    out.put_text(MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last
    journal.remove()

    seconds = time.perf_counter() - start
    train, val = (manifest["splits"][s] for s in SPLITS)
    phases = ", ".join(f"{n} {b - a:.1f}s" for n, a, b in zip(("scan", "tokenizer", "tokenize"), times, times[1:]))
    log.info(
        "prepared %s: %d documents (%d train / %d val%s), %s train + %s val tokens, vocab %d -> %s; "
        "%.1f MB of text in %.1fs (%.1f MB/s: %s; %d process%s)",
        corpus.origin, train["num_documents"] + val["num_documents"], train["num_documents"], val["num_documents"],
        f", {manifest['prepare']['duplicates_dropped']} duplicates dropped" if d.dedup else "",
        f"{train['num_tokens']:,}", f"{val['num_tokens']:,}", vocab_size, out, corpus.totals["bytes"] / 1e6, seconds,
        corpus.totals["bytes"] / 1e6 / seconds, phases, num_proc, "es" if num_proc > 1 else "",
    )  # fmt: skip
    return manifest


def _manifest(cfg, key, corpus: _Corpus, journal: Journal, shards, vocab_size, eot, fp, dtype) -> dict:
    splits = {}
    for s in SPLITS:
        docs, tokens = journal.piece_totals(s, len(corpus.pieces))
        splits[s] = {"num_tokens": tokens, "num_documents": docs, "shards": shards[s]}
    t = corpus.totals
    return {
        "format_version": FORMAT_VERSION,
        "source": cfg.data.source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": {"file": TOKENIZER_FILE, "fingerprint": fp, "vocab_size": vocab_size, "eot_id": eot},
        "dtype": dtype.name,
        "splits": splits,
        "prepare": {
            "key": key,
            "version": PREPARE_VERSION,
            "text_bytes": t["bytes"],
            "documents": t["docs"],
            "empty_documents": t["empty"],
            "not_text": {"count": t["bad"], "examples": t["bad_examples"]},
            "duplicates_dropped": journal.done.get("dedup", 0),
            "split": {"rule": "val iff the first 8 bytes (little-endian) of the document's blake2b-128 < threshold",
                      "threshold": str(corpus.threshold)},
        },  # fmt: skip
    }


def piece_bytes(total_bytes: int) -> int:
    """Input per piece: enough pieces to keep many processes busy, few enough to stay cheap."""
    return int(min(max(total_bytes // TARGET_PIECES, MIN_PIECE_BYTES), MAX_PIECE_BYTES))


def _key(cfg, source: Source | None) -> str:
    """sha256 of everything that determines the output (not the number of processes)."""
    d, t = cfg.data, cfg.tokenizer
    settings: dict = {
        "version": PREPARE_VERSION,
        "source": d.source,
        "files": source.describe() if source is not None else None,
        "text_field": d.text_field,
        "val_fraction": d.val_fraction,
        "max_documents": d.max_documents,
        "dedup": d.dedup,
        "shard_tokens": d.shard_tokens,
        "pieces": [MIN_PIECE_BYTES, MAX_PIECE_BYTES, TARGET_PIECES],
    }
    if source is None:
        settings["hub"] = {"config": d.hf_config, "split": d.hf_split, "spool_bytes": SPOOL_FILE_BYTES}
    if t.path is not None:
        settings["tokenizer"] = {"fingerprint": fingerprint(load_tokenizer(t.path))}
    else:
        settings["tokenizer"] = {"vocab_size": t.vocab_size, "min_frequency": t.min_frequency,
                                 "sample_bytes": d.tokenizer_sample_bytes}  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _work_dir(d) -> Path:
    if is_url(d.dir):
        url = str(d.dir).rstrip("/")
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1])[-60:].strip("_")
        root = Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_root()
        return root / f"prepare-{slug}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    text = str(d.dir)
    return Path(text[len("file://") :] if text.startswith("file://") else text).expanduser() / WORK_DIR


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- existing data directories


def _read_manifest(out: Output) -> dict | None:
    data = out.read_bytes(MANIFEST)
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    return manifest if isinstance(manifest, dict) else {"source": "an unreadable manifest"}


def _read_fingerprint(out: Output) -> str | None:
    data = out.read_bytes(TOKENIZER_FILE)
    if data is None:
        return None
    try:
        return fingerprint(parse_tokenizer(data, f"{out}/{TOKENIZER_FILE}"))
    except DataError:
        return "unreadable"


def _check_tokenizer_replacement(out: Output, fp: str, cfg) -> None:
    """Refuse to replace a different tokenizer.json: always if complete checkpoints in ``run.dir``
    were trained with it, otherwise unless ``data.overwrite``."""
    old = _read_fingerprint(out)
    if old is None or old == fp:
        return
    where = f"{out}/{TOKENIZER_FILE}"
    users = _checkpoints_trained_with(old, cfg.run.dir)
    if users:
        raise DataError(
            f"{where} is the tokenizer of the checkpoints in {cfg.run.dir} (e.g. {users[-1].name}); this prepare makes "
            f"another one (fingerprint {fp[:12]} != {old[:12]}). Use another data.dir for the new data, or "
            f"tokenizer.path={where} to keep this tokenizer"
        )
    if not cfg.data.overwrite:
        raise DataError(
            f"{where} exists and differs from the tokenizer this prepare makes (fingerprint {old[:12]} != {fp[:12]}); "
            f"checkpoints trained on {out} need it. Set data.overwrite=true to replace it, "
            f"tokenizer.path={where} to reuse it, or choose another data.dir"
        )


def _checkpoints_trained_with(fp: str, run_dir: str) -> list[Path]:
    if not Path(run_dir).is_dir():
        return []
    from distllm import checkpoint  # imports torch: only when a tokenizer would be replaced

    found = []
    for path in checkpoint.complete_checkpoints(run_dir):
        try:
            if checkpoint.read_state(path).get("tokenizer_fingerprint") == fp:
                found.append(path)
        except Exception:  # noqa: BLE001  an unreadable checkpoint says nothing about the tokenizer
            continue
    return found


# --------------------------------------------------------------------------- 1. scan


def _scan_corpus(cfg, source: Source | None, journal: Journal, num_proc: int, interrupts: Interrupts) -> _Corpus:
    """Scan the pieces in use (all, or the prefix holding the first ``data.max_documents``), check
    that usable text is left, decide the split and find duplicates."""
    d = cfg.data
    if source is None:
        origin, field = f"Hugging Face dataset '{hub_name(d.source)}'", "text"
        files = spool_hub(d, journal.dir / "spool", SPOOL_FILE_BYTES, lambda: interrupts.point("spool"))
    else:
        origin, field, files = source.origin, source.text_field, list(source.files)
    pieces = plan_pieces(files, piece_bytes(sum(f.size for f in files)))
    hashes_dir = journal.dir / "hashes" if d.dedup else None
    initargs = (field, dedup.base_threshold(d.val_fraction), hashes_dir)

    todo = [(p, None) for p in pieces if p.index not in journal.scans] if _cut(pieces, journal, d) is None else []
    with Progress(sum(p.nbytes for p, _ in todo), "scan", "B", unit_scale=True, enabled=cfg.logging.progress,
                  leave=False) as bar, \
            run_tasks(scan_piece, todo, num_proc, init_scan, initargs) as results:  # fmt: skip
        for record in results:
            journal.add(record)
            bar.update(pieces[record["scan"]].nbytes)
            interrupts.point("scan")
            if _cut(pieces, journal, d) is not None:
                break
    scans = _scans_in_use(pieces, journal, d, initargs)
    pieces = pieces[: len(scans)]

    totals = _totals(scans)
    if totals["docs"] == 0:
        journal.remove()
        if totals["bad"]:
            raise DataError(
                f"corpus {origin} has no usable text: {totals['bad']} files or records are not UTF-8 text "
                f"(binary, or another encoding), e.g. {', '.join(totals['bad_examples'])} (data.source)"
            )
        raise DataError(f"corpus {origin} is empty: it has no document with non-whitespace text (data.source)")
    if totals["bad"]:
        log.warning(
            "skipped %d files or records of %s that are not UTF-8 text (binary, or another encoding): %s%s",
            totals["bad"], origin, ", ".join(totals["bad_examples"]),
            ", ..." if totals["bad"] > len(totals["bad_examples"]) else "",
        )  # fmt: skip
    threshold = dedup.split_threshold(
        d.val_fraction, totals["val"], totals["docs"], totals["min_hi"], totals["max_hi"], origin
    )
    dup_dir = journal.dir / "dups" if d.dedup else None
    if d.dedup and "dedup" not in journal.done:
        hash_files = [hashes_dir / f"{p.index:06d}.npy" for p in pieces]
        journal.add({"dedup": dedup.find_duplicates(hash_files, dup_dir, totals["docs"])})
    return _Corpus(origin, field, pieces, scans, totals, threshold, dup_dir)


def _cut(pieces: list[Piece], journal: Journal, d) -> tuple[int, int] | None:
    """``(piece, limit)`` once the scanned prefix holds ``data.max_documents``: they end within
    ``piece``'s first ``limit`` documents. None without a limit or before that."""
    if d.max_documents is None:
        return None
    seen = 0
    for p in pieces:
        if p.index not in journal.scans:
            return None
        if seen + journal.scans[p.index]["docs"] >= d.max_documents:
            return p.index, d.max_documents - seen
        seen += journal.scans[p.index]["docs"]
    return None


def _scans_in_use(pieces: list[Piece], journal: Journal, d, initargs: tuple) -> list[dict]:
    """Scan records of the pieces in use; the piece where ``data.max_documents`` ends is scanned
    again up to its limit (so its counts and hashes cover only the documents in use)."""
    cut = _cut(pieces, journal, d)
    if cut is None:
        return [journal.scans[p.index] for p in pieces]
    last, limit = cut
    records = [journal.scans[i] for i in range(last)]
    if journal.scans[last]["docs"] == limit:
        return records + [journal.scans[last]]
    if journal.done.get("cut") != [last, limit]:
        with run_tasks(scan_piece, [(pieces[last], limit)], 1, init_scan, initargs) as results:
            journal.add({"cut": [last, limit], "cut_scan": next(iter(results))})
    return records + [journal.done["cut_scan"]]


def _totals(scans: list[dict]) -> dict:
    examples: list[str] = []
    for s in scans:
        examples.extend(e for e in s["bad_examples"] if e not in examples)
    return {
        "docs": sum(s["docs"] for s in scans),
        "empty": sum(s["empty"] for s in scans),
        "bad": sum(s["bad"] for s in scans),
        "bad_examples": examples[: workers.SHOW_BAD],
        "bytes": sum(s["bytes"] for s in scans),
        "val": sum(s["val"] for s in scans),
        "min_hi": min((int(s["min_hi"]) for s in scans), default=2**64),
        "max_hi": max((int(s["max_hi"]) for s in scans), default=-1),
    }


# --------------------------------------------------------------------------- 2. tokenizer


def _tokenizer(cfg, corpus: _Corpus, journal: Journal) -> Tokenizer:
    """``tokenizer.path``, the one this build trained already, or a new one trained on a sample."""
    if cfg.tokenizer.path is not None:
        tok = load_tokenizer(cfg.tokenizer.path)
        tok.no_truncation()
        tok.no_padding()
        return tok
    path = journal.dir / TOKENIZER_FILE
    if "tokenizer" in journal.done and path.is_file():
        tok = load_tokenizer(path)
        if fingerprint(tok) == journal.done["tokenizer"]:
            return tok
    sample = cfg.data.tokenizer_sample_bytes
    quota = None if corpus.totals["bytes"] <= sample else max(1, sample // len(corpus.pieces))
    progress = cfg.logging.progress and sys.stderr.isatty()  # its bars leave blank lines in logs
    tok = train_tokenizer(_training_text(corpus, quota), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency,
                          progress=progress)  # fmt: skip
    save_tokenizer(tok, path)
    journal.add({"tokenizer": fingerprint(tok)})
    return tok


def _training_text(corpus: _Corpus, quota: int | None) -> Iterator[list[str]]:
    """Batches of training documents in corpus order: all of them, or the first ``quota``
    characters of each piece's."""
    for piece, scan in zip(corpus.pieces, corpus.scans):
        batch: list[str] = []
        taken = size = 0
        for doc in workers.kept(piece, corpus.field, scan["limit"], corpus.dup_dir):
            if dedup.doc_hash(doc.text)[0] < corpus.threshold:
                continue  # validation
            text = doc.text if quota is None else doc.text[: quota - taken]
            batch.extend(split_long(text, workers.LONG_DOC_CHARS))  # any cut is fine for counting pairs
            taken += len(text)
            size += len(text)
            if quota is not None and taken >= quota:
                break
            if size >= workers.BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch


# --------------------------------------------------------------------------- 3. tokenize and write shards


def _tokenize(corpus: _Corpus, spec: workers.TokenizeSpec, writers: dict[str, "_ShardWriter"], num_proc: int,
              journal: Journal, interrupts: Interrupts, progress: bool) -> None:  # fmt: skip
    """Tokenize the pieces not done yet, and feed every piece, in order, to the shard writers."""
    pieces = corpus.pieces
    for s, writer in writers.items():
        writer.resume([journal.pieces[p.index][s][1] if p.index in journal.pieces else None for p in pieces])
    first = min(w.next_piece for w in writers.values())

    def ready(p: int) -> bool:  # tokenized, with the files the writers still need
        return p in journal.pieces and all(
            w.next_piece > p or journal.pieces[p][s][1] == 0 or spec.path(p, s).is_file() for s, w in writers.items()
        )

    todo = [(pieces[p], corpus.scans[p]["limit"]) for p in range(first, len(pieces)) if not ready(p)]
    next_piece = first

    def feed() -> None:
        nonlocal next_piece
        while next_piece < len(pieces) and ready(next_piece):
            for s, writer in writers.items():
                writer.feed(next_piece, spec.path(next_piece, s), journal.pieces[next_piece][s][1])
            next_piece += 1

    feed()
    with Progress(sum(p.nbytes for p, _ in todo), "tokenize", "B", unit_scale=True, enabled=progress,
                  leave=False) as bar, \
            run_tasks(tokenize_piece, todo, num_proc, init_tokenize, (spec,)) as results:  # fmt: skip
        for record in results:
            journal.add(record)
            bar.update(pieces[record["piece"]].nbytes)
            interrupts.point("piece")
            feed()
    if next_piece != len(pieces):
        raise RuntimeError(f"pieces {next_piece}..{len(pieces) - 1} were not tokenized")  # a bug, not a user error


class _ShardWriter:
    """Concatenate one split's piece token files, in order, into shards of ``shard_tokens`` tokens.

    A shard is written (``Output.write_shard``: fsynced, or uploaded), then journaled, then the
    piece files it used up are deleted. ``resume`` keeps the journaled shards that are still
    there (with the right size) and positions the writer after them.
    """

    def __init__(self, out: Output, split: str, shard_tokens: int, dtype: np.dtype, fp: str, journal: Journal,
                 interrupts: Interrupts):  # fmt: skip
        self.out, self.split, self.fp, self.journal, self.interrupts = out, split, fp, journal, interrupts
        self.dtype = np.dtype(dtype)
        self.buffer = np.empty(shard_tokens, dtype=dtype)  # pages are only committed as they are filled
        self.filled = 0
        self.shards: list[dict] = []
        self.held: list[Path] = []  # piece files whose tokens are in the buffer
        self.skip = 0  # tokens at the start of the next piece that are in written shards already
        self.next_piece = 0

    def resume(self, piece_tokens: list[int | None]) -> None:
        """``piece_tokens``: this split's tokens in each piece (None: not tokenized yet)."""
        recorded = self.journal.shards[self.split]
        while len(self.shards) in recorded:
            entry = recorded[len(self.shards)]
            if self.out.size(entry["file"]) != HEADER_SIZE + entry["num_tokens"] * self.dtype.itemsize:
                break
            self.shards.append(entry)
        done = sum(e["num_tokens"] for e in self.shards)
        for tokens in piece_tokens:
            if tokens is None or done < tokens:
                break
            done -= tokens
            self.next_piece += 1
        self.skip = done

    def feed(self, piece: int, path: Path, num_tokens: int) -> None:
        if piece < self.next_piece:
            return
        self.next_piece = piece + 1
        skip, self.skip = self.skip, 0
        if num_tokens == skip:  # nothing new here (an empty piece)
            path.unlink(missing_ok=True)
            return
        tokens = np.fromfile(path, dtype=self.dtype)[skip:]
        self.held.append(path)
        while len(tokens):
            n = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + n] = tokens[:n]
            self.filled += n
            tokens = tokens[n:]
            if self.filled == len(self.buffer):
                self._flush(keep_last=len(tokens) > 0)

    def close(self) -> list[dict]:
        if self.filled:
            self._flush(keep_last=False)
        for path in self.held:
            path.unlink(missing_ok=True)
        return self.shards

    def _flush(self, keep_last: bool) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        entry = self.out.write_shard(name, self.buffer[: self.filled], self.fp)
        self.journal.add({"shard": entry, "split": self.split, "index": len(self.shards)})
        self.shards.append(entry)
        self.filled = 0
        used, self.held = (self.held[:-1], self.held[-1:]) if keep_last else (self.held, [])
        for path in used:
            path.unlink(missing_ok=True)
        self.interrupts.point("shard")
