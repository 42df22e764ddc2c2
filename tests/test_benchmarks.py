"""benchmarks/bench_train_step.py runs end to end (a tiny shape; the timing itself is not checked)."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    """benchmarks/bench_checkpoint.py --tiny --no-multi (the cheapest of the memory / DDP / checkpoint
    benchmarks): distllm's save, asynchronous save and load beside torch.save / torch.load, and the memory a
    save takes (timings not checked)."""
    r = subprocess.run([sys.executable, str(CHECKPOINT_BENCH), "--tiny", "--no-multi", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in (r"ratio one-process distllm save / torch\.save \+ fsync: ([0-9.]+)x",
                 r"ratio async save blocked / sync save: ([0-9.]+)x",
                 r"ratio distllm load / torch\.load \+ load_state_dict: ([0-9.]+)x"):
        m = re.search(line, out)
        assert m and float(m.group(1)) > 0, (line, out)
    assert re.search(r"peak host memory growth during a save: distllm save \d+ MB, distllm async save \(first\) \d+ MB", out), out
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


def test_distill_step_benchmark_runs_and_reports_its_ratios():
    """benchmarks/bench_distill_step.py at a tiny shape: every kind of step runs and both ratios are printed."""
    r = subprocess.run([sys.executable, str(BENCH.with_name("bench_distill_step.py")), "--vocab", "512", "--batch", "2",
                        "--seq", "32", "--teacher", "2,2,2,64", "--student", "1,2,2,32", "--k", "8", "--rounds", "1",
                        "--steps", "1", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    online = re.search(r"online distillation / \(student step \+ teacher forward\) = ([0-9.]+)", r.stdout)
    offline = re.search(r"offline top-8 step / online step = ([0-9.]+)", r.stdout)
    assert online and offline and float(online.group(1)) > 0 and float(offline.group(1)) > 0, r.stdout


LOSS_BENCH = BENCH.with_name("bench_loss_memory.py")


def test_loss_memory_benchmark_runs_and_reports_both_ratios():
    """benchmarks/bench_loss_memory.py --tiny: the fused chunked loss and the unfused one, each measured in
    its own process; the same loss, and a memory and a time ratio (figures not checked at this size)."""
    r = subprocess.run([sys.executable, str(LOSS_BENCH), "--tiny", "--threads", "1"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    losses = re.search(r"losses ([0-9.]+) \(unfused\) vs ([0-9.]+) \(fused\)", out)
    assert losses and abs(float(losses.group(1)) - float(losses.group(2))) < 1e-5, out
    assert "chunks of 64 tokens" in out, out  # the fused loss really ran in chunks (512 tokens)
    for line in (r"ratio fused / unfused peak memory: ([0-9.]+)x", r"ratio fused / unfused time: ([0-9.]+)x"):
        m = re.search(line, out)
        assert m and float(m.group(1)) > 0, (line, out)


GPU_BENCH = BENCH.with_name("bench_gpu.py")
GPU_CHECK = BENCH.with_name("gpu_check.sh")


def test_gpu_benchmark_throughput_smoke_run():
    """benchmarks/bench_gpu.py throughput --tiny: the GPU throughput code on CPU (fp32, no compile): distllm
    and HF get the same weights and loss, and both are timed."""
    r = subprocess.run([sys.executable, str(GPU_BENCH), "throughput", "--tiny"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("SUMMARY "))
    import json

    summary = json.loads(line[len("SUMMARY "):])
    a, b = summary["loss_check"]
    assert abs(a - b) < 1e-4 * abs(b), summary
    assert summary["distllm"]["tokens_per_s"] > 0 and summary["hf"]["tokens_per_s"] > 0 and summary["ratio_vs_hf"] > 0
    assert re.search(r"^distllm .* tokens/s .*MFU .*compile", r.stdout, re.M), r.stdout


def test_gpu_check_synthetic_data_is_a_valid_data_dir(tmp_path):
    sys.path.insert(0, str(GPU_BENCH.parent))
    import bench_gpu

    from distllm.data.loader import TokenShards
    from distllm.data.shards import verify

    data = bench_gpu.synth_data(argparse.Namespace(dir=str(tmp_path / "data"), tokens=50_000))
    manifest = verify(data, check_hashes=True)
    shards = TokenShards(data, "train")
    tokens = shards.window(0, shards.num_tokens)
    assert shards.num_tokens == 50_000 and int(tokens.max()) < manifest["tokenizer"]["vocab_size"]
    assert manifest["splits"]["train"]["num_documents"] > 50  # end-of-text tokens: documents to mask


def test_gpu_check_summary_names_each_part_and_the_cause_of_a_failure(tmp_path):
    sys.path.insert(0, str(GPU_BENCH.parent))
    import bench_gpu

    ok = tmp_path / "export.log"
    ok.write_text('SUMMARY {"export_max_abs_diff": 2e-06, "ok": true}\n')
    bad = tmp_path / "train.log"
    bad.write_text("distllm train: error: optim.warmup_steps (30) must be smaller than train.max_steps (1)\nTraceback\n")
    parts = tmp_path / "parts.tsv"
    parts.write_text(f"export\tok\t12\t{ok}\ntrain-ddp\tFAILED(exit 1)\t9\t{bad}\nllama-1b\tTIMEOUT\t190\t{tmp_path / 'x'}\n")
    text = "\n".join(bench_gpu.summary_lines(parts))
    assert re.search(r"^export\s+ok\s+12 s\s+max \|logit diff\| 2.0e-06", text, re.M), text
    assert re.search(r"^train-ddp\s+FAILED\(exit 1\)\s+9 s\s+distllm train: error: optim.warmup_steps", text, re.M), text
    assert text.endswith("1 of 3 parts ok; not ok: train-ddp, llama-1b"), text


@pytest.mark.slow
def test_gpu_check_script_runs_every_part_tiny_on_cpu(tmp_path):
    """GPU_CHECK_TINY=1 benchmarks/gpu_check.sh: the whole script (tests, two throughput runs, synthetic data,
    DDP and ZeRO-3 one-step `distllm train` runs, export parity) tiny on CPU: every part ok. About 1.5 min
    on 2 idle cores, 4.5 min on a busy machine."""
    env = {**os.environ, "GPU_CHECK_TINY": "1", "GPU_CHECK_DIR": str(tmp_path / "check"), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "7 of 7 parts ok" in r.stdout, r.stdout[-4000:]
