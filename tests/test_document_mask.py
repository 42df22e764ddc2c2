"""data.document_mask: attention stays inside each packed document, end to end.

The model builds the restriction from ``doc_ids`` itself: a dense (B, 1, T, T) mask for SDPA on CPU,
a FlexAttention block mask on CUDA (``kernels.use_flex_attention``). torch 2.13's FlexAttention runs a
forward on CPU but no backward, so the two are compared on CPU in eval mode (the model forced onto
the flex path) and with gradients on a GPU (``gpu`` test)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distllm.config import ModelConfig
from distllm.data.loader import SampleIndex, TokenShards
from distllm.data.packing import document_attention_mask, document_block_mask, document_ids
from distllm.data.shards import read_manifest, write_manifest, write_shard
from distllm.loss import next_token_loss
from distllm.metrics import read_metrics
from distllm.model import Transformer, kernels
from distllm.train import train

# three rows: several documents (one spans a 128-token block boundary), one document, a document per token
DOC_IDS = torch.tensor([[0] * 5 + [1] * 130 + [2] * 25, [0] * 160, list(range(160))])


def tiny_model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=128, max_seq_len=160,
                init_std=0.1)  # head_dim 32: flex on CUDA needs >= 16
    return Transformer(ModelConfig(**{**base, **kw}))


def test_a_document_never_sees_the_one_before_it():
    model = tiny_model(max_seq_len=16).eval()
    tokens = torch.randint(0, 64, (1, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])  # document 1 starts at position 5
    other = tokens.clone()
    other[0, :5] = torch.randint(0, 64, (5,))  # change only the first document
    with torch.no_grad():
        a, b = model(tokens, doc_ids=doc_ids), model(other, doc_ids=doc_ids)
        c, d = model(tokens), model(other)
    assert torch.allclose(a[0, 5:], b[0, 5:], atol=1e-6)  # the second document does not see the first
    assert not torch.allclose(c[0, 5:], d[0, 5:], atol=1e-3)  # without the mask it does
    with torch.no_grad():  # one document: the mask is the causal mask
        assert torch.allclose(model(tokens, doc_ids=torch.zeros_like(doc_ids)), c, atol=1e-5)


def test_doc_ids_equal_an_explicit_dense_mask_in_training():
    model = tiny_model().train()
    tokens = torch.randint(0, 64, (3, 161), generator=torch.Generator().manual_seed(1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    results = []
    for kwargs in ({"doc_ids": DOC_IDS}, {"attn_mask": document_attention_mask(DOC_IDS)}):
        model.zero_grad()
        loss = model(inputs, labels=labels, **kwargs)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="doc_ids"):
        model(inputs, doc_ids=DOC_IDS, attn_mask=document_attention_mask(DOC_IDS))


def test_cpu_uses_the_dense_mask_and_cuda_flex():
    assert not kernels.use_flex_attention("cpu") and kernels.use_flex_attention("cuda")
    assert isinstance(kernels.document_mask(DOC_IDS), torch.Tensor)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_flex_block_mask_equals_the_dense_mask_forward(monkeypatch):
    """The model forced onto FlexAttention (eager, unfused reference kernel on CPU) gives the dense-mask
    logits and loss; the block mask's element-wise mask is the dense mask."""
    from torch.nn.attention.flex_attention import BlockMask

    block = document_block_mask(DOC_IDS)
    assert isinstance(block, BlockMask)
    assert torch.equal(dense_of(block), document_attention_mask(DOC_IDS)[:, 0])
    model = tiny_model().eval()
    tokens = torch.randint(0, 64, (3, 161), generator=torch.Generator().manual_seed(2))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        dense = model(inputs, doc_ids=DOC_IDS)
        dense_loss = model(inputs, doc_ids=DOC_IDS, labels=labels)
        monkeypatch.setattr(kernels, "use_flex_attention", lambda device_type: True)
        assert isinstance(kernels.document_mask(DOC_IDS), BlockMask)
        flex = model(inputs, doc_ids=DOC_IDS)
        flex_loss = model(inputs, doc_ids=DOC_IDS, labels=labels)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flex_loss, dense_loss, rtol=1e-5, atol=1e-5)


def dense_of(block) -> torch.Tensor:
    """The element-wise (B, T, T) mask a BlockMask stands for (its mask_mod evaluated everywhere)."""
    from torch.nn.attention.flex_attention import create_mask

    B, T = DOC_IDS.shape
    return create_mask(block.mask_mod, B, None, T, T, device="cpu")[:, 0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_flex_attention_on_cuda_equals_the_dense_mask_with_gradients(dtype):
    """On CUDA the model runs FlexAttention (compiled) for doc_ids: logits, loss and gradients match the
    dense-mask SDPA path."""
    from torch.nn.attention.flex_attention import BlockMask

    doc_ids = DOC_IDS.cuda()
    assert isinstance(kernels.document_mask(doc_ids), BlockMask)
    model = tiny_model().cuda().to(dtype).train()
    tokens = torch.randint(0, 64, (3, 161), generator=torch.Generator().manual_seed(3)).cuda()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    results = []
    for kwargs in ({"doc_ids": doc_ids}, {"attn_mask": document_attention_mask(doc_ids)}):
        model.zero_grad()
        loss = model(inputs, labels=labels, **kwargs)
        loss.backward()
        results.append((loss.detach().float(), [p.grad.float().clone() for p in model.parameters()]))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(results[0][0], results[1][0], rtol=tol, atol=tol)
    for a, b in zip(results[0][1], results[1][1]):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < tol * 2


@pytest.fixture
def short_documents(tmp_path, prepared_data):
    """``prepared_data`` with its train stream cut into documents of 11 tokens plus an end-of-text: every
    training window holds document boundaries (the real documents are hundreds of tokens long)."""
    out = tmp_path / "short_documents"
    shutil.copytree(prepared_data, out)
    manifest = read_manifest(out)
    train = TokenShards(prepared_data, "train")
    stream = train.window(0, train.num_tokens)
    stream = np.insert(stream, np.arange(11, len(stream), 11), train.eot_id).astype(np.uint16)
    for entry in manifest["splits"]["train"]["shards"]:
        (out / entry["file"]).unlink()
    entry = write_shard(out / "train_000000.bin", stream, manifest["tokenizer"]["fingerprint"])
    manifest["splits"]["train"] = {"num_tokens": len(stream), "num_documents": int((stream == train.eot_id).sum()),
                                   "shards": [entry]}
    write_manifest(out, manifest)
    return out


def test_training_with_document_masking(tiny_config, short_documents):
    """data.document_mask reaches the training loss: step 1 logs the masked loss of the initial model on
    that step's samples (not the unmasked one), and the run trains."""
    cfg = tiny_config
    cfg.data.dir, cfg.data.document_mask = str(short_documents), True
    cfg.train.max_steps, cfg.train.eval_every, cfg.optim.lr = 6, 0, 3e-3
    cfg.logging.trace_samples, cfg.logging.log_every = True, 1
    train(cfg)
    run_dir = Path(cfg.run.dir)
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "lr" in r]
    first = json.loads((run_dir / "samples" / "rank00000.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    shards = TokenShards(short_documents, "train")
    window = torch.from_numpy(SampleIndex(shards, cfg.data.seq_len).read(np.array(first["samples"])))  # (B, T+1)
    doc_ids = document_ids(window[:, :-1], shards.eot_id)  # (B, T)
    assert (doc_ids[:, -1] >= 2).all()  # every window holds documents
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)  # the run's initial model
    with torch.no_grad():
        masked, plain = next_token_loss(model, window, doc_ids).item(), next_token_loss(model, window).item()
    assert losses[0] == pytest.approx(masked, rel=1e-6)
    assert losses[0] != pytest.approx(plain, rel=1e-5)
    assert losses[-1] < losses[0] - 0.15  # and it trained
