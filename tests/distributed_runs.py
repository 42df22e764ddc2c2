"""Real multi-process training runs for the distributed and fault-tolerance tests.

Each run is a separate ``torchrun`` (or ``python -m distllm``) job on CPU with gloo, a tiny model,
and 20 steps that cross an epoch boundary with gradient accumulation > 1. Runs are made once per
test session, on first use, and shared: one run serves every assertion about it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from distllm import checkpoint
from distllm.config import from_dict, save_config

STEPS = 20
HALF = 10
GRAD_CLIP = 0.5  # below the gradient norm of several steps: every engine's clipping is exercised
# engine name -> (processes, config overrides)
ENGINES = {
    "one": (1, []),
    "ddp": (2, []),
    "zero1": (2, ["--distributed.zero_stage=1"]),
    "zero2": (2, ["--distributed.zero_stage=2"]),
    "zero3": (2, ["--distributed.zero_stage=3"]),
    "zero2x1": (1, ["--distributed.zero_stage=2"]),  # one process, still DeepSpeed
    "zero3x1": (1, ["--distributed.zero_stage=3"]),
}
ENGINES.update({f"{name}-async": (n, [*o, "--checkpoint.async_save=true"])  # saves written in the background
                for name, (n, o) in list(ENGINES.items()) if name in ("one", "ddp", "zero2", "zero3")})
PROBE = Path(__file__).with_name("save_probe.py")  # `distllm train` counting the collectives of its saves


def base_config(run_root: Path, data_dir: Path) -> Path:
    """A tiny model; 520 train samples of 64 tokens, global batch 32: an epoch is 16 steps."""
    cfg = from_dict({
        "run": {"dir": str(run_root / "unused")},
        "data": {"dir": str(data_dir), "seq_len": 64, "prefetch": 2},
        "tokenizer": {"vocab_size": 512},
        "model": {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_model": 64, "vocab_size": 512, "max_seq_len": 64},
        "train": {"micro_batch_size": 4, "global_batch_size": 32, "max_steps": STEPS, "eval_every": HALF,
                  "eval_batches": 3, "device": "cpu"},
        "optim": {"warmup_steps": 3, "lr": 3e-3, "grad_clip": GRAD_CLIP},
        "checkpoint": {"keep_last": 10, "every_minutes": 0},
        "logging": {"log_every": 1, "tensorboard": False, "progress": False, "trace_samples": True,
                    "peak_flops": 1e11},
    }).validate()
    path = run_root / "base.yaml"
    save_config(cfg, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
             TORCH_CPP_LOG_LEVEL="ERROR")  # Python warnings show, as a user sees them
    e.pop("DISTLLM_FAULT", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def command(config: Path, nproc: int, overrides: list[str], torchrun: bool | None = None,
            probe: bool = False) -> list[str]:
    torchrun = nproc > 1 if torchrun is None else torchrun
    program = [str(PROBE)] if probe else ["-m", "distllm"]
    if not torchrun:
        return [sys.executable, *program, "train", str(config), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            *program, "train", str(config), *overrides]


def launch(config: Path, nproc: int, overrides: list[str], timeout: float = 300, torchrun=None, probe: bool = False,
           **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(command(config, nproc, overrides, torchrun, probe), env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)


def launch_two_nodes(config: Path, overrides: list[str], timeout: float = 300,
                     **env_extra) -> list[subprocess.CompletedProcess]:
    """Two ``torchrun --nnodes 2`` agents of one process each, rendezvousing on 127.0.0.1."""
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "distllm", "train", str(config), *overrides],
        env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@dataclass
class Run:
    dir: Path
    proc: subprocess.CompletedProcess | list
    seconds: float

    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.dir / "metrics.jsonl").read_text().splitlines() if line]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records() if "loss" in r and "lr" in r}

    def val_losses(self) -> dict[int, float]:
        return {r["step"]: r["val_loss"] for r in self.records() if "val_loss" in r}

    def samples(self, rank: int) -> dict[int, list[int]]:
        path = self.dir / "samples" / f"rank{rank:05d}.jsonl"
        return {r["step"]: r["samples"] for r in map(json.loads, path.read_text().splitlines())}

    def checkpoint(self, step: int | None = None) -> Path:
        return checkpoint.latest(self.dir) if step is None else checkpoint.step_path(self.dir, step)

    def weights(self, step: int | None = None) -> dict:
        return tensors(self.checkpoint(step), "model")

    def moments(self, step: int | None = None) -> dict:
        return tensors(self.checkpoint(step), "optimizer")

    def probes(self) -> list[dict]:
        """What tests/save_probe.py saw on each rank: saves, their collectives, float tensors they moved."""
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("probe-rank*.json"))]


def tensors(path: Path, prefix: str) -> dict:
    """Every whole tensor of a checkpoint by name, assembled from the pieces its index lists (ZeRO's per-rank
    partitions merged): ``model`` -> the weights, ``optimizer`` -> "<name>.exp_avg" / "<name>.exp_avg_sq"."""
    reader = checkpoint.TensorReader(path)
    if prefix == "model":
        return {name: reader.get(name) for name in reader.keys()}
    return {f"{name}.{kind}": reader.get(name, kind) for name in reader.keys() for kind in ("exp_avg", "exp_avg_sq")}


def check(proc) -> None:
    procs = proc if isinstance(proc, list) else [proc]
    for p in procs:
        assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-6000:]}"


class Runs:
    """Named runs made on first use. Names: ENGINE (20 steps straight), ENGINE@10 (stopped by
    train.exit_at_step=10), A@10>B (A's step-10 checkpoint continued by engine B to step 20)."""

    def __init__(self, root: Path, data_dir: Path):
        self.root = root
        self.config = base_config(root, data_dir)
        self._done: dict[str, Run] = {}

    def __getitem__(self, name: str) -> Run:
        if name not in self._done:
            self._done[name] = self._make(name)
        return self._done[name]

    def _make(self, name: str) -> Run:
        run_dir = self.root / name.replace(">", "_to_").replace("@", "_at_")
        t0 = time.monotonic()
        if ">" in name:
            first, engine = name.split(">")
            src = self[first].checkpoint(HALF)
            (run_dir / "checkpoints").mkdir(parents=True)
            shutil.copytree(src, run_dir / "checkpoints" / src.name)
            for f in ("metrics.jsonl", "samples"):  # the run directory as the stopped job left it
                s = self[first].dir / f
                (shutil.copytree if s.is_dir() else shutil.copyfile)(s, run_dir / f)
            extra = []
        else:
            engine, _, stop = name.partition("@")
            extra = [f"--train.exit_at_step={stop}"] if stop else []
        nproc, engine_overrides = ENGINES[engine]
        overrides = [f"--run.dir={run_dir}", *engine_overrides, *extra]
        if engine == "ddp" and not extra and ">" not in name:
            proc = launch_two_nodes(self.config, overrides)  # DDP over two "nodes" on loopback
        else:
            proc = launch(self.config, nproc, overrides, torchrun=nproc > 1 or not engine.startswith("one"), probe=True)
        check(proc)
        return Run(run_dir, proc, time.monotonic() - t0)
