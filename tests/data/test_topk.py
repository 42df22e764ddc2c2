"""Teacher top-k shards: written by sample index, read back exactly, checked before use."""

import json

import numpy as np
import pytest
import torch

from distllm.data.topk import (
    MANIFEST,
    TeacherTopK,
    TopKMeta,
    TopKWriter,
    write_topk_manifest,
    write_topk_shard,
)
from distllm.distill import teacher_topk
from distllm.errors import DataError

N, T, K, V = 11, 6, 4, 300


def meta(**kw) -> TopKMeta:
    return TopKMeta(**{"k": K, "temperature": 2.0, "seq_len": T, "num_samples": N, "data_id": "d" * 64,
                       "tokenizer_fingerprint": "f" * 64, "vocab_size": V, "teacher": {"run": "runs/teacher"},
                       **kw})


def teacher_outputs(n=N, vocab=V):
    logits = torch.randn(n, T, vocab, generator=torch.Generator().manual_seed(0)) * 3
    return [t.numpy() for t in teacher_topk(logits, K, temperature=2.0)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_by_sample_index(tmp_path, dtype):
    ids, lp, tail = teacher_outputs()
    w = TopKWriter(tmp_path, meta(logprobs_dtype=dtype), samples_per_shard=4)
    for a, b in ((0, 3), (3, 4), (4, 11)):  # any number of samples per call
        w.write(ids[a:b], lp[a:b], tail[a:b])
    w.close()
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert [(s["first_sample"], s["num_samples"]) for s in manifest["shards"]] == [(0, 4), (4, 4), (8, 3)]
    assert manifest["ids_dtype"] == "uint16" and manifest["temperature"] == 2.0 and manifest["k"] == K
    reader = TeacherTopK(tmp_path, data_id="d" * 64, seq_len=T, temperature=2.0)
    order = np.array([10, 0, 5, 4, 3, 10])
    got = reader.read(order)
    assert got["teacher_topk_ids"].dtype == np.int64 and got["teacher_topk_logprobs"].dtype == np.float32
    assert np.array_equal(got["teacher_topk_ids"], ids[order])
    tol = 0 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(got["teacher_topk_logprobs"], lp[order], rtol=tol, atol=tol)
    np.testing.assert_allclose(got["teacher_topk_tail"], tail[order], rtol=tol, atol=tol)


def test_a_large_vocabulary_stores_int32_ids(tmp_path):
    ids, lp, tail = teacher_outputs(n=2, vocab=70_000)
    m = meta(num_samples=2, vocab_size=70_000)
    write_topk_manifest(tmp_path, m, [write_topk_shard(tmp_path / "s.safetensors", m, 0, ids, lp, tail)])
    assert json.loads((tmp_path / MANIFEST).read_text())["ids_dtype"] == "int32"
    assert np.array_equal(TeacherTopK(tmp_path).read(np.array([1, 0]))["teacher_topk_ids"], ids[[1, 0]])


def test_shards_written_apart_must_cover_every_sample_once(tmp_path):
    ids, lp, tail = teacher_outputs()
    m = meta()
    a = write_topk_shard(tmp_path / "b.safetensors", m, 6, ids[6:], lp[6:], tail[6:])  # e.g. by another rank
    b = write_topk_shard(tmp_path / "a.safetensors", m, 0, ids[:5], lp[:5], tail[:5])
    with pytest.raises(ValueError, match="gap or overlap at sample 5"):
        write_topk_manifest(tmp_path, m, [a, b])
    c = write_topk_shard(tmp_path / "c.safetensors", m, 5, ids[5:6], lp[5:6], tail[5:6])
    write_topk_manifest(tmp_path, m, [a, b, c])
    assert np.array_equal(TeacherTopK(tmp_path).read(np.arange(N))["teacher_topk_ids"], ids)
    with pytest.raises(ValueError, match="cover 11 samples, the data has 12"):
        write_topk_manifest(tmp_path, meta(num_samples=12), [a, b, c])


def test_wrong_data_corruption_and_missing_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no topk.json"):
        TeacherTopK(tmp_path)
    ids, lp, tail = teacher_outputs()
    w = TopKWriter(tmp_path, meta(), samples_per_shard=6)
    w.write(ids, lp, tail)
    w.close()
    with pytest.raises(DataError, match="data_id"):
        TeacherTopK(tmp_path, data_id="e" * 64)
    with pytest.raises(DataError, match="temperature = 2.0, this run has 1.0"):
        TeacherTopK(tmp_path, temperature=1.0)

    shard = tmp_path / "topk-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF  # one byte of the last sample's tail
    shard.write_bytes(bytes(raw))
    reader = TeacherTopK(tmp_path)
    reader.read(np.array([0, 5]))  # the first shard is intact
    with pytest.raises(DataError, match="topk-00001.safetensors is corrupt: its sha256"):
        reader.read(np.array([6]))
    shard.unlink()
    with pytest.raises(DataError, match="shard not found"):
        TeacherTopK(tmp_path).read(np.array([7]))
    with pytest.raises(IndexError):
        reader.read(np.array([N]))
