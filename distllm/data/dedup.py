"""Document hashes: the train/val split, and exact deduplication with bounded memory.

Every document is identified by the 128-bit BLAKE2b hash of its UTF-8 bytes, split in two
little-endian uint64 words ``(hi, lo)``.

Split: a document goes to validation iff ``hi < threshold``, with ``threshold`` =
``val_fraction * 2**64`` (``split_threshold`` moves it just enough to keep at least one
document on each side). The split depends on the text alone: not on the corpus order, the
number of processes, or other documents, so copies of a document always land in the same split
and adding documents to a corpus never moves an old one across.

Dedup (``data.dedup``): the first copy in corpus order is kept. Each scanned piece writes its
documents' ``(hi, lo, position)`` sorted by hash to ``hashes/PIECE.npy``; ``find_duplicates``
then walks the hash space in ranges that each hold at most ``DEDUP_MEMORY_BYTES`` worth of
entries, reading every piece's slice of the range (a binary search in its sorted file), so
memory does not grow with the corpus (disk does: 24 bytes per document). Duplicates go to one
sorted file of ``(piece, position)`` per range; ``duplicates_of(piece)`` collects a piece's.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from distllm.durable import atomic_file
from distllm.errors import DataError

DEDUP_MEMORY_BYTES = 256 << 20
"""Entries of one hash range held in memory at once during deduplication (about 40 bytes each)."""
_ENTRY_BYTES = 40


def doc_hash(text: str) -> tuple[int, int]:
    """``(hi, lo)``: the 128-bit BLAKE2b of ``text``'s UTF-8 bytes as two uint64."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def base_threshold(val_fraction: float) -> int:
    return min(int(val_fraction * 2**64), 2**64 - 1)


def split_threshold(val_fraction: float, num_val: int, num_docs: int, min_hi: int, max_hi: int, origin: str) -> int:
    """The ``hi`` below which a document is validation: ``val_fraction * 2**64``, unless that leaves
    a split empty (then the document with the smallest / largest ``hi`` changes sides)."""
    if num_docs < 2:
        raise DataError(
            f"corpus {origin} has {num_docs} non-empty document; need at least 2 (one is held out for validation)"
        )
    if min_hi == max_hi:
        raise DataError(
            f"corpus {origin} has {num_docs} documents but only one distinct text; need at least 2 "
            "(one is held out for validation)"
        )
    if num_val == 0:
        return min_hi + 1
    if num_val == num_docs:
        return max_hi
    return base_threshold(val_fraction)


# --------------------------------------------------------------------------- hash files


def write_hashes(path: Path, entries: np.ndarray) -> None:
    """``entries``: (n, 3) uint64 ``(hi, lo, position)``; written sorted by (hi, lo, position), fsynced."""
    save_array(path, entries[np.lexsort((entries[:, 2], entries[:, 1], entries[:, 0]))])


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` as uint64, atomically (temp file, fsync, rename)."""
    with atomic_file(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array, dtype=np.uint64))


def find_duplicates(hash_files: list[Path], out_dir: Path, num_docs: int) -> int:
    """Write ``out_dir/dups_RRRR.npy`` (sorted (piece, position) pairs of every copy after the first;
    piece = index in ``hash_files``) and return the number of duplicates."""
    out_dir.mkdir(parents=True, exist_ok=True)
    num_ranges = max(1, math.ceil(num_docs * _ENTRY_BYTES / DEDUP_MEMORY_BYTES))
    bounds = [(2**64 * r) // num_ranges for r in range(num_ranges)] + [2**64]
    total = 0
    for r in range(num_ranges):
        lo_bound, hi_bound = np.uint64(bounds[r]), bounds[r + 1]
        parts = []
        for piece, path in enumerate(hash_files):
            entries = np.load(path, mmap_mode="r")  # (n, 3), sorted by hi
            if not len(entries):
                continue
            a = int(np.searchsorted(entries[:, 0], lo_bound, side="left"))
            b = len(entries) if hi_bound == 2**64 else int(np.searchsorted(entries[:, 0], np.uint64(hi_bound), "left"))
            if b > a:
                part = np.empty((b - a, 4), dtype=np.uint64)
                part[:, :3] = entries[a:b]
                part[:, 3] = piece
                parts.append(part)
        dups = np.zeros((0, 2), dtype=np.uint64)
        if parts:
            rows = np.concatenate(parts)  # (m, 4): hi, lo, position, piece
            rows = rows[np.lexsort((rows[:, 2], rows[:, 3], rows[:, 1], rows[:, 0]))]  # by hash, then corpus order
            again = np.zeros(len(rows), dtype=bool)
            again[1:] = (rows[1:, 0] == rows[:-1, 0]) & (rows[1:, 1] == rows[:-1, 1])
            dups = rows[again][:, [3, 2]]  # (piece, position)
            dups = dups[np.lexsort((dups[:, 1], dups[:, 0]))]
        total += len(dups)
        save_array(out_dir / f"dups_{r:04d}.npy", dups)
    return total


def duplicates_of(piece: int, dup_dir: Path) -> np.ndarray:
    """Sorted positions of the duplicate documents of ``piece`` (from ``find_duplicates``)."""
    found = []
    for path in sorted(dup_dir.glob("dups_*.npy")):
        dups = np.load(path, mmap_mode="r")
        if not len(dups):
            continue
        a, b = np.searchsorted(dups[:, 0], [np.uint64(piece), np.uint64(piece + 1)])
        if b > a:
            found.append(np.asarray(dups[a:b, 1]))
    return np.sort(np.concatenate(found)).astype(np.int64) if found else np.zeros(0, dtype=np.int64)
