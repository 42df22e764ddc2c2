"""Checkpoints: atomic save, discovery of the newest complete one, load.

Layout of a run directory::

    RUN_DIR/checkpoints/step_000300/
        model.safetensors   model weights (tied weights stored once)
        optimizer.pt        optimizer state_dict
        state.json          step, data position, tokenizer fingerprint, resolved config
        rng.pt              torch / numpy / python RNG states
        COMPLETE            commit marker, written last

A checkpoint is written into a hidden temporary directory next to its final place and renamed
into place only after every file (and the ``COMPLETE`` marker) is on disk, so a crash or a full
disk never leaves a half-written ``step_*`` directory, and the previous checkpoint is never
touched before the new one is committed. Nothing without ``COMPLETE`` is ever loaded.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from distllm.errors import CheckpointError

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:06d}"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(run_dir: str | os.PathLike) -> Path | None:
    ckpts = complete_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve(spec: str | None, run_dir: str | os.PathLike) -> Path | None:
    """``None`` -> None; ``latest`` -> newest complete checkpoint of the run (or None); else a path."""
    if spec is None:
        return None
    if spec == "latest":
        return latest(run_dir)
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker); it cannot be trusted")
    return path


def save(run_dir: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         state: dict, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, then prune older ones beyond ``keep_last``."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = step_path(run_dir, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        _fsync_dir_files(tmp)
        (tmp / MARKER).write_text("ok\n")
        _fsync(tmp / MARKER)
        _fsync(tmp)
        if final.exists():  # re-saving the same step: swap, never delete before the new one exists
            old = root / f".old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync(root)
    except Exception as e:  # torch.save and safetensors report a full disk as RuntimeError, not OSError
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(root).free < (1 << 20)
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        previous = latest(run_dir)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        reason = "no space left on device" if full else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"could not write checkpoint {final}: {reason}{kept}") from None
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable state.json: {e}") from None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         restore_rng: bool = False) -> dict:
    """Load weights (and optimizer / RNG state if given) from a complete checkpoint; return its state."""
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker); it cannot be trusted")
    state = read_state(path)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except Exception as e:  # safetensors raises several types for corrupt or mismatched files
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(e).__name__)
        more = sum("size mismatch" in line for line in lines) - 1
        raise CheckpointError(
            f"cannot load weights from {path / 'model.safetensors'}: {detail}"
            + (f" (and {more} more)" if more > 0 else "")
            + ("; check the model section of the config" if "size mismatch" in detail else "")
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model (missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}); check the model section of the config"
        )
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if restore_rng and (path / "rng.pt").is_file():
        _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_files(path: Path) -> None:
    for f in path.iterdir():
        _fsync(f)
    _fsync(path)
