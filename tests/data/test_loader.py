"""The training loader: windows over shards, one global order for any number of processes, resumable state."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distllm.config import DataConfig
from distllm.data.loader import SampleIndex, TokenShards, build_train_loader
from distllm.data.order import Permutation, derive_key
from distllm.data.shards import read_manifest
from distllm.errors import DataError
from distllm.tokenizer import save_tokenizer, train_tokenizer
from distllm.batch_plan import BatchPlan
from synthetic import make_data_dir
from synthetic import stream_dir as make_stream_dir

T = 8  # seq_len


@pytest.fixture
def stream_dir(tmp_path, prepared_data):
    """Train stream = 0, 1, 2, ..., 1002 (token == position) in 3 uneven shards: 125 samples of T=8."""
    tokens = np.arange(1003)
    return make_data_dir(
        tmp_path / "stream",
        prepared_data,
        {"train": [tokens[:100], tokens[100:101], tokens[101:]], "val": [np.arange(50) + 7]},
    )


def loader(data_dir, B, G, seed=0, rank=0, world_size=1, **kw):
    cfg = DataConfig(dir=str(data_dir), seq_len=T, **kw)
    return build_train_loader(cfg, BatchPlan(G, B, world_size), seed=seed, rank=rank)


def sample_ids(batch: torch.Tensor) -> list[int]:
    """Sample index of each row (token == position in the synthetic stream)."""
    return [int(row[0]) // T for row in batch]


def test_windows_span_shards(stream_dir):
    shards = TokenShards(stream_dir, "train")
    assert shards.num_tokens == 1003 and shards.eot_id == 0 and shards.num_shards == 3
    for start, length in [(0, 1003), (95, 10), (99, 3), (100, 1), (100, 2), (101, 0), (990, 13)]:
        np.testing.assert_array_equal(shards.window(start, length), np.arange(start, start + length))
    with pytest.raises(IndexError):
        shards.window(1000, 4)


def test_open_files_are_bounded(tmp_path, prepared_data):
    """Thousands of shards must not exhaust file descriptors: at most max_open_files stay open."""
    data = make_stream_dir(tmp_path / "many", prepared_data, 3003, 100)  # 31 shards
    fds = lambda: sum(1 for f in Path("/proc/self/fd").iterdir() if f.resolve().parent == data)  # noqa: E731
    shards = TokenShards(data, "train", max_open_files=4)
    for start in range(0, 2990, 97):  # every shard, some windows spanning two
        np.testing.assert_array_equal(shards.window(start, 13), np.arange(start, start + 13))
        assert fds() <= 4
    shards.close()
    assert fds() == 0


def test_samples_overlap_by_one_token(stream_dir):
    samples = SampleIndex(TokenShards(stream_dir, "train"), T)
    assert len(samples) == (1003 - 1) // T == 125
    for i in (0, 1, 12, 124):
        np.testing.assert_array_equal(samples[i], np.arange(i * T, i * T + T + 1))
    np.testing.assert_array_equal(samples.read(np.array([3, 12, 0])), np.stack([samples[3], samples[12], samples[0]]))
    # targets (window[1:]) are the inputs (window[:-1]) shifted by one
    np.testing.assert_array_equal(samples[3][1:], samples[3][:-1] + 1)
    assert samples[3][-1] == samples[4][0]


def test_real_prepared_data_batches(tiny_config):
    with build_train_loader(tiny_config.data, BatchPlan(4, 4), seed=0, vocab_limit=tiny_config.model.vocab_size) as train:
        batch = next(train)
        assert batch.dtype == torch.int64 and batch.shape == (4, 33)
        assert int(batch.max()) < train.vocab_size == 512
        assert train.fingerprint == read_manifest(tiny_config.data.dir)["tokenizer"]["fingerprint"]
        assert train.last_indices.shape == (4,)
        np.testing.assert_array_equal(batch.numpy(), SampleIndex(TokenShards(tiny_config.data.dir, "train"), 32)
                                      .read(train.last_indices))


def test_last_indices_are_the_samples_returned(stream_dir):
    with loader(stream_dir, B=4, G=4, seed=1) as train:
        for _ in range(40):
            batch = next(train)
            assert sample_ids(batch) == train.last_indices.tolist()


def test_epoch_covers_every_sample_once_then_rolls_over(stream_dir):
    with loader(stream_dir, B=4, G=4, seed=1) as train:
        assert train.batches_per_epoch() == 125 // 4 == 31
        seen = [i for _ in range(31) for i in sample_ids(next(train))]
        assert sorted(seen) == sorted(set(seen)) and len(seen) == 124  # one sample dropped
        assert seen != sorted(seen)  # shuffled
        state = train.state_dict()["sources"][0]
        assert (state["epoch"], state["sample_index"]) == (0, 124)
        first_of_epoch1 = sample_ids(next(train))
        state = train.state_dict()["sources"][0]
        assert (state["epoch"], state["sample_index"]) == (1, 4)
        data_id = TokenShards(stream_dir, "train").data_id
        assert first_of_epoch1 == Permutation(125, derive_key(1, 1, data_id))[0:4].tolist()
        assert first_of_epoch1 != seen[:4]


def test_epoch_remainder_is_dropped_by_the_global_batch(stream_dir):
    """125 samples, G = 8: 15 steps per epoch for any micro-batch and number of processes (i6)."""
    for B, w in [(8, 1), (4, 1), (2, 2), (1, 4), (4, 2)]:
        ranks = [loader(stream_dir, B=B, G=8, seed=3, rank=r, world_size=w) for r in range(w)]
        for _ in range(15 * (8 // (B * w))):
            for r in ranks:
                next(r)
        assert [r.state_dict()["sources"][0]["sample_index"] for r in ranks] == [120] * w
        for _ in range(8 // (B * w)):  # one more step: the first of epoch 1
            for r in ranks:
                next(r)
        assert [(r.epoch, r.state_dict()["sources"][0]["sample_index"]) for r in ranks] == [(1, 8)] * w
        for r in ranks:
            r.close()


@pytest.mark.parametrize("B,G,w", [(5, 5, 1), (5, 25, 1), (1, 25, 5)])
def test_an_epoch_of_whole_global_batches_is_used_to_its_last_batch(stream_dir, B, G, w):
    """125 samples and G dividing 125: nothing to drop, so the epoch's last batch is trained on before
    epoch 1 starts, for any micro-batch and number of processes."""
    ranks = [loader(stream_dir, B=B, G=G, seed=2, rank=r, world_size=w) for r in range(w)]
    assert ranks[0].batches_per_epoch() == 125 // G
    seen = [i for _ in range(125 // (B * w)) for r in ranks for i in sample_ids(next(r))]
    assert sorted(seen) == list(range(125))
    assert [(r.epoch, r.state_dict()["sources"][0]["sample_index"]) for r in ranks] == [(0, 125)] * w
    first = [i for _ in range(G // (B * w)) for r in ranks for i in sample_ids(next(r))]  # one more step
    assert [(r.epoch, r.state_dict()["sources"][0]["sample_index"]) for r in ranks] == [(1, G)] * w
    data_id = TokenShards(stream_dir, "train").data_id
    assert sorted(first) == sorted(Permutation(125, derive_key(2, 1, data_id))[0:G].tolist())
    for r in ranks:
        r.close()


def test_ranks_split_the_global_batch(stream_dir):
    """Micro-step m of rank r takes positions [m*w*B + r*B, +B); the union over ranks is the global batch."""
    single = loader(stream_dir, B=8, G=8, seed=3)
    ranks = [loader(stream_dir, B=2, G=8, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):  # crosses two epoch boundaries (15 steps per epoch)
        expected = next(single)
        parts = [[next(r) for r in ranks] for _ in range(2)]  # 2 micro-steps x 2 ranks
        got = torch.cat([p for micro in parts for p in micro])
        torch.testing.assert_close(got, expected)
        assert len(set(sample_ids(got))) == 8  # disjoint
    assert single.epoch == ranks[0].epoch == ranks[1].epoch == 2
    for r in (single, *ranks):
        r.close()


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("new_world_size", [1, 2, 4])
def test_resume_gives_the_identical_next_batch(stream_dir, new_world_size, prefetch):
    train = loader(stream_dir, B=4, G=4, seed=7, prefetch=prefetch)
    for _ in range(40):  # into the second epoch
        next(train)
    state = json.loads(json.dumps(train.state_dict()))
    assert (state["sources"][0]["epoch"], state["sources"][0]["sample_index"], state["seed"]) == (1, 36, 7)
    expected = torch.cat([next(train) for _ in range(3)])
    train.close()

    micro = 4 // new_world_size
    resumed = [loader(stream_dir, B=micro, G=4, seed=999, rank=r, world_size=new_world_size, prefetch=prefetch)
               for r in range(new_world_size)]
    for r in resumed:
        r.load_state_dict(state)
    got = torch.cat([torch.cat([next(r) for r in resumed]) for _ in range(3)])
    torch.testing.assert_close(got, expected)
    for r in resumed:
        r.close()


def test_state_only_at_step_boundaries(stream_dir):
    with loader(stream_dir, B=2, G=4, seed=0) as train:
        next(train)
        with pytest.raises(RuntimeError, match="optimizer-step boundary"):
            train.state_dict()
        next(train)
        assert train.state_dict()["samples_seen"] == 4


def test_state_of_another_dataset_is_refused(stream_dir, tmp_path, prepared_data):
    state = loader(stream_dir, B=4, G=4).state_dict()
    other = make_data_dir(tmp_path / "other", prepared_data, {"train": [np.arange(1003) + 1], "val": [np.arange(50)]})
    with pytest.raises(DataError, match="the data loader state is for other data"):
        loader(other, B=4, G=4).load_state_dict(state)
    cfg = DataConfig(dir=str(stream_dir), seq_len=T + 1)
    with pytest.raises(DataError, match="resume with the same data.dir / data.mix and data.seq_len"):
        build_train_loader(cfg, BatchPlan(4, 4), seed=0).load_state_dict(state)


def test_split_too_short(stream_dir):
    with pytest.raises(DataError, match=r"val split of .* has 50 tokens, fewer than data.seq_len\+1 = 65"):
        SampleIndex(TokenShards(stream_dir, "val"), 64)
    with pytest.raises(DataError, match="fewer than one global batch of 128"):
        loader(stream_dir, B=64, G=128, world_size=2)


def test_tokenizer_mismatch(stream_dir):
    save_tokenizer(train_tokenizer(["a different corpus"] * 3, vocab_size=300), stream_dir / "tokenizer.json")
    with pytest.raises(
        DataError,
        match=r"stream/tokenizer.json does not match the shards \(fingerprint .* != .*\); re-run prepare",
    ):
        TokenShards(stream_dir, "train")


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match=r"no manifest.json in .* — run `distllm prepare CONFIG` first \(data.dir\)"):
        TokenShards(tmp_path, "train")


