"""Console lines of metrics records."""

import math

import pytest

from distllm.metrics import format_record


@pytest.mark.parametrize("loss, grad_norm, says", [
    (2822.0, math.nan, "SKIPPED: non-finite gradient (loss 2822, grad_norm nan)"),  # the loss was fine
    (math.inf, math.nan, "SKIPPED: non-finite loss and gradient (loss inf, grad_norm nan)"),
    (math.nan, 1.5, "SKIPPED: non-finite loss (loss nan, grad_norm 1.5)"),
])
def test_a_skipped_step_says_what_was_not_finite(loss, grad_norm, says):
    line = format_record({"step": 7, "skipped": True, "loss": loss, "grad_norm": grad_norm})
    assert line == f"step      7 | {says}"


def test_a_resume_record_has_a_line():
    record = {"step": 10, "event": "resume", "checkpoint": "runs/x/checkpoints/step_000010"}
    assert format_record(record) == "step     10 | resumed from runs/x/checkpoints/step_000010"
