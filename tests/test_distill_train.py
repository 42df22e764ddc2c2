"""``distllm distill`` through the real loop: the divergence of a teacher with itself, the logged parts and
their T^2 weighting, bit-exact resume, 2 processes under ZeRO-3 (the teacher partitioned) against 1, the
Hugging Face teacher, refusing a teacher of another tokenizer, and offline top-k against online top-k.

Tiny models (a 2-layer teacher, a 1-layer student), a few steps each; the trained teacher is shared."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distllm.config import from_dict, save_config
from distllm.distillation import DistillTask, write_topk
from distllm.errors import DataError
from distllm.train import train

from tiny_data import TINY_VOCAB, tiny_data_config
from distributed_runs import check, env, free_port


def config(run_dir, data_dir, **sections):
    """The student (1 layer) distilled for 6 steps; ``sections``: {"train": {...}, ...} merged in."""
    raw = {
        "run": {"dir": str(run_dir)},
        "data": {"dir": str(data_dir), "seq_len": 32},
        "tokenizer": {"vocab_size": TINY_VOCAB},
        "model": {"n_layers": 1, "n_heads": 2, "d_model": 64, "vocab_size": TINY_VOCAB, "max_seq_len": 64},
        "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 6, "eval_every": 0, "eval_batches": 2,
                  "device": "cpu"},
        "optim": {"warmup_steps": 1, "lr": 3e-3},
        "logging": {"tensorboard": False, "progress": False, "log_every": 1},
        "distill": {"alpha": 0.5, "temperature": 3.0},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw).validate()


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def steps(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "lr" in r}


def distill(cfg, **task):
    return train(cfg, task=DistillTask(cfg, **task))


def cli(args, nproc=1, timeout=300) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port())]
    return subprocess.run([*launcher, "-m", "distllm", *map(str, args)], env=env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, prepared_data) -> Path:
    """A 2-layer teacher trained for 12 steps on the tiny data."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    cfg = config(run, prepared_data, model={"n_layers": 2}, train={"max_steps": 12})
    train(cfg)
    return run


def test_divergence_is_zero_when_the_student_is_the_teacher(tmp_path, prepared_data):
    """A teacher that is the student's own initialisation (one step at lr 1e-30 changes no weight), then a
    student that does not move either: the divergence logged at every step is 0, and so is the loss at alpha 1."""
    frozen = {"lr": 1e-30, "warmup_steps": 0, "grad_clip": 0.0}
    same = config(tmp_path / "same", prepared_data, train={"max_steps": 1}, optim=frozen)
    train(same)
    cfg = config(tmp_path / "student", prepared_data, train={"max_steps": 3}, optim=frozen,
                 distill={"teacher": str(tmp_path / "same"), "alpha": 1.0})
    distill(cfg)
    logged = steps(cfg.run.dir)
    assert sorted(logged) == [1, 2, 3]
    for r in logged.values():
        assert abs(r["divergence"]) < 1e-7 and abs(r["loss"]) < 1e-6, r
        assert r["ce"] > 5.0  # an untrained model: the cross-entropy is still about ln(512)


def test_resume_is_bit_exact_and_the_parts_add_up(tmp_path, prepared_data, teacher):
    """6 steps straight == exit_at_step=3 then the same command again (loss, divergence and ce with ==); every
    step's loss is alpha * T^2 * divergence + (1 - alpha) * ce of its logged parts (T = 3: the T^2 weighting)."""
    d = {"teacher": str(teacher), "alpha": 0.5, "temperature": 3.0}
    straight = config(tmp_path / "straight", prepared_data, distill=d)
    distill(straight)
    halves = config(tmp_path / "halves", prepared_data, distill=d, train={"exit_at_step": 3})
    first = distill(halves)
    assert first.stopped == "train.exit_at_step" and first.step == 3
    halves.train.exit_at_step = None
    distill(halves)
    a, b = steps(straight.run.dir), steps(halves.run.dir)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert (a[s]["loss"], a[s]["divergence"], a[s]["ce"]) == (b[s]["loss"], b[s]["divergence"], b[s]["ce"]), s
        r = a[s]
        assert r["loss"] == pytest.approx(0.5 * 9.0 * r["divergence"] + 0.5 * r["ce"], rel=1e-5)
        assert r["divergence"] > 1e-3  # a trained teacher and an untrained student differ
    assert a[6]["divergence"] < a[1]["divergence"]  # the student moves toward the teacher


def test_two_processes_under_zero3_partition_the_teacher_and_agree_with_one(tmp_path, prepared_data, teacher):
    cfg = config(tmp_path / "unused", prepared_data, distill={"teacher": str(teacher)},
                 train={"micro_batch_size": 2, "max_steps": 4})
    path = tmp_path / "distill.yaml"
    save_config(cfg, path)
    one = cli(["distill", path, f"--run.dir={tmp_path / 'one'}"])
    two = cli(["distill", path, f"--run.dir={tmp_path / 'zero3'}", "--distributed.zero_stage=3"], nproc=2)
    check(one), check(two)
    assert "whole on each of 1 process(es)" in one.stdout
    line = next(x for x in two.stdout.splitlines() if x.startswith("distill: teacher"))
    held, total = (int(n.replace(",", "")) for n in line.split("this rank holds ")[1].split(" parameters")[0]
                   .split(" of "))
    assert held <= 0.6 * total, line  # rank 0 holds about half of the teacher
    a, b = steps(tmp_path / "one"), steps(tmp_path / "zero3")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        for key in ("loss", "divergence", "ce"):
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-5), (s, key)


def test_hugging_face_teacher_and_a_teacher_of_another_tokenizer(tmp_path, prepared_data, tiny_corpus, teacher):
    """The teacher exported to a Hugging Face directory gives the same first step as the checkpoint; a teacher
    (checkpoint or Hugging Face directory) with another tokenizer is refused with one line naming both."""
    from distllm.export import export

    hf = export(teacher, tmp_path / "hf")
    runs = {}
    for name, src in (("ckpt", teacher), ("hf", hf)):
        cfg = config(tmp_path / f"run-{name}", prepared_data, distill={"teacher": str(src)}, train={"max_steps": 2})
        distill(cfg)
        runs[name] = steps(cfg.run.dir)
    for key in ("loss", "divergence", "ce"):
        assert runs["hf"][1][key] == pytest.approx(runs["ckpt"][1][key], rel=1e-5), key

    other_data = tmp_path / "other-data"  # the same corpus, another vocabulary
    from distllm.data.prepare import prepare

    other = tiny_data_config(tiny_corpus, other_data)
    other.tokenizer.vocab_size = 400
    prepare(other)
    hf_other = tmp_path / "hf-other"
    shutil.copytree(hf, hf_other)
    shutil.copyfile(other_data / "tokenizer.json", hf_other / "tokenizer.json")
    other_teacher = tmp_path / "other-teacher"
    train(config(other_teacher, other_data, train={"max_steps": 1}, optim={"warmup_steps": 0}))
    cfg = config(tmp_path / "refused", prepared_data)
    path = tmp_path / "distill.yaml"
    save_config(cfg, path)
    for src, tok in ((other_teacher, other_teacher), (hf_other, hf_other / "tokenizer.json")):
        r = cli(["distill", path, f"--distill.teacher={src}"])
        assert r.returncode == 2, (r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "another tokenizer than the student" in lines[0] and str(tok) in lines[0], lines[0]
        assert str(prepared_data / "tokenizer.json") in lines[0], lines[0]
    assert not (tmp_path / "refused" / "checkpoints").exists()


def test_offline_top_k_trains_as_online_top_k(tmp_path, prepared_data, teacher):
    """The teacher's top-16 written once and read by stream position (micro-batch 2, accumulation 4) trains the
    student exactly as the teacher run online and cut to its top-16 (micro-batch 4, accumulation 2); top-k
    written for another k or data order is refused with one line."""
    d = {"teacher": str(teacher), "topk_dir": str(tmp_path / "topk"), "k": 16}
    write_topk(config(tmp_path / "unused", prepared_data, distill=d, train={"max_steps": 4}))
    online = config(tmp_path / "online", prepared_data, distill={"teacher": str(teacher)}, train={"max_steps": 4})
    distill(online, topk=16)
    offline = config(tmp_path / "offline", prepared_data, distill={**d, "teacher": None},
                     train={"max_steps": 4, "micro_batch_size": 2})
    distill(offline)
    a, b = steps(online.run.dir), steps(offline.run.dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        for key in ("loss", "divergence", "ce"):
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-6, abs=1e-7), (s, key)

    for name, override, why in (("k", {"distill": {**d, "teacher": None, "k": 8}}, "k = 16, this run has 8"),
                                ("seed", {"distill": {**d, "teacher": None}, "train": {"seed": 7}}, "data_id")):
        bad = config(tmp_path / f"bad-{name}", prepared_data, **override)
        bad.train.max_steps = 4
        with pytest.raises(DataError, match=why) as e:
            distill(bad)
        assert "\n" not in str(e.value)


def test_on_sft_data_only_response_tokens_count(tmp_path, prepared_data, teacher):
    """distill.data: sft with alpha 0 is exactly `distllm sft` (the same response-token labels, the same
    normalisation, the fused head's CE = the model's CE); with alpha 0.5 the divergence is logged too."""
    from distllm.distillation import run_distill
    from distllm.sft import run_sft

    sft = {"max_examples": 60, "eval_prompts": 0, "max_new_tokens": 4}
    runs = {}
    for name, alpha in (("sft", None), ("alpha0", 0.0), ("alpha05", 0.5)):
        cfg = config(tmp_path / name, prepared_data, sft=sft, data={"seq_len": 64},
                     train={"max_steps": 2, "micro_batch_size": 2},
                     distill={"teacher": str(teacher), "data": "sft", "alpha": alpha or 0.0})
        (run_sft if alpha is None else run_distill)(cfg)
        runs[name] = steps(cfg.run.dir)
    for s in (1, 2):
        assert runs["alpha0"][s]["loss"] == pytest.approx(runs["sft"][s]["loss"], rel=1e-5)
        assert runs["alpha0"][s]["ce"] == pytest.approx(runs["sft"][s]["loss"], rel=1e-5)
    assert runs["alpha05"][1]["ce"] == pytest.approx(runs["sft"][1]["loss"], rel=1e-5)  # same weights at step 1
    assert runs["alpha05"][1]["divergence"] > 0
