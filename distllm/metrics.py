"""Metrics: every record goes to the console, ``metrics.jsonl`` and each experiment tracker.

``metrics.jsonl`` holds one JSON object per line. Training records have at least ``step``,
``loss``, ``lr``, ``grad_norm``, ``tokens_per_s`` and ``mfu``; validation records have
``step``, ``val_loss``, ``val_ppl`` and ``val_bpb`` (bits per byte); task records have ``step`` and
``eval/<task>/acc``, ``eval/<task>/acc_norm`` and their ``..._stderr``. Scripts and ``distllm plot`` read
these names. ``MetricsLogger`` is the one fan-out point: the trackers of ``logging.trackers``
(TensorBoard, W&B, MLflow; ``distllm.trackers``) get each record's numeric values at its ``step``. Only
the main process writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from distllm import trackers as tracking
from distllm.progress import Progress
from distllm.redact import command_line_has_secrets, redact, redact_text, secret_values

if TYPE_CHECKING:
    from distllm.config import LoggingConfig


class MetricsLogger:
    """Writes on the main process only. With ``resume_step`` (a resumed run) the records after that step,
    written by the interrupted run after its last checkpoint, are dropped from metrics.jsonl and
    TensorBoard, so neither shows a step twice or a line running backwards; W&B and MLflow continue
    their runs (ids from ``resumed_from``'s run directory or checkpoint) and are not sent the steps they
    already have (see ``distllm.trackers``).

    ``config`` (the resolved config as a dict) goes to the trackers redacted, and every line printed is
    cleaned of its credentials. A tracker that cannot start is one warning line (or, with
    ``logging.trackers_required``, an error raised by ``check_trackers``, which the caller runs where it
    can stop every process); one that fails later is one warning line and is dropped.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, progress: bool, total_steps: int,
                 start_step: int = 0, resume_step: int | None = None, logging: "LoggingConfig | None" = None,
                 config: dict | None = None, resumed_from: Path | None = None):
        self.enabled = enabled
        self.jsonl = None
        self.bar = None
        self.run_dir = Path(run_dir)
        self.secrets = secret_values(config or {})
        self.trackers: list[tracking.Tracker] = []
        self.runs: dict[str, dict] = {}  # trackers.json: {name: {"run_id", "logged_through", "keys"}}
        self.tracker_error: str | None = None
        if not enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            truncate_after(path, resume_step)
        self.jsonl = open(path, "a" if resume_step is not None else "w")
        if progress:  # a bar on a terminal, a plain line every 30 s in a log file
            self.bar = Progress(total_steps, "train", "step", initial=start_step)
        if logging is not None:
            self._start_trackers(logging, config or {}, resume_step, resumed_from)

    # ------------------------------------------------------------------ trackers

    def _start_trackers(self, logging: "LoggingConfig", config: dict, resume_step: int | None,
                        resumed_from: Path | None) -> None:
        self.runs = tracking.resume_state(self.run_dir, resumed_from) if resume_step is not None else {}
        run = tracking.TrackerRun(
            run_dir=self.run_dir, project=logging.project,
            name=logging.run_name or self.run_dir.resolve().name, config=redact(config),
            resume_step=resume_step, mlflow_tracking_uri=logging.mlflow_tracking_uri,
            hide_command_line=command_line_has_secrets(self.secrets), say=self.print)
        for name in logging.tracker_names():
            previous = self.runs.get(name) or {}
            run.run_id = previous.get("run_id") if resume_step is not None else None
            try:
                tracker = tracking.start_tracker(name, run)
            except tracking.TrackerUnavailable as e:
                if logging.trackers_required:
                    self.tracker_error = redact_text(f"{e} (logging.trackers_required is true)", self.secrets)
                    self.close_trackers()
                    return
                self.print(f"warning: {e}; training goes on without it")
                continue
            self.trackers.append(tracker)
            if tracker.run_id is not None:
                same = tracker.run_id == previous.get("run_id")
                self.runs[name] = {"run_id": tracker.run_id, "logged_through": previous.get("logged_through", -1)
                                   if same else -1, "keys": list(previous.get("keys", [])) if same else []}
        if self.runs:
            tracking.write_state(self.run_dir, self.runs)
        if self.trackers:
            self.print("trackers: " + ", ".join(t.describe() for t in self.trackers))

    def check_trackers(self) -> None:
        """Raise the error of a required tracker that could not start (``logging.trackers_required``)."""
        if self.tracker_error is not None:
            raise tracking.TrackerUnavailable(self.tracker_error)

    def tracker_state(self) -> dict:
        """The tracker runs and the last step each was sent (saved in checkpoints; trackers.json's content)."""
        return {name: dict(run) for name, run in self.runs.items()}

    def _send(self, record: dict) -> None:
        """Send a record to each tracker, but never a value a tracker run already has: for trackers with run
        ids, trackers.json keeps the last step sent and the keys sent at it, and a record is sent whole when
        its step is past that step, in part (the other keys: a validation record after the training record of
        the same step) at that step, not at all before it. trackers.json is written first: a crash between
        the two loses a value in the tracker rather than sending it twice."""
        step, values = record["step"], tracking.tracker_values(record)
        if not values:  # nothing numeric (an event such as a resume)
            return
        sends, changed = [], False
        for tracker in self.trackers:
            entry = self.runs.get(tracker.name) if not tracker.rewrites_on_resume else None
            todo = values
            if entry is not None:
                if step < entry["logged_through"]:
                    continue
                if step == entry["logged_through"]:
                    todo = {k: v for k, v in values.items() if k not in entry.get("keys", ())}
                    entry["keys"] = entry.get("keys", []) + list(todo)
                else:
                    entry["logged_through"], entry["keys"] = step, list(todo)
                changed = changed or bool(todo)
            if todo:
                sends.append((tracker, todo))
        if changed:
            tracking.write_state(self.run_dir, self.runs)
        for tracker, todo in sends:
            try:
                tracker.log(step, todo, record["time"])
            except Exception as e:
                self.trackers.remove(tracker)
                self.print(f"warning: tracker {tracker.name} failed at step {step} ({tracking.first_line(e)}); "
                           "training goes on without it")

    def close_trackers(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:
                self.print(f"warning: tracker {tracker.name} did not close cleanly ({tracking.first_line(e)})")
        self.trackers = []

    # ------------------------------------------------------------------ records and lines

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.trackers:
            self._send(record)
        self.print(format_record(record))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        line = redact_text(line, self.secrets)
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self.close_trackers()
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()


def format_record(r: dict) -> str:
    if "val_loss" in r:
        bpb = f" | val_bpb {r['val_bpb']:.4f}" if r.get("val_bpb") is not None else ""
        return f"step {r['step']:>6} | val_loss {r['val_loss']:.4f} | val_ppl {r['val_ppl']:.2f}{bpb}"
    if any(k.startswith("eval/") for k in r):
        return f"step {r['step']:>6} | " + " | ".join(
            f"{k[5:]} {v:.4f}" for k, v in r.items() if k.startswith("eval/") and k.endswith(("/acc", "/acc_norm")))
    if r.get("event") == "resume":  # written by a resumed run; `distllm plot` marks it
        return f"step {r['step']:>6} | resumed from {r.get('checkpoint')}"
    if "event" in r:
        return f"step {r['step']:>6} | {r['event']}"
    if r.get("skipped"):
        bad = [name for name, key in (("loss", "loss"), ("gradient", "grad_norm")) if not math.isfinite(r[key])]
        return (f"step {r['step']:>6} | SKIPPED: non-finite {' and '.join(bad) or 'loss or gradient'} "
                f"(loss {r['loss']:.4g}, grad_norm {r['grad_norm']:.4g})")
    if "loss_spike" in r:
        return (f"step {r['step']:>6} | loss spike {r['loss_spike']:.4f} ({r['loss_spike'] / r['recent_mean']:.1f}x "
                f"the recent mean) in samples {r['samples'][:8]}{' ...' if len(r['samples']) > 8 else ''}")
    if {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= r.keys():
        return (
            f"step {r['step']:>6} | loss {r['loss']:.4f}"
            + "".join(f" | {k} {r[k]:.4f}" for k in ("divergence", "ce") if k in r)  # distill's parts
            + f" | lr {r['lr']:.2e} | grad_norm {r['grad_norm']:.3f}"
            f" | {r['tokens_per_s']:,.0f} tok/s | " + ("mfu n/a" if r["mfu"] is None else f"mfu {100 * r['mfu']:.2f}%")
        )
    # any other record (evaluation metrics, ...): its numeric values by name
    return f"step {r['step']:>6} | " + " | ".join(f"{k} {v:.4g}" for k, v in tracking.tracker_values(r).items())


def truncate_after(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (atomically)."""
    keep = [line for line in Path(path).read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = Path(path).with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
