"""benchmarks/bench_train_step.py runs end to end (a tiny shape; the timing itself is not checked)."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"


def test_train_step_benchmark_runs_and_reports_a_ratio():
    args = ["--layers", "1", "--heads", "2", "--kv-heads", "1", "--width", "64", "--seq", "16", "--batch", "2",
            "--vocab", "128", "--rounds", "2", "--warmup", "1", "--threads", "1"]
    r = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "loss check" in out  # the two models got the same weights and the same loss
    assert re.search(r"^distllm .* tokens/s .*MFU", out, re.M) and re.search(r"^hf .* tokens/s .*MFU", out, re.M)
    ratio = re.search(r"ratio distllm/hf tokens/s: ([0-9.]+)", out)
    assert ratio and float(ratio.group(1)) > 0, out
