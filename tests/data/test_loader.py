import shutil

import numpy as np
import pytest
import torch

from distllm.data.loader import BatchLoader, SampleIndex, TokenShards
from distllm.data.shards import read_manifest, write_manifest, write_shard
from distllm.errors import DataError
from distllm.tokenizer import fingerprint, load_tokenizer, save_tokenizer, train_tokenizer

T = 8  # seq_len


def make_data_dir(path, tokenizer_dir, splits):
    """A data dir whose shards hold the given token arrays (lists of shards per split)."""
    path.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", path / "tokenizer.json")
    tok = load_tokenizer(path / "tokenizer.json")
    fp = fingerprint(tok)
    manifest = {
        "format_version": 1,
        "source": "synthetic",
        "created": "now",
        "tokenizer": {"file": "tokenizer.json", "fingerprint": fp, "vocab_size": tok.get_vocab_size(), "eot_id": 0},
        "dtype": "uint16",
        "splits": {},
    }
    for split, shards in splits.items():
        entries = [write_shard(path / f"{split}_{i:06d}.bin", s.astype(np.uint16), fp) for i, s in enumerate(shards)]
        total = sum(e["num_tokens"] for e in entries)
        manifest["splits"][split] = {"num_tokens": total, "num_documents": 1, "shards": entries}
    write_manifest(path, manifest)
    return path


@pytest.fixture
def stream_dir(tmp_path, prepared_data):
    """Train stream = 0, 1, 2, ..., 1002 (token == position) in 3 uneven shards: 125 samples of T=8."""
    tokens = np.arange(1003)
    return make_data_dir(
        tmp_path / "stream",
        prepared_data,
        {"train": [tokens[:100], tokens[100:101], tokens[101:]], "val": [np.arange(50) + 7]},
    )


def sample_ids(batch: torch.Tensor) -> list[int]:
    """Sample index of each row (token == position in the synthetic stream)."""
    return [int(row[0]) // T for row in batch]


def test_windows_span_shards(stream_dir):
    shards = TokenShards(stream_dir, "train")
    assert shards.num_tokens == 1003 and shards.eot_id == 0
    for start, length in [(0, 1003), (95, 10), (99, 3), (100, 1), (100, 2), (101, 0), (990, 13)]:
        np.testing.assert_array_equal(shards.window(start, length), np.arange(start, start + length))
    assert all(isinstance(s, np.memmap) for s in shards._shards)
    with pytest.raises(IndexError):
        shards.window(1000, 4)


def test_samples_overlap_by_one_token(stream_dir):
    samples = SampleIndex(TokenShards(stream_dir, "train"), T)
    assert len(samples) == (1003 - 1) // T == 125
    for i in (0, 1, 12, 124):
        np.testing.assert_array_equal(samples[i], np.arange(i * T, i * T + T + 1))
    # targets (window[1:]) are the inputs (window[:-1]) shifted by one
    np.testing.assert_array_equal(samples[3][1:], samples[3][:-1] + 1)
    assert samples[3][-1] == samples[4][0]


def test_real_prepared_data_batches(prepared_data):
    shards = TokenShards(prepared_data, "train")
    manifest = read_manifest(prepared_data)
    assert shards.num_tokens == manifest["splits"]["train"]["num_tokens"] and shards.vocab_size == 512
    batch = next(BatchLoader(shards, seq_len=32, batch_size=4, seed=0))
    assert batch.dtype == torch.int64 and batch.shape == (4, 33)
    assert int(batch.max()) < shards.vocab_size


def test_epoch_covers_every_sample_once_then_rolls_over(stream_dir):
    loader = BatchLoader(TokenShards(stream_dir, "train"), T, batch_size=4, seed=1, world_size=1)
    assert loader.batches_per_epoch == 125 // 4 == 31
    seen = [i for _ in range(31) for i in sample_ids(next(loader))]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 124  # one sample dropped
    assert seen != sorted(seen)  # shuffled
    assert (loader.epoch, loader.sample_index) == (0, 124)
    first_of_epoch1 = sample_ids(next(loader))
    assert (loader.epoch, loader.sample_index) == (1, 4)
    assert first_of_epoch1 == np.random.default_rng([1, 1]).permutation(125)[:4].tolist()
    assert first_of_epoch1 != seen[:4]


def test_ranks_split_the_global_batch(stream_dir):
    shards = TokenShards(stream_dir, "train")
    single = BatchLoader(shards, T, batch_size=6, seed=3)
    ranks = [BatchLoader(shards, T, batch_size=3, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(45):  # crosses two epoch boundaries (20 batches per epoch)
        parts = [next(r) for r in ranks]
        assert not set(sample_ids(parts[0])) & set(sample_ids(parts[1]))
        torch.testing.assert_close(torch.cat(parts), next(single))
    assert single.epoch == ranks[0].epoch == ranks[1].epoch == 2


@pytest.mark.parametrize("new_world_size", [1, 2, 4])
def test_resume_gives_the_identical_next_batch(stream_dir, new_world_size):
    shards = TokenShards(stream_dir, "train")
    loader = BatchLoader(shards, T, batch_size=4, seed=7)
    for _ in range(40):  # into the second epoch
        next(loader)
    state = loader.state_dict()
    assert state == {"epoch": 1, "sample_index": 36, "seed": 7, "seq_len": T, "num_samples": 125}
    expected = torch.cat([next(loader) for _ in range(3)])

    micro = 4 // new_world_size
    resumed = [
        BatchLoader(shards, T, batch_size=micro, seed=999, rank=r, world_size=new_world_size)
        for r in range(new_world_size)
    ]
    for r in resumed:
        r.load_state_dict(state)
    got = torch.cat([torch.cat([next(r) for r in resumed]) for _ in range(3)])
    torch.testing.assert_close(got, expected)


def test_state_of_another_dataset_is_refused(stream_dir):
    shards = TokenShards(stream_dir, "train")
    state = BatchLoader(shards, T, batch_size=4, seed=0).state_dict()
    with pytest.raises(DataError, match="another dataset"):
        BatchLoader(shards, T + 1, batch_size=4, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="another dataset"):
        BatchLoader(shards, T, batch_size=4, seed=0).load_state_dict({**state, "num_samples": 126})


def test_validation_loader_is_deterministic(stream_dir):
    shards = TokenShards(stream_dir, "val")
    a = BatchLoader(shards, T, batch_size=2, seed=0, shuffle=False)
    b = BatchLoader(shards, T, batch_size=2, seed=123, shuffle=False)
    first = next(a)
    np.testing.assert_array_equal(first.numpy(), np.stack([np.arange(0, 9), np.arange(8, 17)]) + 7)
    torch.testing.assert_close(first, next(b))
    epoch = [first, next(a), next(a)]  # 6 samples = exactly 3 batches per epoch, in order
    assert [i for batch in epoch for i in sample_ids(batch - 7)] == [0, 1, 2, 3, 4, 5]
    assert (a.epoch, a.sample_index) == (0, 6)
    torch.testing.assert_close(next(a), first)  # then it starts over
    torch.testing.assert_close(torch.stack([next(b), next(b), next(a)]), torch.stack([epoch[1], epoch[2], epoch[1]]))


def test_split_too_short(stream_dir, prepared_data):
    with pytest.raises(DataError, match=r"val split has 50 tokens, fewer than data.seq_len\+1 = 65"):
        SampleIndex(TokenShards(stream_dir, "val"), 64)
    with pytest.raises(DataError, match="fewer than one batch"):
        BatchLoader(TokenShards(stream_dir, "val"), T, batch_size=4, seed=0, world_size=2)


def test_tokenizer_mismatch(stream_dir):
    save_tokenizer(train_tokenizer(["a different corpus"] * 3, vocab_size=300), stream_dir / "tokenizer.json")
    with pytest.raises(
        DataError,
        match=r"stream/tokenizer.json does not match the shards \(fingerprint .* != .*\); re-run prepare",
    ):
        TokenShards(stream_dir, "train")


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        TokenShards(tmp_path, "train")
