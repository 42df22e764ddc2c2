"""Peak memory and time of the training loss: the chunked cross-entropy fused with the output projection
(``distllm.model.fused_loss.linear_cross_entropy``, what ``model(x, labels=y)`` runs) against the unfused
path it replaced (logits = hidden @ weight.T, upcast to fp32, then ``distllm.loss.cross_entropy``).

    python benchmarks/bench_loss_memory.py                   # vocab 32,768, 16,384 tokens, width 256
    python benchmarks/bench_loss_memory.py --width 2048 --device cuda --dtype bf16
    python benchmarks/bench_loss_memory.py --tiny            # a seconds-long smoke run

What is measured: one forward + backward of the loss alone, from the final hidden states (N, d), a leaf
that requires grad, and the output weight (V, d) to the gradients of both (what the rest of the model
needs). The unfused path is today's ``next_token_loss`` before the fusion: on CPU the cross-entropy
overwrites the logits with log-probabilities (``consume=True``), on CUDA it does not. With ``--dtype
bf16`` both run under bf16 autocast (fp32 hidden states and weight, as under DDP).

Memory: each variant runs in a fresh subprocess. On CPU the figure is the growth of the peak resident
set over the loss (``VmHWM`` reset through ``/proc/self/clear_refs`` just before it, then read after;
glibc's mmap threshold fixed and huge pages on, as the ``distllm`` command runs); on CUDA the caching
allocator's ``max_memory_allocated`` over the loss. Inputs and their gradients' first allocation count
in both. Time: the median of --repeats runs of each variant in one further subprocess, the two
interleaved (alternating which goes first) so a busy machine slows both alike.
Targets: fused / unfused peak memory at most 0.35x, time at most 1.10x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("unfused", "fused")
MiB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=16384, help="N = batch x sequence")
    p.add_argument("--width", type=int, default=256, help="d_model (the hidden size)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk (default: the model's)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (after one warm-up)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = bf16 autocast")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="vocab 512, 512 tokens, width 32, chunks of 64 tokens")
    p.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab, args.tokens, args.width, args.chunk_tokens, args.repeats = 512, 512, 32, 64, 2
    return args


# ---------------------------------------------------------------------------------------------- worker


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> None:
    from distllm import hostmem

    if args.device == "cpu":
        hostmem.enable_huge_pages()  # as the distllm command does, before torch
    import torch

    from distllm.loss import cross_entropy
    from distllm.model.fused_loss import default_chunk_tokens, linear_cross_entropy

    if args.device == "cpu":
        hostmem.set_mmap_threshold()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.width, generator=g).to(device).requires_grad_()  # (N, d)
    weight = (torch.randn(args.vocab, args.width, generator=g) * args.width**-0.5).to(device).requires_grad_()  # (V, d)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)  # (N,)
    chunk = args.chunk_tokens or default_chunk_tokens(args.tokens)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def run(variant: str) -> float:
        """One forward + backward of the loss; returns the loss (the gradients land in .grad)."""
        hidden.grad = weight.grad = None
        with autocast:
            if variant == "fused":
                loss = linear_cross_entropy(hidden, weight, labels, chunk) / args.tokens
            else:
                logits = hidden @ weight.T  # (N, V) in the compute dtype
                loss = cross_entropy(logits.float(), labels, consume=device.type == "cpu")
                del logits
        loss.backward()
        return loss.item()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if args.worker == "memory":
        # the gradients' first allocation belongs to the loss: start without them
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            exact = reset_peak_rss()
            before = _status_kib("VmRSS") * 1024
        loss = run(args.variant)
        sync()
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kib("VmHWM") * 1024) - before
        report = {"peak_bytes": peak, "loss": loss, "exact_peak": device.type == "cuda" or exact}
    else:
        for variant in VARIANTS:  # warm-up
            run(variant)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        order = list(VARIANTS)
        for _ in range(args.repeats):
            for variant in order:
                sync()
                t0 = time.perf_counter()
                run(variant)
                sync()
                times[variant].append(time.perf_counter() - t0)
            order.reverse()
        report = {"seconds": {v: statistics.median(ts) for v, ts in times.items()}, "chunk_tokens": chunk,
                  "threads": torch.get_num_threads()}
    print("REPORT " + json.dumps(report), flush=True)


# ---------------------------------------------------------------------------------------------- driver


def spawn(args: argparse.Namespace, *extra: str) -> dict:
    forwarded = ["--vocab", str(args.vocab), "--tokens", str(args.tokens), "--width", str(args.width),
                 "--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype]
    if args.chunk_tokens:
        forwarded += ["--chunk-tokens", str(args.chunk_tokens)]
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    r = subprocess.run([sys.executable, __file__, *forwarded, *extra], capture_output=True, text=True, env=env,
                       timeout=3600)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-6000:])
        raise SystemExit(f"worker {' '.join(extra)} failed with exit code {r.returncode}")
    line = next(line for line in r.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    full_logits = args.tokens * args.vocab * 4
    print(f"loss of {args.tokens} tokens x vocabulary {args.vocab}, width {args.width}, {args.device} {args.dtype}"
          f"{' (autocast)' if args.dtype == 'bf16' else ''}; one fp32 copy of the logits = {full_logits / MiB:.0f} MiB")
    memory = {v: spawn(args, "--worker", "memory", "--variant", v) for v in VARIANTS}
    timing = spawn(args, "--worker", "time")
    what = "peak allocated (CUDA caching allocator)" if args.device == "cuda" else "peak RSS growth"
    if not all(m["exact_peak"] for m in memory.values()):
        what += " (VmHWM could not be reset: growth over the process's earlier peak, a lower bound)"
    print(f"fused: chunks of {timing['chunk_tokens']} tokens; {timing['threads']} threads; "
          f"losses {memory['unfused']['loss']:.6f} (unfused) vs {memory['fused']['loss']:.6f} (fused)")
    print(f"{'variant':<10}{'peak MiB':>12}{'x logits':>10}{'ms':>12}   memory: {what}")
    for v in VARIANTS:
        peak, sec = memory[v]["peak_bytes"], timing["seconds"][v]
        print(f"{v:<10}{peak / MiB:>12.1f}{peak / full_logits:>10.2f}{sec * 1e3:>12.1f}")
    mem_ratio = memory["fused"]["peak_bytes"] / memory["unfused"]["peak_bytes"]
    time_ratio = timing["seconds"]["fused"] / timing["seconds"]["unfused"]
    print(f"ratio fused / unfused peak memory: {mem_ratio:.3f}x (target <= 0.35x: {'met' if mem_ratio <= 0.35 else 'MISSED'})")
    print(f"ratio fused / unfused time: {time_ratio:.3f}x (target <= 1.10x: {'met' if time_ratio <= 1.10 else 'MISSED'})")


if __name__ == "__main__":
    main()
