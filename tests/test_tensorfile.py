"""distllm/tensorfile.py: one pass writes a safetensors file, its sha256 and its fsync."""

from __future__ import annotations

import errno
import hashlib
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

from distllm import tensorfile


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(300, 70, generator=g),  # 84,000 bytes: many chunks when CHUNK is small
        "half": torch.randn(33, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(1000, dtype=torch.int64),
        "t": torch.randn(40, 30, generator=g).t(),  # not contiguous
    }


@pytest.mark.parametrize("hash_thread", [True, False])
def test_write_is_a_safetensors_file_with_its_sha256(tmp_path, monkeypatch, hash_thread):
    monkeypatch.setattr(tensorfile, "HASH_THREAD", hash_thread)
    monkeypatch.setattr(tensorfile, "CHUNK", 4096)  # many chunks, and a writeback hint every 3 of them
    monkeypatch.setattr(tensorfile, "WRITEBACK", 3 * 4096)
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    size, sha = tensorfile.write(path, tensors, metadata={"format": "pt"})
    data = path.read_bytes()
    assert size == len(data)
    assert sha == hashlib.sha256(data).hexdigest()
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_full_disk_raises_and_leaves_no_hashing_thread(monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.setattr(tensorfile, "CHUNK", 4096)
    before = {t for t in threading.enumerate() if t.name == "sha256"}
    with pytest.raises(OSError) as info:
        tensorfile.write("/dev/full", _tensors())
    assert info.value.errno == errno.ENOSPC
    assert {t for t in threading.enumerate() if t.name == "sha256"} == before


def test_a_file_that_cannot_be_opened_starts_no_hashing_thread(tmp_path, monkeypatch):
    started = []

    class Spy(tensorfile._Hasher):
        def __init__(self, *args):
            started.append(True)
            super().__init__(*args)

    monkeypatch.setattr(tensorfile, "_Hasher", Spy)
    with pytest.raises(FileNotFoundError):
        tensorfile.write(tmp_path / "no-such-dir" / "x.safetensors", _tensors())
    assert not started
    tensorfile.write(tmp_path / "x.safetensors", _tensors())
    assert started  # the spy sees the thread where there is one
