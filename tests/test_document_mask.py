"""data.document_mask: attention stays inside each packed document, end to end."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distllm.config import ModelConfig
from distllm.data.loader import SampleIndex, TokenShards
from distllm.data.packing import document_attention_mask, document_ids
from distllm.data.shards import read_manifest, write_manifest, write_shard
from distllm.loss import next_token_loss
from distllm.metrics import read_metrics
from distllm.model import Transformer
from distllm.train import train


def test_a_document_never_sees_the_one_before_it():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, max_seq_len=16)).eval()
    tokens = torch.randint(0, 64, (1, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])  # document 1 starts at position 5
    other = tokens.clone()
    other[0, :5] = torch.randint(0, 64, (5,))  # change only the first document
    mask = document_attention_mask(doc_ids)
    with torch.no_grad():
        a, b = model(tokens, attn_mask=mask), model(other, attn_mask=mask)
        c, d = model(tokens), model(other)
    assert torch.allclose(a[0, 5:], b[0, 5:], atol=1e-6)  # the second document does not see the first
    assert not torch.allclose(c[0, 5:], d[0, 5:], atol=1e-3)  # without the mask it does
    single = torch.zeros_like(doc_ids)  # one document: the mask is the causal mask
    with torch.no_grad():
        assert torch.allclose(model(tokens, attn_mask=document_attention_mask(single)), c, atol=1e-5)


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
