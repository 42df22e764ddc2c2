"""Memory and time of distllm's chunked distillation loss against a straightforward one, same run.

The straightforward loss (what most KD code does) takes log_softmax of the whole (N, V) student and
teacher logits, F.kl_div and F.cross_entropy, and lets autograd keep its intermediates for backward.
``distill.distill_loss`` processes counted positions a chunk at a time and computes each chunk's
gradient during the forward pass into one (N, V) buffer. Each variant runs forward + backward in a
fresh process with a fixed 4 MiB mmap threshold (``hostmem``: freed tensors leave the RSS); printed
per variant: memory held from forward to backward (RSS after the forward pass), peak RSS during
forward and backward (both over the inputs' RSS), seconds (median of ``--rounds``), and the ratios
distllm / straightforward. Both losses are checked equal first.

    python benchmarks/bench_distill_loss.py [--tokens 2048] [--vocab 32000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def straightforward(student, teacher, labels, alpha, T):
    import torch.nn.functional as F

    keep = labels != -100
    s, t, y = student[keep], teacher[keep], labels[keep]
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="sum", log_target=True)
    return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y, reduction="sum")


def ours(student, teacher, labels, alpha, T):
    from distllm.distill import distill_loss

    return distill_loss(student, labels, teacher_logits=teacher, kind="forward_kl", alpha=alpha, temperature=T)[0]


VARIANTS = {"straightforward": straightforward, "distllm": ours}


def inputs(tokens: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    student = torch.randn(tokens, vocab, generator=g)
    teacher = torch.randn(tokens, vocab, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[: tokens // 4] = -100  # a prompt: not counted
    return student, teacher, labels


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(name: str, tokens: int, vocab: int, rounds: int, threads: int) -> dict:
    from distllm import hostmem  # the parent process never imports torch

    hostmem.set_mmap_threshold()
    import torch

    from distllm.distill import CHUNK_ELEMENTS

    torch.set_num_threads(threads)
    fn = VARIANTS[name]
    student, teacher, labels = inputs(tokens, vocab)
    x = student.clone().requires_grad_(True)
    (x * 0).sum().backward()  # x.grad allocated before the baseline (later gradients accumulate into it)
    base = rss()
    times, held = [], 0
    for r in range(rounds):
        t0 = time.perf_counter()
        loss = fn(x, teacher, labels, 0.5, 2.0)
        held = max(held, rss() - base)
        loss.backward()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"held": held, "peak": peak, "seconds": statistics.median(times[1:] or times), "loss": loss.item(),
            "chunk": CHUNK_ELEMENTS // vocab}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.vocab, args.rounds, args.threads)))
        return
    results = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    a, b = results["distllm"], results["straightforward"]
    assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a["loss"], b["loss"])
    mb = 1 << 20
    print(f"{args.tokens} tokens x {args.vocab} vocabulary (one fp32 copy: {args.tokens * args.vocab * 4 / mb:.0f} MB), "
          f"forward KL + CE, forward and backward, chunks of {a['chunk']} positions; loss check {a['loss']:.4f} == {b['loss']:.4f}")
    for name, r in results.items():
        print(f"{name:16s} held for backward {r['held'] / mb:8.1f} MB   peak {r['peak'] / mb:8.1f} MB"
              f"   {r['seconds']:.3f} s")
    print(f"ratio distllm / straightforward: held for backward {a['held'] / max(b['held'], 1):.2f}x, "
          f"peak {a['peak'] / max(b['peak'], 1):.2f}x, time {a['seconds'] / b['seconds']:.2f}x")


if __name__ == "__main__":
    main()
