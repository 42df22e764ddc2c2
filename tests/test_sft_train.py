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

from distributed_runs import env, free_port, tensors

MODEL = {"n_layers": 2, "n_heads": 2, "d_model": 64, "vocab_size": 512, "max_seq_len": 64}
WORDS = "the quick brown fox jumps over a lazy dog while python reads every file and returns its value".split()
PAIRS = [(f"Task {i}: say {WORDS[i % len(WORDS)]}.", " ".join(WORDS[i % 7 : i % 7 + 1 + (i * 5) % 13]))
         for i in range(24)]  # responses of 1 to 13 words
SHORT = [("Name a colour.", "Red."), ("Add two and three.", "Five, of course."), ("Say hello in German.", "Hallo!"),
         ("Count to three.", "one two three"), ("Spell cat.", "c a t"), ("What is python?", "A language."),
         ("Greet me.", "Hello there."), ("Say yes.", "Yes.")]  # none is truncated at 64 tokens


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


def sft_config(tmp_path: Path, base: Path, records: Path, **sections) -> Path:
    """A run file for ``distllm sft`` from ``base`` on ``records``; ``sections`` update the defaults."""
    raw = {"run": {"dir": str(tmp_path / "run")}, "data": {"seq_len": 48}, "model": dict(MODEL),
           "tokenizer": {"vocab_size": 512},
           "sft": {"init_from": str(base), "data": str(records), "val_fraction": 0.15, "packing": False,
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
    """Global batch 4 as 1 x 4 (one process, one micro-batch), 4 x 1 (one process, accumulation 4),
    2 processes x accumulation 2 (DDP) and 2 processes x 1 under ZeRO-3: the same response-only loss and
    gradient norm at every step, and the same weights after 4 steps, although the micro-batches hold
    different numbers of response tokens. sft.init_from's weights reach every engine, and the greedy answers
    of the last evaluation (generated by every rank under ZeRO-3, whose forward is collective) are written."""
    runs = {}
    for name, nproc, micro, extra in (("1x4", 1, 4, []), ("4x1", 1, 1, []), ("2proc", 2, 1, []),
                                      ("zero3", 2, 2, ["--distributed.zero_stage=3"])):
        config = sft_config(tmp_path / name, base, instructions, train={"micro_batch_size": micro})
        launch(config, nproc, *extra)
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
    for name in ("4x1", "2proc", "zero3"):
        other = steps(runs[name])
        for s in ref:
            assert other[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), (name, s)
            assert other[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), (name, s)
        a, b = tensors(checkpoint.latest(runs["1x4"]), "model"), tensors(checkpoint.latest(runs[name]), "model")
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        answers = (runs[name] / "answers" / "step_000004.jsonl").read_text().splitlines()
        assert len(answers) >= 1 and all(json.loads(line)["new_tokens"] > 0 for line in answers)


# ---------------------------------------------------------------------------- fine-tuning end to end


def test_sft_command_learns_the_responses_and_writes_answers(base, tmp_path, capsys):
    """`distllm sft` through the CLI: a tiny model fine-tuned on 8 records reproduces each trained response
    greedily and stops at the end-of-sequence token (also through `distllm generate --chat` on the run);
    every evaluation writes the held-out prompts' greedy answers; the response-only validation loss is logged
    before and after; the checkpoint carries the tokenizer and the chat template."""
    data = tmp_path / "eight.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in SHORT))
    config = sft_config(tmp_path, base, data, data={"seq_len": 64}, train={"max_steps": 80, "eval_every": 40},
                        optim={"lr": 1e-2, "warmup_steps": 5, "schedule": "constant", "weight_decay": 0.0},
                        sft={"eval_prompts": 1, "max_new_tokens": 24})
    assert main(["sft", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"initialised from {base} (weights only)" in out
    assert "sft data: train 7 examples (0 truncated, 0 dropped)" in out
    run = tmp_path / "run"
    val = [r for r in _records(run) if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 40, 80]
    assert val[-1]["val_response_tokens"] == val[0]["val_response_tokens"] > 0
    files = sorted(p.name for p in (run / "answers").iterdir())
    assert files == ["step_000000.jsonl", "step_000040.jsonl", "step_000080.jsonl"]
    answers = [json.loads(line) for line in (run / "answers" / files[-1]).read_text().splitlines()]
    held_out = split_examples(list(read_examples(str(data))), 0.15, "test")[1]
    assert [a["prompt"] for a in answers] == [held_out[0].messages[0]["content"]]
    assert answers[0]["reference"] == held_out[0].messages[1]["content"]
    assert {"answer", "stopped", "new_tokens"} <= answers[0].keys()

    ckpt = checkpoint.latest(run)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["chat_template"] == load_chat_template(None).source and state["init_from"] == str(base)
    assert (ckpt / "tokenizer.json").is_file()
    from distllm.evaluate import load_for_inference
    from distllm.generate import chat_generate

    model, _, _ = load_for_inference(from_dict({"train": {"device": "cpu"}}), str(run))
    tok, template = load_tokenizer(ckpt / "tokenizer.json"), load_chat_template(None)
    trained = split_examples(list(read_examples(str(data))), 0.15, "test")[0]
    for ex in trained:
        reply, new = chat_generate(model, tok, template, ex.messages[:1], max_new_tokens=40)
        assert reply == ex.messages[1]["content"], ex.where
        assert new[-1] == eot_id(tok) and eot_id(tok) not in new[:-1]  # stopped at the end-of-sequence token
    question, answer = (m["content"] for m in trained[0].messages)
    assert main(["generate", str(run), "--chat", "--temperature", "0", "--prompt", question,
                 "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out == answer + "\n"


def test_sft_resumes_bit_exactly_after_exit_at_step(base, instructions, tmp_path, capsys):
    """Stopped by train.exit_at_step at step 3 and resumed by the same command (from the SFT run's own
    checkpoint, not sft.init_from): the same losses and bit-identical weights as 6 steps straight."""
    straight = sft_config(tmp_path / "straight", base, instructions, train={"max_steps": 6, "micro_batch_size": 2})
    assert main(["sft", str(straight)]) == 0
    stopped = sft_config(tmp_path / "stopped", base, instructions, train={"max_steps": 6, "micro_batch_size": 2})
    assert main(["sft", str(stopped), "--train.exit_at_step=3"]) == 0
    assert "stopping at step 3 for train.exit_at_step" in capsys.readouterr().out
    assert main(["sft", str(stopped)]) == 0
    assert "resumed from" in capsys.readouterr().out
    a_dir, b_dir = tmp_path / "straight" / "run", tmp_path / "stopped" / "run"
    a, b = load_file(checkpoint.latest(a_dir) / "model.safetensors"), load_file(checkpoint.latest(b_dir) / "model.safetensors")
    assert checkpoint.latest(b_dir).name == "step_000006"
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def losses(run):
        return {r["step"]: r["loss"] for r in _records(run) if "grad_norm" in r}

    assert losses(a_dir) == losses(b_dir) and sorted(losses(b_dir)) == [1, 2, 3, 4, 5, 6]


def test_init_from_refuses_another_shape_or_tokenizer_in_one_line(base, instructions, tmp_path, capsys):
    config = sft_config(tmp_path, base, instructions)
    assert main(["sft", str(config), "--model.n_layers=3", "--model.d_model=32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"distllm sft: error: sft.init_from {base} is a model of another shape")
    assert "model.n_layers 3 here, 2 there" in err and "model.d_model 32 here, 64 there" in err

    other = train_tokenizer(["an entirely different corpus of words " * 50], 300)
    save_tokenizer(other, tmp_path / "other.json")
    assert main(["sft", str(config), f"--tokenizer.path={tmp_path / 'other.json'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained with another tokenizer" in err and "other.json" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
