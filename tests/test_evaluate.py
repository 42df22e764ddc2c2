"""Validation: bits per byte next to the loss, and the document mask honoured as in training."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distllm.config import ModelConfig
from distllm.data.loader import TokenShards
from distllm.data.packing import document_ids
from distllm.evaluate import ValidationSet, validation_metrics
from distllm.model import Transformer
from distllm.tokenizer import load_tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, n_layers=2, n_heads=2, d_model=64, max_seq_len=64, init_std=0.3)  # peaked
    return Transformer(cfg).eval()


def test_bits_per_byte_is_the_loss_over_ln2_times_bytes_per_token(model, prepared_data):
    shards = TokenShards(prepared_data, "val")
    val = ValidationSet(shards, SEQ, micro_batch_size=3, eval_batches=2)  # 6 samples, 2 batches
    got = validation_metrics(model, val, torch.device("cpu"))

    # independently: the same windows, plain cross-entropy, and the bytes of the decoded targets
    n = val.num_samples
    stream = shards.window(0, n * SEQ + 1)  # sample i = stream[i*T : i*T + T + 1]: the targets are stream[1:]
    windows = torch.from_numpy(np.stack([stream[i * SEQ : i * SEQ + SEQ + 1] for i in range(n)]))
    with torch.no_grad():
        logits = model(windows[:, :-1])
    nats = F.cross_entropy(logits.flatten(0, 1).double(), windows[:, 1:].flatten(), reduction="sum").item()
    text = load_tokenizer(shards.tokenizer_path).decode(stream[1:].tolist(), skip_special_tokens=True)
    assert "\ufffd" not in text  # the targets begin and end on whole characters: the byte count is exact
    bytes_per_token = len(text.encode("utf-8")) / (n * SEQ)
    loss = nats / (n * SEQ)
    assert got["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert got["val_bpb"] == pytest.approx(loss / (math.log(2) * bytes_per_token), rel=1e-6)
    assert got["val_ppl"] == pytest.approx(math.exp(loss), rel=1e-6)


def test_validation_with_the_document_mask_attends_within_documents(model, prepared_data):
    shards = TokenShards(prepared_data, "val")
    plain = ValidationSet(shards, 64, 8, 4)  # 32 samples of 64 tokens: past the first document boundaries
    masked = ValidationSet(shards, 64, 8, 4, document_mask=True)
    windows = torch.cat([t for t, _, _ in plain.batches()])
    docs = torch.cat([d for _, _, d in masked.batches()])
    assert torch.equal(docs, document_ids(windows[:, :-1], shards.eot_id))  # as the training loader makes them
    assert (docs[:, -1] > 0).sum() >= 1  # some sample packs more than one document
    a = validation_metrics(model, plain, torch.device("cpu"))["val_loss"]
    b = validation_metrics(model, masked, torch.device("cpu"))["val_loss"]
    assert a != pytest.approx(b, rel=1e-4)

    # the masked loss is each document's own loss: every piece run alone (RoPE only sees distances)
    nats, count = 0.0, 0
    with torch.no_grad():
        for window, d in zip(windows, docs):
            for k in d.unique().tolist():
                pos = (d == k).nonzero().flatten()
                piece = window[pos[0] : pos[-1] + 2]  # inputs of document k and their targets
                logits = model(piece[None, :-1])[0]
                nats += F.cross_entropy(logits.double(), piece[1:], reduction="sum").item()
                count += len(pos)
    assert b == pytest.approx(nats / count, rel=1e-5)


def test_eval_reports_bits_per_byte_and_the_document_mask(tiny_config, capsys):
    import json

    from distllm.__main__ import main
    from distllm.train import train

    tiny_config.train.max_steps, tiny_config.train.eval_every, tiny_config.optim.warmup_steps = 2, 1, 1
    tiny_config.data.document_mask = True
    train(tiny_config)
    records = [json.loads(x) for x in (Path(tiny_config.run.dir) / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert len(val) == 3 and all(r["val_bpb"] > 0 for r in val)  # steps 0, 1, 2 in metrics.jsonl
    capsys.readouterr()  # the training log
    assert main(["eval", tiny_config.run.dir]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["document_mask"] is True and report["val_bpb"] == pytest.approx(val[-1]["val_bpb"], rel=1e-5)
