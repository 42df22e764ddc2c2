"""Every shard is checked against the manifest before its tokens are used: corrupt, truncated,
wrong-tokenizer and out-of-vocabulary shards are refused with an error naming the file."""

import json
import shutil

import numpy as np
import pytest
from synthetic import stream_dir

import distllm.data.loader as loader_module
from distllm.config import DataConfig
from distllm.data.loader import TokenShards, build_train_loader
from distllm.data.shards import HEADER_SIZE, read_manifest, write_manifest, write_shard
from distllm.errors import ConfigError, DataError
from distllm.batch_plan import BatchPlan

SHARD = "train_000000.bin"


@pytest.fixture
def data_dir(prepared_data, tmp_path):
    """A private copy of the prepared tiny data (vocabulary 512, one train shard), safe to corrupt."""
    return shutil.copytree(prepared_data, tmp_path / "data")


def first_batch(data_dir, prefetch=0, verify=True, vocab_limit=None):
    cfg = DataConfig(dir=str(data_dir), seq_len=32, prefetch=prefetch, verify_shards=verify)
    with build_train_loader(cfg, BatchPlan(4, 4), seed=0, vocab_limit=vocab_limit) as loader:
        return next(loader)


def replace_shard(data_dir, tokens: np.ndarray, fingerprint: str | None = None) -> None:
    """Rewrite the train shard with ``tokens`` and record it in the manifest (a consistent, hash-valid entry)."""
    manifest = read_manifest(data_dir)
    fp = fingerprint or manifest["tokenizer"]["fingerprint"]
    entry = write_shard(data_dir / SHARD, tokens.astype(np.uint16), fp)
    manifest["splits"]["train"].update(num_tokens=entry["num_tokens"], shards=[entry])
    write_manifest(data_dir, manifest)


def flip_byte(path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_flipped_byte_is_refused_naming_the_shard(data_dir, prefetch):
    flip_byte(data_dir / SHARD, HEADER_SIZE + 2 * 20_000)  # a low bit of one token: still a valid id
    with pytest.raises(DataError, match=rf"shard .*data/{SHARD} is corrupt: its sha256 \w+ differs from the \w+ "
                                        r"recorded in manifest.json"):
        first_batch(data_dir, prefetch=prefetch)


def test_truncated_shard_is_refused(data_dir):
    path = data_dir / SHARD
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=rf"shard .*{SHARD} is truncated"):
        first_batch(data_dir)


def test_shard_of_another_tokenizer_is_refused(data_dir):
    tokens = np.fromfile(data_dir / SHARD, dtype=np.uint16, offset=HEADER_SIZE)
    replace_shard(data_dir, tokens, fingerprint="ab" * 32)  # the manifest's sha256 matches this file
    with pytest.raises(DataError, match=rf"shard .*{SHARD} was made with another tokenizer"):
        first_batch(data_dir)


@pytest.mark.parametrize("verify", [True, False])
def test_out_of_vocabulary_token_is_refused_with_shard_and_offset(data_dir, verify):
    tokens = np.fromfile(data_dir / SHARD, dtype=np.uint16, offset=HEADER_SIZE).copy()
    tokens[1234] = 600  # >= the 512-token vocabulary; the manifest's sha256 matches the new file
    replace_shard(data_dir, tokens)
    cfg = DataConfig(dir=str(data_dir), seq_len=32, prefetch=0, verify_shards=verify)
    with pytest.raises(DataError, match=rf"shard .*{SHARD} holds token id 600 at token offset 1234, outside the "
                                        r"vocabulary of 512 ids"):
        with build_train_loader(cfg, BatchPlan(8, 8), seed=0) as loader:
            for _ in range(200):  # without verification: found when the window holding it is read
                next(loader)


def test_model_vocabulary_below_the_data_is_a_config_error(data_dir):
    with pytest.raises(ConfigError, match=r"model.vocab_size \(256\) is smaller than the vocabulary the data in .* "
                                          r"was made with \(512\); set --model.vocab_size=512"):
        first_batch(data_dir, vocab_limit=256)


def test_start_up_reads_no_shard_and_each_is_verified_once(tmp_path, prepared_data, monkeypatch):
    """Shards are verified lazily on first use (in background threads), once per shard per run."""
    data = stream_dir(tmp_path / "stream", prepared_data, 4003, 200)  # 21 shards
    manifest = read_manifest(data)
    bad = manifest["splits"]["train"]["shards"][7]["file"]
    calls = []
    real = loader_module.verify_shard
    def counting(path, *args, **kwargs):
        calls.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loader_module, "verify_shard", counting)

    missing = {e["file"]: (data / e["file"]).read_bytes() for e in manifest["splits"]["train"]["shards"]}
    for name in missing:
        (data / name).unlink()
    shards = TokenShards(data, "train")  # start-up: manifest and tokenizer only
    assert calls == [] and shards.num_shards == 21
    with pytest.raises(DataError, match=r"shard not found: .*train_000002.bin; re-run `distllm prepare`"):
        shards.window(2 * 200 + 5, 3)
    for name, raw in missing.items():
        (data / name).write_bytes(raw)
    flip_byte(data / bad, HEADER_SIZE + 10)

    shards = TokenShards(data, "train")
    np.testing.assert_array_equal(shards.window(150, 100), np.arange(150, 250))  # shards 0 and 1
    with pytest.raises(DataError, match=rf"{bad} is corrupt"):
        shards.window(7 * 200 + 3, 2)
    calls.clear()
    cfg = DataConfig(dir=str(data), seq_len=8, prefetch=0)
    (data / bad).write_bytes(missing[bad])
    with build_train_loader(cfg, BatchPlan(16, 16), seed=0) as loader:
        for _ in range(60):  # two epochs: every shard read many times
            next(loader)
    assert sorted(calls) == sorted(missing)  # every shard verified, each exactly once


def test_manifest_lists_fewer_tokens_than_the_shards(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["splits"]["train"]["num_tokens"] += 1
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    listed = r"the train shards listed in .*manifest.json hold (\d+) tokens, but it says (?!\1)\d+"
    with pytest.raises(DataError, match=listed):
        TokenShards(data_dir, "train")
