"""Stability of the measured CPU peak FLOP/s (the MFU denominator), new method against the old one.

Each run is a fresh process (no cache), old and new interleaved so a busy machine hits both alike:

* old: the best single 1024^3 fp32 matmul within 0.3 s, once (what MFU used before; a busy moment
  made it 103-185 GFLOP/s across three runs and MFU print 178%);
* new: ``distllm.model.flops.measured_matmul_flops``: the best matmul of 5 trials of 0.3 s, 0.2 s
  apart (and then cached per machine, so later runs reuse it).

Prints each run's GFLOP/s and the spread (max / min) of each method; a spread nearer 1 is steadier.

    .venv/bin/python benchmarks/bench_peak_flops.py --runs 3 --threads 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys

OLD = """
import time, torch
torch.set_num_threads({threads})
n = 1024
a, b = torch.randn(n, n), torch.randn(n, n)
torch.matmul(a, b)
best, deadline = 0.0, time.perf_counter() + 0.3
while time.perf_counter() < deadline:
    t0 = time.perf_counter()
    torch.matmul(a, b)
    best = max(best, 2 * n**3 / (time.perf_counter() - t0))
print(best)
"""

NEW = """
import torch
from distllm.model.flops import measured_matmul_flops
torch.set_num_threads({threads})
print(measured_matmul_flops("cpu", None, torch.float32))
"""


def run(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    old, new = [], []
    for i in range(args.runs):
        old.append(run(OLD.format(threads=args.threads)) / 1e9)
        new.append(run(NEW.format(threads=args.threads)) / 1e9)
        print(f"run {i + 1}: old {old[-1]:6.1f} GFLOP/s   new {new[-1]:6.1f} GFLOP/s", flush=True)
    for name, xs in (("old", old), ("new", new)):
        print(f"{name}: min {min(xs):6.1f}  max {max(xs):6.1f}  spread max/min {max(xs) / min(xs):.3f}")
    print(f"spread ratio new/old: {(max(new) / min(new)) / (max(old) / min(old)):.3f} (below 1 = steadier)")


if __name__ == "__main__":
    main()
