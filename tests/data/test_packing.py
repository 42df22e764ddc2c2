"""Documents packed into windows: no token lost, document ids and masks from end-of-text tokens."""

import numpy as np
import torch

from distllm.config import DataConfig
from distllm.data.loader import SampleIndex, TokenShards, build_train_loader
from distllm.data.packing import document_attention_mask, document_ids
from distllm.data.shards import read_manifest
from distllm.batch_plan import BatchPlan

EOT = 0


def test_document_ids_split_after_each_end_of_text():
    tokens = torch.tensor([[5, 6, EOT, 7, EOT, EOT, 8], [EOT, 1, 2, 3, 4, 5, 6]])
    ids = document_ids(tokens, EOT)
    assert ids.dtype == torch.int32
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]  # an EOT ends its own document


def test_attention_mask_is_causal_within_documents():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = document_attention_mask(ids)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)  # fmt: skip
    assert torch.equal(mask[0, 0], expected)
    single = document_attention_mask(torch.zeros(1, 6, dtype=torch.int32))  # one document = plain causal
    assert torch.equal(single[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_masked_attention_does_not_see_other_documents():
    """An output at a position depends only on the keys/values of its own document."""
    torch.manual_seed(0)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_attention_mask(ids))
    v2 = v.clone()
    v2[:, :, :3] += 100.0  # change document 0 only
    y2 = torch.nn.functional.scaled_dot_product_attention(q, k, v2, attn_mask=document_attention_mask(ids))
    torch.testing.assert_close(y[:, :, 3:], y2[:, :, 3:])
    assert not torch.allclose(y[:, :, :3], y2[:, :, :3])


def test_packing_loses_no_token(prepared_data):
    """Every document of the split ends with EOT in the stream, and the samples tile it (minus < seq_len tokens)."""
    shards = TokenShards(prepared_data, "train")
    manifest = read_manifest(prepared_data)
    stream = shards.window(0, shards.num_tokens)
    assert int((stream == shards.eot_id).sum()) == manifest["splits"]["train"]["num_documents"]
    assert stream[-1] == shards.eot_id
    samples = SampleIndex(shards, 32)
    windows = samples.read(np.arange(len(samples)))  # (N, 33)
    np.testing.assert_array_equal(windows[:, :-1].reshape(-1), stream[: len(samples) * 32])  # inputs tile the stream
    np.testing.assert_array_equal(windows[:, 1:].reshape(-1), stream[1 : len(samples) * 32 + 1])  # and so do targets
    assert shards.num_tokens - len(samples) * 32 - 1 < 32


def test_loader_gives_document_ids_with_document_mask(prepared_data):
    cfg = DataConfig(dir=str(prepared_data), seq_len=32, document_mask=True, prefetch=2)
    with build_train_loader(cfg, BatchPlan(8, 8), seed=0) as loader:
        found_boundary = False
        for _ in range(30):
            window = next(loader)
            assert loader.last_doc_ids.shape == (8, 32)
            assert torch.equal(loader.last_doc_ids, document_ids(window[:, :-1], loader.eot_id))
            found_boundary |= bool((loader.last_doc_ids[:, -1] > 0).any())
        assert found_boundary
    plain = DataConfig(dir=str(prepared_data), seq_len=32)
    with build_train_loader(plain, BatchPlan(8, 8), seed=0) as loader:
        next(loader)
        assert loader.last_doc_ids is None
