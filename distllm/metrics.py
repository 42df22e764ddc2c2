"""Metrics: one record per logged step to the console, ``metrics.jsonl`` and TensorBoard.

``metrics.jsonl`` holds one JSON object per line. Training records have at least ``step``,
``loss``, ``lr``, ``grad_norm``, ``tokens_per_s`` and ``mfu``; validation records have
``step``, ``val_loss``, ``val_ppl`` and ``val_bpb`` (bits per byte); task records have ``step`` and
``eval/<task>/acc``, ``eval/<task>/acc_norm`` and their ``..._stderr``. Scripts and ``distllm plot`` read these names.
Only the main process writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm.auto import tqdm


class MetricsLogger:
    """Writes on the main process only. With ``resume_step`` (a resumed run) the records after that step,
    written by the interrupted run after its last checkpoint, are dropped from metrics.jsonl and
    TensorBoard, so neither shows a step twice or a line running backwards."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, progress: bool, total_steps: int,
                 start_step: int = 0, resume_step: int | None = None):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            truncate_after(path, resume_step)
        self.jsonl = open(path, "a" if resume_step is not None else "w")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        self.print(format_record(record))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def format_record(r: dict) -> str:
    if "val_loss" in r:
        bpb = f" | val_bpb {r['val_bpb']:.4f}" if r.get("val_bpb") is not None else ""
        return f"step {r['step']:>6} | val_loss {r['val_loss']:.4f} | val_ppl {r['val_ppl']:.2f}{bpb}"
    if any(k.startswith("eval/") for k in r):
        return f"step {r['step']:>6} | " + " | ".join(
            f"{k[5:]} {v:.4f}" for k, v in r.items() if k.startswith("eval/") and k.endswith(("/acc", "/acc_norm")))
    if r.get("skipped"):
        return f"step {r['step']:>6} | SKIPPED: non-finite loss {r['loss']:.4g} / grad_norm {r['grad_norm']:.4g}"
    if "loss_spike" in r:
        return (f"step {r['step']:>6} | loss spike {r['loss_spike']:.4f} ({r['loss_spike'] / r['recent_mean']:.1f}x "
                f"the recent mean) in samples {r['samples'][:8]}{' ...' if len(r['samples']) > 8 else ''}")
    return (
        f"step {r['step']:>6} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad_norm {r['grad_norm']:.3f}"
        f" | {r['tokens_per_s']:,.0f} tok/s | mfu {100 * r['mfu']:.2f}%"
    )


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
