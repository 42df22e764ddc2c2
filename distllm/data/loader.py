"""Random access to a prepared split, and a resumable batch iterator for any number of processes.

A split's shards form one concatenated token stream. Sample ``i`` is the window
``[i*T, i*T + T + 1)`` for ``T = seq_len`` (inputs are its first T tokens, targets its last T),
so ``num_samples = (num_tokens - 1) // T``.

``BatchLoader`` walks a *global* sample order: per epoch, ``default_rng([seed, epoch])``'s
permutation of all samples (or the identity without shuffling), the same for every number of
processes. Each ``next()`` consumes one global batch of ``batch_size * world_size`` samples, of
which rank r takes the r-th contiguous ``batch_size`` slice. Its position is
``(epoch, sample_index)`` in global samples, so a run can resume with a different world size
(and the same global batch) exactly where it stopped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from distllm.data.shards import SPLITS, open_shard, verify
from distllm.errors import DataError


class TokenShards:
    """The memory-mapped token stream of one split of a prepared data directory."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data_dir, self.split = Path(data_dir), split
        manifest = verify(self.data_dir)  # tokenizer, headers and token counts against the manifest
        tok = manifest["tokenizer"]
        self.vocab_size: int = tok["vocab_size"]
        self.eot_id: int = tok["eot_id"]
        self.fingerprint: str = tok["fingerprint"]
        self._shards: list[np.ndarray] = [
            open_shard(self.data_dir / entry["file"]) for entry in manifest["splits"][split]["shards"]
        ]
        sizes = [len(s) for s in self._shards]
        self._starts = np.cumsum([0] + sizes)  # _starts[k] = stream offset of shard k; _starts[-1] = total
        self.num_tokens = int(self._starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Copy of tokens ``[start, start + length)`` of the split's stream (may span shards)."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"window [{start}, {start + length}) outside the {self.split} stream of {self.num_tokens} tokens"
            )
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            offset = start + filled - int(self._starts[k])
            n = min(length - filled, len(self._shards[k]) - offset)
            out[filled : filled + n] = self._shards[k][offset : offset + n]
            filled += n
            k += 1
        return out


class SampleIndex:
    """Samples of ``seq_len + 1`` tokens with stride ``seq_len`` over a split's token stream."""

    def __init__(self, shards: TokenShards, seq_len: int):
        if shards.num_tokens < seq_len + 1:
            raise DataError(
                f"{shards.split} split has {shards.num_tokens} tokens, fewer than data.seq_len+1 = {seq_len + 1}; "
                f"lower data.seq_len or use a larger corpus (or data.val_fraction for the val split)"
            )
        self.shards, self.seq_len = shards, seq_len
        self.num_samples = (shards.num_tokens - 1) // seq_len

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        return self.shards.window(i * self.seq_len, self.seq_len + 1)


class BatchLoader:
    """Endless iterator of int64 tensors ``(batch_size, seq_len + 1)`` for process ``rank`` of ``world_size``."""

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.samples = SampleIndex(shards, seq_len)
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        if self.samples.num_samples < self.global_batch:
            raise DataError(
                f"{shards.split} split has {self.samples.num_samples} samples of data.seq_len+1 = {seq_len + 1} "
                f"tokens, fewer than one batch of {batch_size} x {world_size} processes; use a larger corpus or "
                "smaller batches"
            )
        self.epoch = 0
        self.sample_index = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return self.samples.num_samples

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        """Global sample order of ``epoch`` (the same for every rank and world size)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self.sample_index + self.global_batch > self.num_samples:  # drop the epoch's remainder
            self.epoch += 1
            self.sample_index = 0
        first = self.sample_index + self.rank * self.batch_size
        ids = self.order(self.epoch)[first : first + self.batch_size]
        self.sample_index += self.global_batch
        return torch.from_numpy(np.stack([self.samples[int(i)] for i in ids]))

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "sample_index": self.sample_index,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (also with another world size); its seed replaces ours."""
        if state["seq_len"] != self.seq_len or state["num_samples"] != self.num_samples:
            raise DataError(
                f"the data loader state is for another dataset: seq_len {state['seq_len']} with "
                f"{state['num_samples']} samples, but the {self.samples.shards.split} split of "
                f"{self.samples.shards.data_dir} gives seq_len {self.seq_len} with {self.num_samples} samples; "
                "resume with the same data.dir and data.seq_len"
            )
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.sample_index = state["sample_index"]
        self._order_epoch = None
