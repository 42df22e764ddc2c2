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


CHECKPOINT_BENCH = BENCH.with_name("bench_checkpoint.py")


def test_checkpoint_benchmark_runs_and_reports_its_ratios(tmp_path):
    """benchmarks/bench_checkpoint.py --tiny (the cheapest of the memory / DDP / checkpoint benchmarks):
    distllm's save and load beside torch.save / torch.load, and the blocked time (timings not checked)."""
    r = subprocess.run([sys.executable, str(CHECKPOINT_BENCH), "--tiny", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in (r"ratio distllm save / torch\.save: ([0-9.]+)x",
                 r"ratio distllm load / torch\.load \+ load_state_dict: ([0-9.]+)x",
                 r"bytes: distllm \d+ MB, torch\.save \d+ MB \(ratio ([0-9.]+)x\)"):
        m = re.search(line, out)
        assert m and float(m.group(1)) > 0, (line, out)
    assert re.search(r"training loop blocked per checkpoint: [0-9.]+ s = the whole save", out), out
    assert re.search(r"of the save: sha256 [0-9.]+ s", out), out
    assert not any(tmp_path.iterdir()), "the benchmark left files behind"


MEMORY_BENCH = BENCH.with_name("bench_memory.py")


def test_memory_benchmark_zero_shards_the_training_state():
    """benchmarks/bench_memory.py --tiny on 2 real processes: byte counts, not timings. ZeRO-1 holds half
    of DDP's AdamW moments per rank; ZeRO-3 about half of DDP's whole state (parameters, gradients,
    moments), which needs DeepSpeed to step the fp32 parameter partitions themselves (no master copy:
    deepspeed_fence.share_fp32_partitions)."""
    r = subprocess.run([sys.executable, str(MEMORY_BENCH), "--tiny", "--steps", "2", "--engines", "DDP,ZeRO-1,ZeRO-3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    z3 = re.search(r"ratio ZeRO-3 state per rank / DDP: ([0-9.]+)x .*without the fp32 master copy ([0-9.]+)x", out)
    assert z3, out
    assert float(z3.group(1)) == float(z3.group(2)), f"ZeRO-3 keeps an fp32 master copy of its partitions:\n{out}"
    assert float(z3.group(1)) <= 0.55, out
    z1 = re.search(r"ratio ZeRO-1 optimizer state per rank / DDP: ([0-9.]+)x", out)
    assert z1 and float(z1.group(1)) <= 0.55, out


DISTILL_BENCH = BENCH.with_name("bench_distill_loss.py")


def test_distill_loss_benchmark_runs_and_reports_its_ratios():
    """benchmarks/bench_distill_loss.py at a tiny shape: both losses agree, the ratios are printed."""
    r = subprocess.run([sys.executable, str(DISTILL_BENCH), "--tokens", "64", "--vocab", "512", "--rounds", "1",
                        "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = re.search(r"ratio distllm / straightforward: held for backward ([0-9.]+)x, peak ([0-9.]+)x, time ([0-9.]+)x",
                  r.stdout)
    assert m and all(float(x) >= 0 for x in m.groups()), r.stdout
