"""Training batches from prepared token shards: one global order for any number of processes.

Reading (``TokenShards``, ``SampleIndex``): a split's shards form one concatenated token stream.
Sample ``i`` is the window ``[i*T, i*T + T + 1)`` for ``T = seq_len`` (inputs its first T tokens,
targets its last T), so ``num_samples = (num_tokens - 1) // T``. Start-up reads only the
manifest and the tokenizer; each shard is checked against the manifest (size, header, sha256,
every token id below the vocabulary) before its first window is read -- once per shard per run,
in background threads that run one step ahead of the batches that need it. Windows are read with
``os.pread`` through a bounded set of open files.

Order (``GlobalOrder``): one optimizer step consumes one *global batch* of G samples. Each source
(a prepared directory; one, or several mixed by ``data.mix`` weights) walks its samples in the
order ``Permutation(num_samples, key(seed, epoch, source))`` -- computed, never stored. Position
j of the run's mixed stream comes from the source ``MixSchedule(weights).sources(j)``. A source
that cannot supply its share of the next global batch from the rest of its epoch starts its next
epoch (the remainder is dropped; with one source: the epoch is cut to a multiple of G). All of
this depends on (seed, data, G) only, never on the number of processes.

Slicing: a ``BatchPlan`` (``distllm/batch_plan.py``) says how a global batch is cut: with B samples
per micro-batch and w processes there are ``accum = G // (B * w)`` micro-steps, and micro-step m of
rank r takes positions ``[m*w*B + r*B, +B)`` of the global batch, so 1 process x accum 2 and 2
processes x accum 1 see the same samples in the same steps.

State: ``state_dict()`` (at a step boundary) holds the seed, G, the position in the mixed stream
and per source its data fingerprint, epoch and position in the epoch: resuming with any number of
processes continues with exactly the samples an uninterrupted run would have used.

Prefetch: with ``prefetch > 0`` a background thread prepares that many micro-batches ahead (in
pinned memory for a CUDA run, so the copy to the GPU overlaps compute); the state reflects consumed
batches only, and an exception in the thread is raised by ``next()``.

Batches: ``next(loader)`` gives the windows (B, seq_len + 1); ``loader.next_batch()`` gives the
training batch every objective reads: ``input_ids`` (B, T), ``labels`` (B, T) (the next tokens) and,
with document masking, ``doc_ids`` (B, T).
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from distllm.batch_plan import BatchPlan
from distllm.config import check_vocab
from distllm.data.mixing import MixSchedule
from distllm.data.order import Permutation, derive_key
from distllm.data.packing import document_ids
from distllm.data.shards import HEADER_SIZE, MANIFEST, SPLITS, data_fingerprint, load_manifest, verify_shard
from distllm.data.storage import open_store, storage_kwargs
from distllm.errors import DataError
from distllm.tokenizer import fingerprint, load_tokenizer

STATE_FORMAT = 1
ORDER_CHUNK = 4096
"""Positions of an epoch's order computed at once (and kept: 32 KB per source)."""


class TokenShards:
    """The token stream of one split of a prepared data directory, shards opened and verified lazily.

    ``vocab_limit``: token ids must be below it (and below the data's own vocabulary).
    ``verify``: check every shard's sha256 and token ids before first use (else only its header
    and size, and the token ids of each window read). Windows are read with ``os.pread`` (which
    releases the GIL while the disk works, so a prefetch thread overlaps the training step) through
    at most ``max_open_files`` open files (a memory map would hold one per shard for good).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        vocab_limit: Optional[int] = None,
        verify: bool = True,
        verify_workers: int = 2,
        max_open_files: int = 64,
        storage: Optional[dict] = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        # a local directory or an fsspec URL (s3://...), fetched into a local cache (data/storage.py)
        self.store = open_store(str(data_dir), **(storage or {}))
        self.data_dir = str(data_dir) if self.store.is_remote else Path(data_dir)  # Path() mangles "s3://"
        self.split, self.verify = split, verify
        manifest = load_manifest(self._local_file(MANIFEST))
        tok = manifest["tokenizer"]
        self.vocab_size: int = tok["vocab_size"]
        self.eot_id: int = tok["eot_id"]
        self.fingerprint: str = tok["fingerprint"]
        tok_path = self._local_file(tok["file"])
        self.tokenizer_path = tok_path
        """Local copy of the tokenizer the data was made with."""
        if (actual := fingerprint(load_tokenizer(tok_path))) != self.fingerprint:
            raise DataError(
                f"{tok_path} does not match the shards (fingerprint {actual[:12]} != {self.fingerprint[:12]}); "
                "re-run prepare"
            )
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_limit = self.vocab_size if vocab_limit is None else min(vocab_limit, self.vocab_size)
        self.data_id = data_fingerprint(manifest, split)
        """Identity of this split's tokens (checkpoints store it; another corpus is refused on resume)."""
        self._entries: list[dict] = manifest["splits"][split]["shards"]
        sizes = [int(e["num_tokens"]) for e in self._entries]
        if sum(sizes) != manifest["splits"][split]["num_tokens"]:
            raise DataError(
                f"the {split} shards listed in {self.store.url(MANIFEST)} hold {sum(sizes)} tokens, but it says "
                f"{manifest['splits'][split]['num_tokens']}; re-run prepare"
            )
        self._starts = np.cumsum([0] + sizes)  # _starts[k] = stream offset of shard k; _starts[-1] = total
        self.num_tokens = int(self._starts[-1])
        self._sizes = sizes
        self._paths: list[Optional[Path]] = [None] * len(self._entries)  # set once a shard is verified
        self._unverified = len(self._entries)
        self._files = OpenFiles(max_open_files)
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._workers = verify_workers
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def num_shards(self) -> int:
        return len(self._entries)

    @property
    def shard_files(self) -> list[str]:
        """File names of the split's shards, in stream order."""
        return [e["file"] for e in self._entries]

    @property
    def shard_starts(self) -> np.ndarray:
        """(num_shards + 1,) stream offset of each shard's first token; the last entry is the total."""
        return self._starts

    def local_file(self, name: str) -> Path:
        """Local path of a file of the data directory (fetched into the cache for object storage)."""
        return self._local_file(name)

    # ---- file access: the one place that turns a file of the data directory into a local path
    def _local_file(self, name: str, entry: Optional[dict] = None) -> Path:
        """Local path of file ``name`` of the data directory; ``entry`` is a shard's manifest entry (its
        ``num_tokens`` and ``sha256``). From object storage the file is fetched into the local cache and
        checked against the entry's size and sha256 there."""
        if entry is None:
            return self.store.local_path(name)
        size = HEADER_SIZE + int(entry["num_tokens"]) * self.dtype.itemsize
        return self.store.local_path(name, size=size, sha256=entry["sha256"])

    def _verify(self, k: int) -> Path:
        """Check shard ``k`` against the manifest (once per shard per run); its local path."""
        path = self._local_file(self._entries[k]["file"], self._entries[k])
        verify_shard(
            path,
            self._entries[k],
            self.fingerprint,
            self.dtype,
            vocab_limit=self.vocab_limit if self.verify else None,
            check_hash=self.verify and not self.store.is_remote,  # the store checked it when it fetched it
        )
        with self._lock:
            self._paths[k] = path
            self._unverified -= 1
        return path

    def _future(self, k: int) -> Future:
        with self._lock:
            fut = self._futures.get(k)
            if fut is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="distllm-verify")
                fut = self._futures[k] = self._pool.submit(self._verify, k)
            return fut

    def path(self, k: int) -> Path:
        """Local path of shard ``k``, once verified (waits for its verification; DataError if it fails)."""
        path = self._paths[k]
        return path if path is not None else self._future(k).result()

    @property
    def all_verified(self) -> bool:
        return self._unverified == 0

    def warm(self, shard_ids: Sequence[int]) -> None:
        """Start fetching and verifying these shards in the background (they will be read soon)."""
        self.store.prefetch([self._entries[int(k)]["file"] for k in shard_ids if self._paths[int(k)] is None])
        for k in shard_ids:
            if self._paths[k] is None:
                self._future(int(k))

    def shards_of(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Indices of the shards that windows ``[s, s + length)`` touch (sorted, unique)."""
        first = np.searchsorted(self._starts, starts, side="right") - 1
        last = np.searchsorted(self._starts, np.asarray(starts) + max(length - 1, 0), side="right") - 1
        return np.unique(np.concatenate([first, last]))

    def close(self) -> None:
        """Stop background verification and close the open shard files (reading reopens them)."""
        self._files.close()
        self.store.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            with self._lock:
                self._futures = {k: f for k, f in self._futures.items() if f.done() and not f.cancelled()}

    # ---- reading
    def window(self, start: int, length: int) -> np.ndarray:
        """Copy of tokens ``[start, start + length)`` of the split's stream as int64 (may span shards)."""
        out = np.empty((1, length), dtype=np.int64)
        self.read_windows(np.array([start], dtype=np.int64), length, out)
        return out[0]

    def read_windows(self, starts: np.ndarray, length: int, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (n, length) int64 with the windows ``[starts[i], starts[i] + length)``."""
        starts = np.asarray(starts, dtype=np.int64)
        if starts.size and (starts.min() < 0 or length < 0 or starts.max() + length > self.num_tokens):
            raise IndexError(
                f"windows of {length} tokens at {starts} outside the {self.split} stream of {self.num_tokens} tokens"
            )
        ks = np.searchsorted(self._starts, starts, side="right") - 1
        itemsize = self.dtype.itemsize
        for row, (start, k) in enumerate(zip(starts.tolist(), ks.tolist())):
            offset, filled = start - int(self._starts[k]), 0
            while filled < length:  # usually one pass; more when the window spans shards
                n = min(length - filled, self._sizes[k] - offset)
                raw = self._files.pread(self.path(k), n * itemsize, HEADER_SIZE + offset * itemsize)
                out[row, filled : filled + n] = np.frombuffer(raw, dtype=self.dtype)
                filled, offset, k = filled + n, 0, k + 1
        if not self.verify and out.size and int(out.max()) >= self.vocab_limit:
            self._out_of_vocab(starts, out)
        return out

    def _out_of_vocab(self, starts: np.ndarray, out: np.ndarray) -> None:
        row, col = np.argwhere(out >= self.vocab_limit)[0]
        pos = int(starts[row]) + int(col)
        k = int(np.searchsorted(self._starts, pos, side="right")) - 1
        raise DataError(
            f"shard {self.store.url(self._entries[k]['file'])} holds token id {int(out[row, col])} at token offset "
            f"{pos - int(self._starts[k])}, outside the vocabulary of {self.vocab_limit} ids; it was made with "
            "another tokenizer or is corrupt (re-run `distllm prepare`), or model.vocab_size is too small"
        )


class SampleIndex:
    """Samples of ``seq_len + 1`` tokens with stride ``seq_len`` over a split's token stream."""

    def __init__(self, shards: TokenShards, seq_len: int):
        if shards.num_tokens < seq_len + 1:
            raise DataError(
                f"{shards.split} split of {shards.data_dir} has {shards.num_tokens} tokens, fewer than "
                f"data.seq_len+1 = {seq_len + 1}; lower data.seq_len or use a larger corpus (or data.val_fraction "
                "for the val split)"
            )
        self.shards, self.seq_len = shards, seq_len
        self.num_samples = (shards.num_tokens - 1) // seq_len

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        return self.shards.window(i * self.seq_len, self.seq_len + 1)

    def starts(self, ids: np.ndarray) -> np.ndarray:
        """Stream offsets of samples ``ids``."""
        return np.asarray(ids, dtype=np.int64) * self.seq_len

    def read(self, ids: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Samples ``ids`` as an int64 array (len(ids), seq_len + 1), written into ``out`` if given."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise IndexError(f"samples {ids} out of range [0, {self.num_samples})")
        if out is None:
            out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        return self.shards.read_windows(self.starts(ids), self.seq_len + 1, out)

    def warm(self, ids: np.ndarray) -> None:
        """Start verifying the shards that samples ``ids`` need."""
        self.shards.warm(self.shards.shards_of(self.starts(ids), self.seq_len + 1))


class OpenFiles:
    """``pread`` from files kept open, at most ``limit`` at once (the least recently used is closed)."""

    def __init__(self, limit: int = 64):
        self.limit = max(1, limit)
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.Lock()

    def pread(self, path: Path, nbytes: int, offset: int) -> bytes:
        with self._lock:  # held while reading, so no other thread closes the descriptor meanwhile
            fd = self._fds.pop(path, None)
            if fd is None:
                while len(self._fds) >= self.limit:
                    os.close(self._fds.popitem(last=False)[1])
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise DataError(f"cannot open shard {path}: {e.strerror}") from None
            self._fds[path] = fd
            data = os.pread(fd, nbytes, offset)
        if len(data) != nbytes:
            raise DataError(f"shard {path} is shorter than when it was checked (changed during the run?)")
        return data

    def close(self) -> None:
        with self._lock:
            while self._fds:
                os.close(self._fds.popitem()[1])


# --------------------------------------------------------------------------- the global order


class GlobalOrder:
    """The world-size-independent sequence of global batches over one or more weighted sources.

    Global sample ids number the samples of all sources one after the other: source k's local
    sample s has id ``offsets[k] + s``.
    """

    def __init__(self, samples: Sequence[SampleIndex], weights: Sequence[float], global_batch: int, seed: int):
        self.samples, self.global_batch, self.seed = list(samples), global_batch, seed
        self.schedule = MixSchedule(weights)
        self.sizes = [s.num_samples for s in self.samples]
        self.offsets = np.cumsum([0] + self.sizes)  # (K + 1,)
        self.data_ids = [s.shards.data_id for s in self.samples]
        for s, n in zip(self.samples, self.sizes):
            if n < global_batch:
                raise DataError(
                    f"the {s.shards.split} split of {s.shards.data_dir} has {n} samples of data.seq_len+1 = "
                    f"{s.seq_len + 1} tokens, fewer than one global batch of {global_batch} "
                    "(train.global_batch_size); use a larger corpus or a smaller batch"
                )
        self.position = 0  # samples of the mixed stream consumed: global batches x G
        self.epochs = [0] * len(self.samples)
        self.indices = [0] * len(self.samples)  # position of each source inside its epoch's order
        self._chunks: list[Optional[tuple[int, int, np.ndarray]]] = [None] * len(self.samples)  # (epoch, start, ids)

    def clone(self) -> GlobalOrder:
        """An independent order over the same sources, at the same position."""
        other = copy.copy(self)
        other.epochs, other.indices, other._chunks = list(self.epochs), list(self.indices), list(self._chunks)
        return other

    def permutation(self, k: int, epoch: int) -> Permutation:
        """Order of source k's samples in ``epoch``."""
        return Permutation(self.sizes[k], derive_key(self.seed, epoch, self.data_ids[k]))

    def order_slice(self, k: int, epoch: int, start: int, count: int) -> np.ndarray:
        """Local sample ids at positions ``[start, start + count)`` of source k's order in ``epoch``.

        Computed ``ORDER_CHUNK`` positions at a time (one vectorised pass is far cheaper than many
        small ones), and only the current chunk is kept: bounded memory whatever the corpus size.
        """
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            pos = start + done
            chunk = self._chunks[k]
            if chunk is None or chunk[0] != epoch or not chunk[1] <= pos < chunk[1] + len(chunk[2]):
                first = pos - pos % ORDER_CHUNK
                ids = self.permutation(k, epoch)[first : min(first + ORDER_CHUNK, self.sizes[k])]
                chunk = self._chunks[k] = (epoch, first, ids)
            n = min(count - done, chunk[1] + len(chunk[2]) - pos)
            out[done : done + n] = chunk[2][pos - chunk[1] : pos - chunk[1] + n]
            done += n
        return out

    def next_batch(self) -> np.ndarray:
        """Global sample ids of the next global batch, (G,) int64; advances the order."""
        G = self.global_batch
        if len(self.samples) == 1:
            src, everything = None, np.arange(G)
        else:
            src = self.schedule.sources(self.position, G)  # (G,)
        ids = np.empty(G, dtype=np.int64)
        for k in range(len(self.samples)):
            where = everything if src is None else np.flatnonzero(src == k)
            if not where.size:
                continue
            if self.indices[k] + where.size > self.sizes[k]:  # drop the epoch's remainder
                self.epochs[k] += 1
                self.indices[k] = 0
            start = self.indices[k]
            ids[where] = self.order_slice(k, self.epochs[k], start, where.size) + self.offsets[k]
            self.indices[k] += where.size
        self.position += G
        return ids

    def split(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global ids -> (source index, local sample id)."""
        k = np.searchsorted(self.offsets, ids, side="right") - 1
        return k, ids - self.offsets[k]

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "seq_len": self.samples[0].seq_len,
            "global_batch_size": self.global_batch,
            "samples_seen": self.position,
            "sources": [
                {
                    "data": str(s.shards.data_dir),
                    "data_fingerprint": s.shards.data_id,
                    "num_samples": n,
                    "epoch": e,
                    "sample_index": i,
                }
                for s, n, e, i in zip(self.samples, self.sizes, self.epochs, self.indices)
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: sources are matched by their data fingerprint; DataError for other data."""
        try:
            seq_len, saved = state["seq_len"], {s["data_fingerprint"]: s for s in state["sources"]}
        except (KeyError, TypeError):
            raise DataError(
                "the data loader state in this checkpoint is from an older distllm (no per-source positions); "
                "it cannot be resumed with this loader"
            ) from None
        mine = {d: s for d, s in zip(self.data_ids, self.samples)}
        if seq_len != self.samples[0].seq_len or set(saved) != set(mine):
            theirs = ", ".join(f"{s['data']} ({s['num_samples']} samples)" for s in state["sources"])
            ours = ", ".join(f"{s.shards.data_dir} ({s.num_samples} samples)" for s in self.samples)
            raise DataError(
                f"the data loader state is for other data: seq_len {seq_len} over {theirs}, but this run has seq_len "
                f"{self.samples[0].seq_len} over {ours}; resume with the same data.dir / data.mix and data.seq_len"
            )
        self.seed = int(state["seed"])
        self.position = int(state["samples_seen"])
        for k, data_id in enumerate(self.data_ids):
            self.epochs[k] = int(saved[data_id]["epoch"])
            self.indices[k] = int(saved[data_id]["sample_index"])
        self._chunks = [None] * len(self.samples)


# --------------------------------------------------------------------------- the loader


@dataclass
class _Item:
    window: torch.Tensor  # (B, T + 1) int64
    ids: np.ndarray  # (B,) global sample ids
    doc_ids: Optional[torch.Tensor]  # (B, T) int32, with document masking
    state: Optional[dict]  # the order's state after this micro-batch, if it ends a global batch


@dataclass
class _Failure:
    error: BaseException


class _RankBatches:
    """This rank's micro-batches from ``order`` onward. Holds no reference to the loader, so a
    background thread running it does not keep a dropped loader alive."""

    def __init__(self, order: GlobalOrder, plan: BatchPlan, rank: int, eot_id: Optional[int], pin_memory: bool):
        self.order, self.plan, self.rank = order, plan, rank
        self.eot_id = eot_id  # None: no document ids
        self.pin_memory = pin_memory

    def __iter__(self) -> Iterator[_Item]:
        order, plan = self.order, self.plan
        lookahead = order.clone()
        self._warm(lookahead.next_batch())
        while True:
            ids = order.next_batch()  # (G,) this step's global batch
            self._warm(lookahead.next_batch())  # verify the next step's shards meanwhile
            state = order.state_dict()
            for m in range(plan.accum):
                mine = ids[plan.positions(m, self.rank)]  # (B,)
                window = torch.from_numpy(self._read(mine))  # (B, T + 1)
                docs = None if self.eot_id is None else document_ids(window[:, :-1], self.eot_id)  # (B, T)
                if self.pin_memory:
                    window, docs = window.pin_memory(), None if docs is None else docs.pin_memory()
                yield _Item(window, mine, docs, state if m == plan.accum - 1 else None)

    def _warm(self, ids: np.ndarray) -> None:
        """Start verifying the shards this rank reads in global batch ``ids``."""
        if all(samples.shards.all_verified for samples in self.order.samples):
            return
        plan = self.plan
        mine = ids.reshape(plan.accum, plan.world_size, plan.micro_batch)[:, self.rank].reshape(-1)
        src, local = self.order.split(mine)
        for k, samples in enumerate(self.order.samples):
            if (src == k).any():
                samples.warm(local[src == k])

    def _read(self, ids: np.ndarray) -> np.ndarray:
        """Windows of global sample ids: (len(ids), seq_len + 1) int64."""
        samples = self.order.samples
        out = np.empty((len(ids), samples[0].seq_len + 1), dtype=np.int64)
        src, local = self.order.split(ids)
        if len(samples) == 1:
            return samples[0].read(local, out)
        for k, source in enumerate(samples):
            rows = np.flatnonzero(src == k)
            if rows.size:
                out[rows] = source.read(local[rows])
        return out


class TrainLoader:
    """Endless iterator of this rank's micro-batches, int64 tensors (B, seq_len + 1); see the module doc."""

    def __init__(
        self,
        sources: Sequence[TokenShards],
        weights: Sequence[float],
        seq_len: int,
        plan: BatchPlan,
        seed: int,
        rank: int = 0,
        prefetch: int = 2,
        document_mask: bool = False,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={plan.world_size})")
        if len(sources) != len(weights) or not sources:
            raise ValueError("one weight per source is needed")
        fingerprints = {s.fingerprint for s in sources}
        if len(fingerprints) > 1:
            listing = ", ".join(f"{s.data_dir} ({s.fingerprint[:12]})" for s in sources)
            raise DataError(f"data.mix sources were made with different tokenizers: {listing}; prepare them with one")
        if len({s.data_id for s in sources}) < len(sources):
            raise DataError(f"data.mix names the same data twice: {', '.join(str(s.data_dir) for s in sources)}")
        self.sources = list(sources)
        self.seq_len, self.plan, self.rank = seq_len, plan, rank
        self.micro_batch_size, self.global_batch_size = plan.micro_batch, plan.global_batch
        self.world_size, self.accum = plan.world_size, plan.accum
        self.prefetch, self.document_mask, self.pin_memory = prefetch, document_mask, pin_memory
        self.fingerprint: str = sources[0].fingerprint
        self.vocab_size: int = sources[0].vocab_size
        self.eot_id: int = sources[0].eot_id
        self._order = GlobalOrder([SampleIndex(s, seq_len) for s in sources], weights, plan.global_batch, seed)
        self._state = self._order.state_dict()  # position after the last consumed global batch
        self._micro = 0  # micro-batches consumed in the current global batch
        self._items: Optional[Iterator[_Item]] = None  # synchronous producer
        self._queue: Optional[queue.Queue] = None  # background producer
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._failure: Optional[BaseException] = None
        self.last_indices: np.ndarray = np.empty(0, dtype=np.int64)
        """Global sample ids of the last micro-batch returned (source k's sample s is ``offsets[k] + s``)."""
        self.last_doc_ids: Optional[torch.Tensor] = None
        """With ``document_mask``: (B, seq_len) int32 document index of each input token of the last batch."""

    # ---- what callers read
    @property
    def weights(self) -> list[float]:
        return self._order.schedule.weights

    @property
    def num_samples(self) -> int:
        return int(self._order.offsets[-1])

    @property
    def offsets(self) -> np.ndarray:
        """Global id of each source's first sample, (K + 1,)."""
        return self._order.offsets

    @property
    def epoch(self) -> int:
        """Epoch of the first source at the last consumed step boundary."""
        return self._state["sources"][0]["epoch"]

    def batches_per_epoch(self) -> int:
        """Global batches per epoch of a single source."""
        return self._order.sizes[0] // self.global_batch_size

    # ---- producing
    def _start(self) -> None:
        order = self._order.clone()
        order.load_state_dict(self._state)
        items = iter(_RankBatches(order, self.plan, self.rank, self.eot_id if self.document_mask else None,
                                  self.pin_memory))
        if self.prefetch == 0:
            self._items = items
            return
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(
            target=self._run, args=(items, self._queue, self._stop), name="distllm-prefetch", daemon=True
        )
        self._thread.start()
        weakref.finalize(self, self._stop.set)  # a loader dropped without close() stops its thread

    @staticmethod
    def _run(items: Iterator[_Item], out: queue.Queue, stop: threading.Event) -> None:
        """Background thread: fill ``out`` until ``stop``; an exception is handed to the consumer."""
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer thread by __next__
            if not stop.is_set():
                out.put(_Failure(e))

    # ---- iterating
    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._failure is not None:
            raise self._failure
        if self._items is None and self._thread is None:
            self._start()
        if self._items is not None:
            item = next(self._items)
        else:
            while True:
                try:
                    item = self._queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise RuntimeError("the data prefetch thread stopped without an error") from None
            if isinstance(item, _Failure):
                self._failure = item.error
                self._shutdown()
                raise item.error
        self._micro = (self._micro + 1) % self.accum
        if item.state is not None:
            self._state = item.state
        self.last_indices, self.last_doc_ids = item.ids, item.doc_ids
        return item.window

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch as a training batch: ``input_ids`` (B, T), ``labels`` (B, T) and, with
        document masking, ``doc_ids`` (B, T) (views of one window tensor, on the host)."""
        window = next(self)
        batch = {"input_ids": window[:, :-1], "labels": window[:, 1:]}
        if self.last_doc_ids is not None:
            batch["doc_ids"] = self.last_doc_ids
        return batch

    # ---- state
    def state_dict(self) -> dict:
        """Position after the last consumed global batch (call at an optimizer-step boundary); JSON-serialisable."""
        if self._micro:
            raise RuntimeError(
                f"loader.state_dict() called after {self._micro} of {self.accum} micro-batches of a step; "
                "call it at an optimizer-step boundary"
            )
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (also with another number of processes); DataError if it is for other data."""
        self._shutdown()
        probe = self._order.clone()
        probe.load_state_dict(state)  # validates
        self._state = probe.state_dict()
        self._micro, self._failure = 0, None

    # ---- stopping
    def _shutdown(self) -> None:
        self._items = None
        if self._thread is not None:
            self._stop.set()
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join()
            self._thread, self._queue = None, None

    def close(self) -> None:
        """Stop the prefetch thread and background verification."""
        self._shutdown()
        for source in self.sources:
            source.close()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_train_loader(
    data_cfg,
    plan: BatchPlan,
    seed: int,
    rank: int = 0,
    vocab_limit: Optional[int] = None,
    pin_memory: bool = False,
) -> TrainLoader:
    """The training loader of a ``DataConfig``: the train split of ``data.dir``, or the ``data.mix`` sources.

    ``vocab_limit`` (the model's vocabulary): data made with a larger vocabulary is a ConfigError,
    and any token id at or above it a DataError naming the shard and offset.
    """
    mix = data_cfg.mix or {data_cfg.dir: 1.0}
    sources = [TokenShards(d, "train", vocab_limit=vocab_limit, verify=data_cfg.verify_shards,
                           storage=storage_kwargs(data_cfg)) for d in mix]
    for s in sources:
        if vocab_limit is not None:
            check_vocab(vocab_limit, s.vocab_size, s.data_dir)
    return TrainLoader(
        sources,
        list(mix.values()),
        data_cfg.seq_len,
        plan,
        seed,
        rank=rank,
        prefetch=data_cfg.prefetch,
        document_mask=data_cfg.document_mask,
        pin_memory=pin_memory,
    )
