"""Checkpoints that do not verify (a marker that does not parse, files that do not match it) are reported
at resume, set aside, and never counted by retention; a save is never reported that was not made."""

import json
import logging
from pathlib import Path

import pytest
import torch

from distllm import checkpoint
from distllm.distributed import local_runtime
from distllm.errors import CheckpointError
from distllm.train import train


def _save(run_dir, step, keep_last):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    return checkpoint.save(local_runtime(), run_dir, step, model, opt, {"data": {"sample_index": step}}, keep_last)


def test_retention_keeps_the_good_checkpoint_and_not_a_newer_one_that_does_not_verify(tmp_path):
    good = _save(tmp_path, 1, keep_last=2)
    bad = _save(tmp_path, 2, keep_last=2)
    with open(bad / "model.safetensors", "r+b") as f:  # torn after its commit (a disk, a careless copy)
        f.truncate(10)
    assert checkpoint.latest(tmp_path) == good  # the newest that verifies
    _save(tmp_path, 3, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_000001", "step_000003"]
    assert good.is_dir() and bad.is_dir()  # the bad one is not counted, and not silently deleted either
    _save(tmp_path, 4, keep_last=1)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_000004"]


def test_a_corrupt_marker_is_reported_at_resume_and_set_aside(tiny_config, caplog):
    cfg = tiny_config
    cfg.train.max_steps, cfg.train.eval_every, cfg.checkpoint.every, cfg.checkpoint.keep_last = 6, 0, 2, 3
    run_dir = Path(cfg.run.dir)
    train(cfg)
    s4, s6 = checkpoint.step_path(run_dir, 4), checkpoint.step_path(run_dir, 6)
    (s6 / checkpoint.MARKER).write_text('{"format_version": 2, "files": {')  # a torn marker
    (s4 / "state.json").write_text("{}")  # a file that does not match its marker
    cfg.train.max_steps, cfg.checkpoint.keep_last = 8, 2
    with caplog.at_level(logging.WARNING, logger="distllm"):
        result = train(cfg)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped checkpoint")]
    assert len(skipped) == 2, skipped  # one line per checkpoint, saying why
    assert skipped[0].startswith(f"skipped checkpoint {s4}: checkpoint file {s4 / 'state.json'} has 2 bytes")
    assert skipped[1].startswith(f"skipped checkpoint {s6}: checkpoint {s6} has an unreadable COMPLETE marker")
    assert "renamed to corrupt-step_000006" in skipped[1]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in records if r.get("event") == "resume"] == [str(checkpoint.step_path(run_dir, 2))]
    assert result.checkpoint.name == "step_000008"
    root = checkpoint.checkpoint_dir(run_dir)
    assert sorted(p.name for p in root.iterdir()) == ["corrupt-step_000004", "corrupt-step_000006",
                                                      "step_000006", "step_000008"]
    assert (root / "corrupt-step_000006" / checkpoint.MARKER).read_text().endswith("{")  # kept as it was


def test_going_back_to_an_older_checkpoint_of_the_run_is_refused(tiny_config):
    """Its saves would meet the newer checkpoints of the abandoned line: refused, so that no run reports
    a save that a checkpoint of the old line holds."""
    cfg = tiny_config
    cfg.train.max_steps, cfg.train.eval_every, cfg.checkpoint.every, cfg.checkpoint.keep_last = 4, 0, 2, 3
    first = train(cfg)
    before = (first.checkpoint / checkpoint.MARKER).read_bytes()
    cfg.checkpoint.resume_from, cfg.optim.lr = "step_000002", 1e-2
    with pytest.raises(CheckpointError, match=r"goes back to step_000002, but .* has newer checkpoints "
                                              r"\(step_000004\)"):
        train(cfg)
    assert (first.checkpoint / checkpoint.MARKER).read_bytes() == before
