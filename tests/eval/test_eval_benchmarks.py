"""benchmarks/bench_contamination.py runs end to end on a small corpus and both sides find the same dirty
documents (the timing itself is not checked); it needs lm-evaluation-harness (the ``bench`` extra)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_contamination.py"


def test_contamination_benchmark_finds_what_the_janitor_finds():
    pytest.importorskip("lm_eval")
    r = subprocess.run([sys.executable, str(BENCH), "--mb", "0.5", "--items", "20"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "same dirty documents: yes" in r.stdout
    found = re.search(r"janitor \(Python\): .* (\d+) dirty documents", r.stdout)
    assert found and int(found.group(1)) >= 5, r.stdout  # half of the 20 items were planted
    for n in (1, 2):
        m = re.search(rf"ratio distllm \({n} process(es)?\) / janitor MB/s: ([0-9.]+)x", r.stdout)
        assert m and float(m.group(2)) > 0, r.stdout
