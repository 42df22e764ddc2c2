"""``train.precision``: the matmuls of a real training step run in the dtype the config asks for.

A loss that goes down proves nothing here (an fp32 run lowers it too), so each run records the
dtype of every matrix-multiply input that reaches the ATen dispatcher (below autograd and autocast,
through a ``TorchDispatchMode``) during ``distllm.train.train``: forward, backward, validation. Each
precision runs in a fresh process, because Accelerate keeps one mixed-precision setting per process.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distllm.config import save_config

MATMULS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")

RECORD_TRAINING = """
import collections, json, sys
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from distllm.config import load_config
from distllm.train import train

MATMULS = {matmuls!r}


class RecordMatmulDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()  # (op, input dtypes) -> calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = "aten." + func.__name__.split(".")[0]
        if name in MATMULS:
            dtypes = tuple(str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor))
            self.seen[(name, dtypes)] += 1
        return func(*args, **(kwargs or {{}}))


cfg = load_config(sys.argv[1])
with RecordMatmulDtypes() as rec:
    result = train(cfg)
print("RECORD " + json.dumps([[op, list(dtypes), n] for (op, dtypes), n in rec.seen.items()]))
"""


def train_and_record(cfg, tmp_path: Path, device: str, precision: str, steps: int = 6) -> tuple[dict, list[float]]:
    """Train ``steps`` steps in a fresh process; return {(op, input dtypes): calls} and the logged losses."""
    cfg.train.device, cfg.train.precision = device, precision
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.eval_batches = steps, 0, 1
    cfg.logging.log_every = 1
    cfg.logging.peak_flops = 1e11  # no peak measurement: its fp32 matmuls measure the machine, not training
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 1
    cfg.run.dir = str(tmp_path / f"run-{precision}")
    config = tmp_path / f"{precision}.yaml"
    save_config(cfg, config)
    script = tmp_path / "record.py"
    script.write_text(RECORD_TRAINING.format(matmuls=MATMULS))
    r = subprocess.run([sys.executable, str(script), str(config)], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(line for line in r.stdout.splitlines() if line.startswith("RECORD "))
    seen = {(op, tuple(dtypes)): n for op, dtypes, n in json.loads(line[len("RECORD "):])}
    records = [json.loads(x) for x in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    return seen, [x["loss"] for x in records if "loss" in x]


def check(seen: dict, losses: list[float], dtype: str) -> None:
    assert seen, "no matmul reached the dispatcher"
    wrong = {key: n for key, n in seen.items() if any(d != dtype for d in key[1])}
    assert not wrong, f"matmuls outside {dtype}: {wrong}"
    assert sum(n for (op, _), n in seen.items() if op == "aten.mm") >= 10  # forward and backward of every layer
    assert losses[-1] < losses[0], losses  # and it trains


def test_bf16_training_runs_its_matmuls_in_bf16_on_cpu(tiny_config, tmp_path):
    """Accelerate's bf16 autocast is the GPU precision path; it runs on CPU too, same code."""
    check(*train_and_record(tiny_config, tmp_path, "cpu", "bf16"), "bfloat16")


def test_fp32_training_runs_its_matmuls_in_fp32(tiny_config, tmp_path):
    check(*train_and_record(tiny_config, tmp_path, "cpu", "fp32"), "float32")


@pytest.mark.gpu
def test_bf16_training_runs_its_matmuls_in_bf16_on_one_gpu(tiny_config, tmp_path):
    check(*train_and_record(tiny_config, tmp_path, "cuda", "bf16"), "bfloat16")
