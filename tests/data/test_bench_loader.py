"""benchmarks/bench_loader.py runs end to end in its quick mode (the timings themselves are not checked)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_loader.py"


def test_loader_benchmark_runs_and_reports_its_ratios():
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--parts", "123"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "nanoGPT get_batch (baseline)" in text and text.count("x baseline") == 3
    assert "previous loader (baseline)" in text and "ratio (baseline / distllm)" in text
    assert "GB at 1e+09 per process" in text
