"""This rank's SFT micro-batches, in the same global sample order pretraining uses.

An ``SFTDataset`` (``data/sft.py``) holds N fixed-shape rows. They are walked exactly as the
pretraining loader walks token windows: ``GlobalOrder`` (``data/loader.py``) gives each optimizer
step's global batch of G row ids from ``Permutation(N, key(seed, epoch, data_id))`` (an epoch is cut
to a multiple of G), and ``BatchPlan.positions`` gives micro-step m of rank r its slice. So the
global batches depend on (seed, data, G) only: 1 process x accum 4 and 2 processes x accum 2 train
on the same rows in the same steps, and the state (``state_dict``: the order's position, at a step
boundary) resumes with any number of processes. The rows live in memory, so batches are read in the
step (no prefetch thread).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from distllm.batch_plan import BatchPlan
from distllm.data.loader import GlobalOrder
from distllm.data.sft import SFTDataset
from distllm.errors import DataError


class _Rows:
    """What ``GlobalOrder`` reads of a source: its size, row length and identity."""

    split = "train"

    def __init__(self, dataset: SFTDataset, name: str):
        self.num_samples, self.seq_len = dataset.num_samples, dataset.seq_len
        self.data_id, self.data_dir = dataset.data_id, name
        self.shards = self  # GlobalOrder names a source by ``.shards.data_id`` / ``.shards.data_dir``


class SFTLoader:
    """Endless micro-batches of this rank: ``next_batch()`` -> ``input_ids``, ``labels`` (B, T) int64 and
    ``doc_ids`` (B, T) int32 (host tensors, pinned for a CUDA run); ``last_indices`` the global row ids."""

    def __init__(self, dataset: SFTDataset, plan: BatchPlan, seed: int, rank: int, name: str, fingerprint: str,
                 pin_memory: bool = False):
        if dataset.num_samples < plan.global_batch:
            raise DataError(
                f"the SFT training split of {name} fills {dataset.num_samples} sequences of data.seq_len = "
                f"{dataset.seq_len}, fewer than one global batch of {plan.global_batch} (train.global_batch_size); "
                "use more examples or a smaller batch"
            )
        self.dataset, self.plan, self.rank, self.pin_memory = dataset, plan, rank, pin_memory
        self.fingerprint = fingerprint
        """The tokenizer's fingerprint (checkpoints store it; another tokenizer is refused on resume)."""
        self._order = GlobalOrder([_Rows(dataset, name)], [1.0], plan.global_batch, seed)
        self._state = self._order.state_dict()  # after the last consumed global batch
        self._micro = 0  # micro-batches consumed of the current global batch
        self._ids: np.ndarray | None = None  # the current global batch's row ids (G,)
        self.last_indices: np.ndarray = np.empty(0, dtype=np.int64)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._micro == 0:
            self._ids = self._order.next_batch()
        mine = self._ids[self.plan.positions(self._micro, self.rank)]  # (B,)
        batch = {k: torch.from_numpy(v) for k, v in self.dataset.read(mine).items()}
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        self._micro = (self._micro + 1) % self.plan.accum
        if self._micro == 0:
            self._state = self._order.state_dict()
        self.last_indices = mine
        return batch

    def state_dict(self) -> dict:
        """Position after the last consumed global batch (at an optimizer-step boundary); JSON-serialisable."""
        if self._micro:
            raise RuntimeError(f"state_dict() after {self._micro} of {self.plan.accum} micro-batches of a step")
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (any number of processes); DataError if it is for other rows."""
        try:
            self._order.load_state_dict(state)
        except DataError:
            theirs = ", ".join(f"{s.get('data')} ({s.get('num_samples')} rows)" for s in state.get("sources", []))
            raise DataError(
                f"the checkpoint's data position is for other SFT rows ({theirs}) than this run's "
                f"{self.dataset.num_samples} rows of {self._order.samples[0].data_dir}; resume with the same sft.data, "
                "sft.chat_template, sft.packing, sft.overlong, sft.val_fraction and data.seq_len"
            ) from None
        self._state, self._micro = self._order.state_dict(), 0

    def close(self) -> None:
        pass
