import json
import shutil

import numpy as np
import pytest

from distllm.data.shards import (
    HEADER_SIZE,
    dtype_for_vocab,
    open_shard,
    read_header,
    read_manifest,
    sha256_file,
    verify,
    write_shard,
)
from distllm.errors import DataError
from distllm.tokenizer import save_tokenizer, train_tokenizer

FP = "ab" * 32


@pytest.fixture
def data_dir(prepared_data, tmp_path):
    """A private copy of the prepared tiny data, safe to corrupt."""
    return shutil.copytree(prepared_data, tmp_path / "data")


def test_header_round_trip(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 7
    entry = write_shard(tmp_path / "s.bin", tokens, FP)
    assert entry == {"file": "s.bin", "num_tokens": 1000, "sha256": sha256_file(tmp_path / "s.bin")}
    header = read_header(tmp_path / "s.bin")
    assert (header.version, header.itemsize, header.num_tokens, header.fingerprint) == (1, 2, 1000, FP)
    assert (tmp_path / "s.bin").stat().st_size == HEADER_SIZE + 2000
    assert (tmp_path / "s.bin").read_bytes()[:8] == b"DLLMSHRD"
    shard = open_shard(tmp_path / "s.bin")
    assert isinstance(shard, np.memmap) and shard.dtype == np.uint16
    np.testing.assert_array_equal(shard, tokens)
    assert not list(tmp_path.glob("*.tmp"))


def test_uint16_or_uint32_by_vocab_size(tmp_path):
    assert dtype_for_vocab(512) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32
    tokens = np.array([0, 65535, 65536, 2**32 - 1], dtype=dtype_for_vocab(200_000))
    write_shard(tmp_path / "big.bin", tokens, FP)
    assert read_header(tmp_path / "big.bin").itemsize == 4
    np.testing.assert_array_equal(open_shard(tmp_path / "big.bin"), tokens)


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.uint16), FP)
    assert len(open_shard(tmp_path / "e.bin")) == 0


def test_corrupt_magic_names_the_file(tmp_path):
    path = tmp_path / "bad_magic.bin"
    write_shard(path, np.arange(10, dtype=np.uint16), FP)
    raw = bytearray(path.read_bytes())
    raw[:8] = b"NOTASHRD"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="bad_magic.bin.*not a distllm shard"):
        open_shard(path)


@pytest.mark.parametrize("keep", [HEADER_SIZE + 19, 10])
def test_truncated_shard_names_the_file(tmp_path, keep):
    path = tmp_path / "short.bin"
    write_shard(path, np.arange(10, dtype=np.uint16), FP)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(DataError, match="short.bin.*truncated"):
        open_shard(path)


def test_wrong_version_and_missing_shard(tmp_path):
    path = tmp_path / "v2.bin"
    write_shard(path, np.arange(10, dtype=np.uint16), FP)
    raw = bytearray(path.read_bytes())
    raw[8] = 2
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="v2.bin.*version 2"):
        read_header(path)
    with pytest.raises(DataError, match="nothere.bin"):
        open_shard(tmp_path / "nothere.bin")


def test_verify_accepts_a_prepared_dir(data_dir):
    manifest = verify(data_dir, check_hashes=True)
    assert manifest["splits"]["train"]["num_tokens"] > 0


def test_verify_wrong_fingerprint_in_shard(data_dir):
    path = data_dir / "val_000000.bin"
    raw = bytearray(path.read_bytes())
    raw[24] ^= 0xFF  # first byte of the fingerprint
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="val_000000.bin.*another tokenizer"):
        verify(data_dir)


def test_verify_tokenizer_json_replaced(data_dir):
    save_tokenizer(train_tokenizer(["some other text entirely"] * 3, vocab_size=300), data_dir / "tokenizer.json")
    with pytest.raises(DataError, match="tokenizer.json does not match the shards"):
        verify(data_dir)


def test_verify_sha256_mismatch_only_with_check_hashes(data_dir):
    path = data_dir / "train_000000.bin"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # flip one token bit: header and size still fine
    path.write_bytes(bytes(raw))
    verify(data_dir, check_hashes=False)
    with pytest.raises(DataError, match="train_000000.bin.*sha256"):
        verify(data_dir, check_hashes=True)


def test_verify_token_count_and_missing_shard(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["num_tokens"] += 1
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="val_000000.bin.*manifest.json says"):
        verify(data_dir)
    (data_dir / "val_000000.bin").unlink()
    with pytest.raises(DataError, match="val_000000.bin"):
        verify(data_dir)


def test_manifest_missing_or_malformed(tmp_path, data_dir):
    with pytest.raises(DataError, match=r"no manifest.json in .* run `distllm prepare CONFIG` first"):
        read_manifest(tmp_path / "empty")
    (data_dir / "manifest.json").write_text("{truncated")
    with pytest.raises(DataError, match="manifest.json is not valid JSON"):
        read_manifest(data_dir)
    (data_dir / "manifest.json").write_text(json.dumps({"format_version": 1, "source": "x"}))
    with pytest.raises(DataError, match="manifest.json is malformed.*missing tokenizer"):
        read_manifest(data_dir)
