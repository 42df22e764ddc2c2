"""The background prefetch thread: same batches, state of consumed batches only, errors re-raised, clean stop."""

import gc
import threading
import time

import numpy as np
import pytest
import torch
from synthetic import stream_dir

from distllm.config import DataConfig
from distllm.data.loader import SampleIndex, build_train_loader
from distllm.errors import DataError
from distllm.batch_plan import BatchPlan

T = 8


@pytest.fixture
def data(tmp_path, prepared_data):
    return stream_dir(tmp_path / "stream", prepared_data, 2003, 500)  # 250 samples in 5 shards


def make(data, prefetch, B=4, G=8):
    cfg = DataConfig(dir=str(data), seq_len=T, prefetch=prefetch)
    return build_train_loader(cfg, BatchPlan(G, B), seed=3)


def prefetch_threads() -> set[threading.Thread]:
    """Live threads of loaders (prefetch) and of shard verification."""
    return {t for t in threading.enumerate() if t.name.startswith(("distllm-prefetch", "distllm-verify"))}


def test_prefetch_gives_the_synchronous_batches(data):
    with make(data, 0) as sync, make(data, 3) as ahead:
        for _ in range(80):  # crosses epoch boundaries
            torch.testing.assert_close(next(ahead), next(sync))
            np.testing.assert_array_equal(ahead.last_indices, sync.last_indices)


def test_state_counts_consumed_batches_only(data, monkeypatch):
    reads = []
    real = SampleIndex.read
    monkeypatch.setattr(SampleIndex, "read", lambda self, ids, out=None: reads.append(len(ids)) or real(self, ids, out))
    with make(data, 5) as ahead, make(data, 0) as sync:
        for _ in range(6):  # 3 steps of 2 micro-batches
            next(ahead)
            next(sync)
        deadline = time.monotonic() + 10
        while len(reads) < 12 + 5 and time.monotonic() < deadline:  # the thread fills its queue of 5
            time.sleep(0.01)
        assert len(reads) >= 12 + 5  # read ahead ...
        assert ahead.state_dict() == sync.state_dict()  # ... but the state is where the consumer is
        assert ahead.state_dict()["samples_seen"] == 24


def test_error_in_the_thread_is_raised_by_next_with_its_message(data):
    (data / "train_000002.bin").write_bytes(b"DLLMSHRD")  # truncated shard, hit within the first steps
    before = prefetch_threads()
    loader = make(data, 2)
    with pytest.raises(DataError, match=r"shard .*train_000002.bin is truncated") as first:
        for _ in range(100):
            next(loader)
    with pytest.raises(DataError) as again:  # and again on the next call, not a hang or StopIteration
        next(loader)
    assert again.value is first.value
    loader.close()
    assert not prefetch_threads() - before  # (other tests' threads may end meanwhile)


def test_close_stops_the_threads(data):
    before = prefetch_threads()
    loader = make(data, 4)
    next(loader)
    assert prefetch_threads() - before
    loader.close()
    assert not prefetch_threads() - before  # (other tests' threads may end meanwhile)
    loader.close()  # idempotent


def test_a_dropped_loader_stops_its_thread(data):
    before = prefetch_threads()
    loader = make(data, 4)
    next(loader)
    del loader
    gc.collect()
    deadline = time.monotonic() + 10
    while prefetch_threads() - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not prefetch_threads() - before  # (other tests' threads may end meanwhile)


def test_load_state_dict_restarts_the_thread_at_the_new_position(data):
    with make(data, 3) as loader, make(data, 0) as reference:
        for _ in range(10):
            next(reference)
        state = reference.state_dict()
        expected = torch.stack([next(reference) for _ in range(4)])
        for _ in range(20):  # the thread reads ahead of a later position
            next(loader)
        loader.load_state_dict(state)
        torch.testing.assert_close(torch.stack([next(loader) for _ in range(4)]), expected)


@pytest.mark.gpu
def test_batches_are_pinned_for_a_cuda_run(data):
    """Pinned host memory lets ``.to(device, non_blocking=True)`` overlap the copy with compute."""
    with build_train_loader(DataConfig(dir=str(data), seq_len=16, prefetch=2), BatchPlan(4, 4), seed=0,
                            pin_memory=True) as loader:
        batch = loader.next_batch()
        assert batch["input_ids"].is_pinned() and batch["labels"].is_pinned()
