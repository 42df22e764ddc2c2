"""Resume determinism: stop at any step and continue, on any number of processes, with the exact samples
an uninterrupted run would have used -- across epoch boundaries, with one source or several mixed.

Processes are simulated in one process: rank r of w is a loader built with (rank=r, world_size=w),
and the ranks' micro-batches are interleaved the way data-parallel training consumes them.
"""

import json

import numpy as np
import pytest
from synthetic import stream_dir

from distllm.config import DataConfig
from distllm.data.loader import build_train_loader
from distllm.batch_plan import BatchPlan

T, G = 8, 8
STEPS = 40  # 15 steps per epoch of the single source: crosses two epoch boundaries
MICRO = {1: 4, 2: 4, 4: 2}  # micro-batch per world size: accum 2, 1 and 1


@pytest.fixture
def sources(tmp_path, prepared_data):
    """Source A: 125 samples (token ids 0..1002); source B: 70 samples (ids 20000..20562)."""
    a = stream_dir(tmp_path / "a", prepared_data, 1003, 300)
    b = stream_dir(tmp_path / "b", prepared_data, 563, 100, offset=20_000)
    return a, b


def data_config(sources, mixed: bool, prefetch: int) -> DataConfig:
    a, b = sources
    mix = {str(a): 0.7, str(b): 0.3} if mixed else None
    return DataConfig(dir=str(a), seq_len=T, mix=mix, prefetch=prefetch)


def run(cfg: DataConfig, world_size: int, steps: int, state=None):
    """Global batches (G sample ids each, in global-batch order) of ``steps`` steps, and the end state."""
    B = MICRO[world_size]
    ranks = [build_train_loader(cfg, BatchPlan(G, B, world_size), seed=5, rank=r)
             for r in range(world_size)]
    for r in ranks:
        if state is not None:
            r.load_state_dict(state)
    batches = []
    for _ in range(steps):
        batch = np.full(G, -1)
        for m in range(G // (B * world_size)):
            for r, loader in enumerate(ranks):
                window = next(loader)
                batch[m * world_size * B + r * B : m * world_size * B + (r + 1) * B] = loader.last_indices
                offsets = loader.offsets  # window rows hold the samples named by last_indices
                src = np.searchsorted(offsets, loader.last_indices, side="right") - 1
                first_token = (loader.last_indices - offsets[src]) * T + np.where(src == 1, 20_000, 0)
                np.testing.assert_array_equal(window[:, 0].numpy(), first_token)
        assert len(set(batch.tolist())) == G  # ranks and micro-steps disjoint; nothing missing
        batches.append(batch.tolist())
    states = [r.state_dict() for r in ranks]
    assert all(s == states[0] for s in states)
    for r in ranks:
        r.close()
    return batches, json.loads(json.dumps(states[0]))


@pytest.mark.parametrize("mixed", [False, True], ids=["one-source", "mixed"])
@pytest.mark.parametrize("stop", [13, 22])
@pytest.mark.parametrize("before,after", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_resume_continues_the_uninterrupted_run(sources, mixed, stop, before, after):
    reference, end = run(data_config(sources, mixed, prefetch=0), world_size=1, steps=STEPS)
    assert min(s["epoch"] for s in end["sources"]) >= 1  # the run crossed an epoch boundary of every source

    first, state = run(data_config(sources, mixed, prefetch=3), world_size=before, steps=stop)  # thread runs ahead
    second, resumed_end = run(data_config(sources, mixed, prefetch=2), world_size=after, steps=STEPS - stop,
                              state=state)
    assert first + second == reference
    assert resumed_end == end


def test_world_sizes_agree_step_by_step(sources):
    """1 process x accum 2 == 2 processes x accum 1 == 4 processes x accum 1 (B=2), sample for sample."""
    cfg = data_config(sources, mixed=True, prefetch=0)
    one, _ = run(cfg, world_size=1, steps=STEPS)
    two, _ = run(cfg, world_size=2, steps=STEPS)
    four, _ = run(cfg, world_size=4, steps=STEPS)
    assert one == two == four
