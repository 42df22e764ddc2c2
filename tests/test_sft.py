"""``distllm sft``: instruction fine-tuning through the one training loop.

A tiny base model is pretrained for a few steps on the tiny corpus; SFT runs start from it
(``sft.init_from``) on a handful of Alpaca records whose responses have very different lengths, so
micro-batches hold different numbers of counted tokens."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distllm import checkpoint
from distllm.__main__ import main
from distllm.chat import load_chat_template
from distllm.config import from_dict, save_config
from distllm.data.instructions import read_examples
from distllm.data.sft import SFTDataset, split_examples, tokenize_examples
from distllm.tokenizer import eot_id, load_tokenizer, save_tokenizer, train_tokenizer

from distributed_runs import env, free_port

MODEL = {"n_layers": 2, "n_heads": 2, "d_model": 64, "vocab_size": 512, "max_seq_len": 64}
WORDS = "the quick brown fox jumps over a lazy dog while python reads every file and returns its value".split()
PAIRS = [(f"Task {i}: say {WORDS[i % len(WORDS)]}.", " ".join(WORDS[i % 7 : i % 7 + 1 + (i * 5) % 13]))
         for i in range(24)]  # responses of 1 to 13 words


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory, prepared_data) -> Path:
    """A committed checkpoint of a tiny model pretrained for 4 steps on the tiny corpus (vocabulary 512)."""
    root = tmp_path_factory.mktemp("sft_base")
    cfg = {"run": {"dir": str(root / "run")}, "data": {"dir": str(prepared_data), "seq_len": 32},
           "model": MODEL, "tokenizer": {"vocab_size": 512},
           "train": {"micro_batch_size": 4, "global_batch_size": 4, "max_steps": 4, "eval_every": 0, "device": "cpu"},
           "optim": {"warmup_steps": 1}, "logging": {"tensorboard": False, "progress": False}}
    save_config(from_dict(cfg), root / "base.yaml")
    assert main(["train", str(root / "base.yaml")]) == 0
    return checkpoint.latest(root / "run")


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft_data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS))
    return path


def sft_config(tmp_path: Path, base: Path, data: Path, **sections) -> Path:
    """A run file for ``distllm sft`` from ``base`` on ``data``; ``sections`` update the defaults."""
    raw = {"run": {"dir": str(tmp_path / "run")}, "data": {"seq_len": 48}, "model": dict(MODEL),
           "tokenizer": {"vocab_size": 512},
           "sft": {"init_from": str(base), "data": str(data), "val_fraction": 0.15, "packing": False,
                   "eval_prompts": 2, "max_new_tokens": 20},
           "train": {"micro_batch_size": 4, "global_batch_size": 4, "max_steps": 4, "eval_every": 0,
                     "eval_batches": 2, "device": "cpu"},
           "optim": {"warmup_steps": 1, "lr": 3e-3},
           "checkpoint": {"every_minutes": 0, "keep_last": 5},
           "logging": {"log_every": 1, "tensorboard": False, "progress": False, "trace_samples": True}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sft.yaml"
    save_config(from_dict(raw), path)
    return path


def launch(config: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distllm", "sft", str(config), *overrides]
    if nproc > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port()), "-m", "distllm"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def train_rows(base: Path, data: Path, seq_len: int = 48) -> SFTDataset:
    """The training rows a run with ``sft_config``'s settings builds (one example per row)."""
    tok = load_tokenizer(base / "tokenizer.json")
    train, _ = split_examples(list(read_examples(str(data))), 0.15, "test")
    return SFTDataset(tokenize_examples(train, tok, load_chat_template(None), seq_len), seq_len, eot_id(tok),
                      packing=False)


# ---------------------------------------------------------------------------- loss normalisation


def test_accumulation_and_processes_give_the_same_loss_and_gradients(base, instructions, tmp_path):
    """Global batch 4 as 1 x 4 (one process, one micro-batch), 4 x 1 (one process, accumulation 4) and
    2 processes x accumulation 2: the same response-only loss and gradient norm at every step, and the same
    weights after 4 steps, although the micro-batches hold different numbers of response tokens."""
    runs = {}
    for name, nproc, micro in (("1x4", 1, 4), ("4x1", 1, 1), ("2proc", 2, 1)):
        config = sft_config(tmp_path / name, base, instructions, train={"micro_batch_size": micro})
        launch(config, nproc)
        runs[name] = tmp_path / name / "run"
    rows = train_rows(base, instructions)
    counts = (rows.read(np.arange(rows.num_samples))["labels"] != -100).sum(1)  # response tokens per row
    trace = {json.loads(line)["step"]: json.loads(line)["samples"]
             for line in (runs["4x1"] / "samples" / "rank00000.jsonl").read_text().splitlines()}
    assert all(len(set(counts[trace[s]].tolist())) > 1 for s in trace), "micro-batches of equal response lengths"
    ranks = [json.loads(f.read_text().splitlines()[0])["samples"] for f in sorted((runs["2proc"] / "samples").iterdir())]
    assert sorted(ranks[0] + ranks[1]) == sorted(trace[1])  # the same global batch, split over the ranks

    def steps(run):
        return {r["step"]: r for r in _records(run) if "grad_norm" in r}

    ref = steps(runs["1x4"])
    assert sorted(ref) == [1, 2, 3, 4]
    for name in ("4x1", "2proc"):
        other = steps(runs[name])
        for s in ref:
            assert other[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), (name, s)
            assert other[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), (name, s)
        a, b = load_file(checkpoint.latest(runs["1x4"]) / "model.safetensors"), \
            load_file(checkpoint.latest(runs[name]) / "model.safetensors")
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
