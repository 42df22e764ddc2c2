"""Offline distillation data: the teacher's top-k log-probabilities per position, keyed by sample index.

A top-k directory (e.g. ``DATA_DIR/teacher-topk``, next to the token shards) holds safetensors
shards and, written last, ``topk.json``::

    {"format": "distllm-teacher-topk", "format_version": 1,
     "k": 64, "temperature": 2.0, "seq_len": 256, "num_samples": N,
     "data_id": ...,               # the samples' identity: TokenShards.data_id or SFTDataset.data_id
     "tokenizer_fingerprint": ..., "vocab_size": ...,
     "ids_dtype": "uint16", "logprobs_dtype": "float32", "teacher": {...},
     "shards": [{"file": "topk-00000.safetensors", "first_sample": 0, "num_samples": n, "sha256": ...}, ...]}

Sample i of the data (``SampleIndex`` window i, or ``SFTDataset`` row i) has, for each of its T input
positions, the teacher's k most likely next tokens ``ids`` (n, T, k) (uint16 when the vocabulary
fits, else int32), their log-probabilities ``logprobs`` (n, T, k) at the distillation temperature, and
``tail`` (n, T), the log of the rest of the mass (``distill.teacher_topk``). Shards cover consecutive
sample ranges that together are exactly [0, N). Each shard is checked before its first use: sha256
against the manifest, tensor names, dtypes and shapes, ids below the vocabulary; a failure is a
DataError naming the file. ``safe_open(...).get_slice`` reads only the requested samples.

The writer runs once per (data, teacher, k, temperature); shards can be written by several
processes (``write_topk_shard`` for disjoint ranges) and the manifest by one (``write_topk_manifest``).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from distllm.durable import fsync_dir, sha256_file, write_durably
from distllm.errors import DataError

MANIFEST = "topk.json"
FORMAT = "distllm-teacher-topk"
FORMAT_VERSION = 1
LOGPROB_DTYPES = ("float32", "float16")
_TENSORS = ("ids", "logprobs", "tail")


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("uint16") if vocab_size <= 2**16 else np.dtype("int32")


@dataclass(frozen=True)
class TopKMeta:
    """What a top-k directory is for (the manifest without its shard list)."""

    k: int
    temperature: float
    seq_len: int
    num_samples: int
    data_id: str
    tokenizer_fingerprint: str
    vocab_size: int
    logprobs_dtype: str = "float32"
    teacher: dict | None = None
    """Free-form description of the teacher (path, step, ...), recorded for people."""

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "k": self.k, "temperature": self.temperature,
                "seq_len": self.seq_len, "num_samples": self.num_samples, "data_id": self.data_id,
                "tokenizer_fingerprint": self.tokenizer_fingerprint, "vocab_size": self.vocab_size,
                "ids_dtype": ids_dtype(self.vocab_size).name, "logprobs_dtype": self.logprobs_dtype,
                "teacher": self.teacher or {}}


# --------------------------------------------------------------------------- writing


def shard_name(index: int) -> str:
    return f"topk-{index:05d}.safetensors"


def write_topk_shard(path: str | os.PathLike, meta: TopKMeta, first_sample: int, ids: np.ndarray,
                     logprobs: np.ndarray, tail: np.ndarray) -> dict:
    """Write samples [first_sample, first_sample + n) atomically and durably; return the manifest entry.

    ids, logprobs (n, seq_len, k); tail (n, seq_len)."""
    path = Path(path)
    n = len(ids)
    shape = (n, meta.seq_len, meta.k)
    ids, logprobs, tail = np.asarray(ids), np.asarray(logprobs), np.asarray(tail)
    if ids.shape != shape or logprobs.shape != shape or tail.shape != shape[:2]:
        raise ValueError(f"top-k shard {path}: expected ids/logprobs {shape} and tail {shape[:2]}, got "
                         f"{ids.shape}, {logprobs.shape}, {tail.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= meta.vocab_size):
        raise ValueError(f"top-k shard {path}: ids outside [0, {meta.vocab_size})")
    if meta.logprobs_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprobs dtype must be one of {LOGPROB_DTYPES}, got {meta.logprobs_dtype!r}")
    tensors = {
        "ids": np.ascontiguousarray(ids, dtype=ids_dtype(meta.vocab_size)),
        "logprobs": np.ascontiguousarray(logprobs, dtype=meta.logprobs_dtype),
        "tail": np.ascontiguousarray(tail, dtype=meta.logprobs_dtype),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "first_sample": str(first_sample)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return {"file": path.name, "first_sample": int(first_sample), "num_samples": n, "sha256": sha256_file(path)}


def write_topk_manifest(out_dir: str | os.PathLike, meta: TopKMeta, entries: list[dict]) -> Path:
    """Write ``topk.json`` (last: it marks the directory complete) after checking that the shards
    cover [0, num_samples) exactly."""
    entries = sorted(entries, key=lambda e: e["first_sample"])
    at = 0
    for e in entries:
        if e["first_sample"] != at:
            raise ValueError(f"top-k shards leave a gap or overlap at sample {at} ({e['file']} starts at "
                             f"{e['first_sample']})")
        at += e["num_samples"]
    if at != meta.num_samples:
        raise ValueError(f"top-k shards cover {at} samples, the data has {meta.num_samples}")
    path = Path(out_dir) / MANIFEST
    write_durably(path, json.dumps({**meta.to_json(), "shards": entries}, indent=2) + "\n")
    return path


class TopKWriter:
    """Write a top-k directory from one process, samples in order: ``write`` any number of samples at a
    time, ``close`` to flush the last shard and write the manifest."""

    def __init__(self, out_dir: str | os.PathLike, meta: TopKMeta, samples_per_shard: int = 1024):
        self.out_dir, self.meta, self.per_shard = Path(out_dir), meta, samples_per_shard
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / MANIFEST).unlink(missing_ok=True)  # incomplete until close()
        self.entries: list[dict] = []
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self.written = 0

    def write(self, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray) -> None:
        """The next samples: ids, logprobs (n, seq_len, k), tail (n, seq_len)."""
        self._buf.append((np.asarray(ids), np.asarray(logprobs), np.asarray(tail)))
        self._buffered += len(ids)
        while self._buffered >= self.per_shard:
            self._flush(self.per_shard)

    def _flush(self, n: int) -> None:
        ids, lp, tail = (np.concatenate([b[j] for b in self._buf]) for j in range(3))
        first = self.written
        self.entries.append(write_topk_shard(self.out_dir / shard_name(len(self.entries)), self.meta, first,
                                             ids[:n], lp[:n], tail[:n]))
        self._buf = [(ids[n:], lp[n:], tail[n:])] if len(ids) > n else []
        self._buffered -= n
        self.written += n

    def close(self) -> Path:
        if self._buffered:
            self._flush(self._buffered)
        return write_topk_manifest(self.out_dir, self.meta, self.entries)


# --------------------------------------------------------------------------- reading


class TeacherTopK:
    """Read a top-k directory; ``expect`` values (data_id, seq_len, temperature, tokenizer_fingerprint,
    num_samples) that differ from the manifest are a DataError naming both."""

    def __init__(self, directory: str | os.PathLike, verify: bool = True, **expect):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise DataError(f"no {MANIFEST} in {self.dir}: not a complete teacher top-k directory "
                            "(write it with the teacher first)")
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('format_version')!r}")
            self.meta = TopKMeta(**{f: manifest[f] for f in TopKMeta.__dataclass_fields__})
            self.shards: list[dict] = manifest["shards"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} is not a distllm teacher top-k manifest ({e})") from None
        for key, want in expect.items():
            have = getattr(self.meta, key)
            if want is not None and have != want:
                raise DataError(f"teacher top-k {self.dir} was made for {key} = {have}, this run has {want}; "
                                "write the top-k for this data and settings")
        self.verify = verify
        self._starts = np.array([s["first_sample"] for s in self.shards] + [self.meta.num_samples], dtype=np.int64)
        self._open: dict[int, object] = {}
        self._lock = threading.Lock()

    @property
    def k(self) -> int:
        return self.meta.k

    @property
    def num_samples(self) -> int:
        return self.meta.num_samples

    def _shard(self, s: int):
        with self._lock:
            handle = self._open.get(s)
            if handle is None:
                handle = self._open[s] = self._check(s)
            return handle

    def _check(self, s: int):
        entry, m = self.shards[s], self.meta
        path = self.dir / entry["file"]
        if not path.is_file():
            raise DataError(f"teacher top-k shard not found: {path}")
        if self.verify and sha256_file(path) != entry["sha256"]:
            raise DataError(f"teacher top-k shard {path} is corrupt: its sha256 differs from {MANIFEST}'s")
        try:
            f = safe_open(str(path), framework="numpy")
            n = entry["num_samples"]
            want = {"ids": ((n, m.seq_len, m.k), ids_dtype(m.vocab_size)),
                    "logprobs": ((n, m.seq_len, m.k), np.dtype(m.logprobs_dtype)),
                    "tail": ((n, m.seq_len), np.dtype(m.logprobs_dtype))}
            for name, (shape, dtype) in want.items():
                t = f.get_slice(name)
                if tuple(t.get_shape()) != shape or t[0:0].dtype != dtype:
                    raise ValueError(f"{name} is {t.get_dtype()}{t.get_shape()}, expected {dtype.name}{list(shape)}")
            if self.verify and n and int(f.get_tensor("ids").max()) >= m.vocab_size:
                raise ValueError(f"ids outside the vocabulary of {m.vocab_size}")
        except (SafetensorError, ValueError, OSError) as e:
            raise DataError(f"teacher top-k shard {path} is corrupt: {e}") from None
        return f

    def read(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Samples ``ids``: ``teacher_topk_ids`` (n, T, k) int64, ``teacher_topk_logprobs`` (n, T, k)
        float32, ``teacher_topk_tail`` (n, T) float32."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise IndexError(f"samples {ids} out of range [0, {self.num_samples})")
        n, T, k = len(ids), self.meta.seq_len, self.meta.k
        out = {"teacher_topk_ids": np.empty((n, T, k), np.int64),
               "teacher_topk_logprobs": np.empty((n, T, k), np.float32),
               "teacher_topk_tail": np.empty((n, T), np.float32)}
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        for row, (i, s) in enumerate(zip(ids.tolist(), shard_of.tolist())):
            f = self._shard(s)
            j = i - int(self._starts[s])
            for name, key in zip(_TENSORS, out):
                out[key][row] = f.get_slice(name)[j : j + 1][0]
        return out
