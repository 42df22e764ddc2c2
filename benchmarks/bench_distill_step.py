"""Distillation step time against its parts, measured in one run: (student training step + teacher forward).

    python benchmarks/bench_distill_step.py                   # the debug shapes: teacher 4 x 192, student 2 x 128
    python benchmarks/bench_distill_step.py --rounds 2 --vocab 512 --batch 2   # quick smoke run

Four kinds of step on the same batch (B x T tokens, vocabulary V), each as the loop runs it (forward,
backward, AdamW step, zero_grad):

* ``student``: the student's pretraining step (the model's fused, chunked cross-entropy);
* ``teacher``: the teacher's forward alone (no gradients, eval mode): what online distillation adds;
* ``online``: the distillation step of ``distllm distill`` (``distillation.distill_objective``: teacher
  forward, student logits, ``alpha * T^2 * KL + (1 - alpha) * CE`` in chunks);
* ``offline``: the same with the teacher's top-k read from a top-k directory written beforehand (the read
  included), no teacher.

Prints the median of each and the ratios ``online / (student + teacher)`` (the distillation's own
overhead; the target is at most 1.10) and ``offline / online``. The kinds are interleaved, a block per
round in rotating order, so that a noisy shared machine slows all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

from distllm.config import DistillConfig, ModelConfig
from distllm.data.topk import TeacherTopK, TopKWriter, TopKMeta
from distllm.distill import teacher_topk
from distllm.distillation import distill_objective
from distllm.model import Transformer, count_params
from distllm.teacher import Teacher


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="4,4,2,192", help="layers,heads,kv_heads,width (default: configs/debug.yaml)")
    p.add_argument("--student", default="2,4,2,128", help="layers,heads,kv_heads,width (configs/distill-debug.yaml)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, default=32, help="top-k of the offline step")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed steps per kind per round")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def model(shape: str, vocab: int, seq: int, seed: int) -> Transformer:
    layers, heads, kv, width = map(int, shape.split(","))
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, n_layers=layers, n_heads=heads, n_kv_heads=kv, d_model=width,
                                   max_seq_len=seq))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T, V = args.batch, args.seq, args.vocab
    student = model(args.student, V, T, 0)
    teacher_model = model(args.teacher, V, T, 1).eval().requires_grad_(False)
    teacher = Teacher(teacher_model, "distllm", "random", count_params(teacher_model.cfg), count_params(teacher_model.cfg))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, V, (B, T + 1), generator=g)
    batch = {"input_ids": window[:, :-1], "labels": window[:, 1:]}
    d = DistillConfig(alpha=0.5, temperature=2.0)

    tmp = tempfile.TemporaryDirectory()
    ids, lp, tail = teacher_topk(teacher(batch["input_ids"]), args.k, d.temperature)
    meta = TopKMeta(k=args.k, temperature=d.temperature, seq_len=T, num_samples=B, data_id="bench",
                    tokenizer_fingerprint="bench", vocab_size=V)
    writer = TopKWriter(tmp.name, meta)
    writer.write(ids.numpy(), lp.numpy(), tail.numpy())
    writer.close()
    reader = TeacherTopK(tmp.name)
    rows = np.arange(B)

    def finish(loss):
        (loss / B / T).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def student_step():
        finish(student(batch["input_ids"], labels=batch["labels"]))

    def teacher_forward():
        teacher(batch["input_ids"])

    def online_step():
        finish(distill_objective(student, batch, d, teacher)[0])

    def offline_step():
        top = {k: torch.from_numpy(v) for k, v in reader.read(rows).items()}
        finish(distill_objective(student, {**batch, **top}, d)[0])

    kinds = {"student": student_step, "teacher": teacher_forward, "online": online_step, "offline": offline_step}
    times = {k: [] for k in kinds}
    for fn in kinds.values():  # warm-up
        fn()
    names = list(kinds)
    for r in range(args.rounds):
        for name in names[r % 4:] + names[: r % 4]:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                kinds[name]()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"teacher {args.teacher} ({teacher.num_params / 1e6:.2f}M), student {args.student} "
          f"({count_params(student.cfg) / 1e6:.2f}M), batch {B} x {T}, vocab {V}, top-{args.k}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
    for k in kinds:
        print(f"  {k:8s} {1000 * med[k]:9.1f} ms (median)")
    ratio = med["online"] / (med["student"] + med["teacher"])
    print(f"online distillation / (student step + teacher forward) = {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%)")
    print(f"offline top-{args.k} step / online step = {med['offline'] / med['online']:.3f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
