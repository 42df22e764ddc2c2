"""Training tokens/s of 2-process DDP against 1 process on the same global batch, and DDP's communication cost.

    python benchmarks/bench_ddp_throughput.py           # 6 layers x 384 (13.7M params), 8 x 256 tokens per step
    python benchmarks/bench_ddp_throughput.py --tiny    # a toy model (smoke run)

Both runs use distllm's Runtime (``distributed.setup`` / ``parallelize`` / ``accumulate`` /
``backward`` / ``optimizer_step``: Accelerate's DDP over gloo for 2 processes) on the same global
batch of --global-batch sequences of --seq tokens, micro-batch --micro: one process runs 2x the
accumulation steps of each DDP rank. The machine has 2 cores, so one process gets 2 intra-op
threads and each DDP process 1: the ideal DDP/1-process ratio is about 1.0x, and what is lost
below it is communication, synchronisation and the less efficient 1-thread kernels. fp32, random
tokens, AdamW with clipping, as in training.

A 2-thread process suffers when other jobs keep the cores busy (each parallel region waits for its
slowest thread, and a descheduled thread stalls it), which 1-thread processes do not. So one
process with 1 thread also runs, the same per-process setting as a DDP rank: against it the ideal
DDP ratio is 2.0x and DDP's scaling efficiency is ratio / 2. The load average is printed.

Communication overhead is measured inside the DDP run by switching the gradient all-reduce off:
timed blocks of --steps steps alternate between normal steps (``rt.accumulate``: all-reduce on the
last micro-batch) and steps run entirely under ``accelerator.no_sync(model)`` (every micro-batch
computes and keeps local gradients; no collective at all in the step; the optimizer still steps,
so the two ranks' weights drift apart, which costs nothing in time). Each block starts and ends
with a barrier and its time is the same on both ranks. overhead = (synced - unsynced) / synced step
time: the part of the all-reduce that the backward pass does not hide, plus waiting for the slower
rank. As a floor, one all-reduce of a flat fp32 tensor of all parameters is also timed on its own.

Launches of the two configurations alternate (--launches each) and timed blocks alternate inside a
launch, so a noisy shared machine slows both alike; medians are reported. Timings are never checked.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multiproc import finish_worker, machine_load, run_workers, write_report  # noqa: E402

CONFIGS = ((1, 2), (2, 1), (1, 1))  # (processes, threads per process)
FULL_MODEL = {"n_layers": 6, "n_heads": 6, "d_model": 384, "vocab_size": 8192, "max_seq_len": 1024}
TINY_MODEL = {"n_layers": 2, "n_heads": 4, "d_model": 64, "vocab_size": 512, "max_seq_len": 64}
CORES = 2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a toy model: a seconds-long smoke run")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=4, help="micro-batch size (the same in both runs)")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--steps", type=int, default=2, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=2, help="timed blocks per mode in each launch")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per launch")
    p.add_argument("--launches", type=int, default=2, help="launches of each configuration, alternating")
    p.add_argument("--threads", type=int, default=CORES, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tiny:
        args.seq, args.micro, args.global_batch = 32, 2, 4
        args.steps, args.rounds, args.warmup, args.launches = 1, 1, 1, 1
    return args


# ---------------------------------------------------------------------------- worker (one rank)


def worker(args: argparse.Namespace) -> None:
    from distllm import hostmem

    hostmem.enable_huge_pages()  # before torch, as the distllm command does (distllm/hostmem.py)
    import torch

    from distllm import distributed

    from distllm.model import Transformer
    from distllm.config import from_dict
    from distllm.loss import next_token_loss
    from distllm.model import count_params
    from distllm.optim import build_optimizer

    shape = TINY_MODEL if args.tiny else FULL_MODEL
    cfg = from_dict({
        "model": shape,
        "tokenizer": {"vocab_size": shape["vocab_size"]},
        "data": {"seq_len": args.seq},
        "train": {"micro_batch_size": args.micro, "global_batch_size": args.global_batch, "max_steps": 10**6,
                  "device": "cpu", "precision": "fp32"},
    })
    rt = distributed.setup(cfg)
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model).to(rt.device)
    optimizer = build_optimizer(model, cfg.optim, rt.device.type)
    model, optimizer = rt.parallelize(model, optimizer, cfg.train)
    tokens = torch.Generator().manual_seed(rt.rank)
    batches = [torch.randint(0, shape["vocab_size"], (args.micro, args.seq + 1), generator=tokens)  # (B, T+1)
               for _ in range(rt.accum)]

    def step(sync: bool) -> None:
        for window in batches:
            with rt.accumulate(model) if sync else rt.accelerator.no_sync(model):
                rt.backward(next_token_loss(model, window))
        rt.optimizer_step(model, optimizer, cfg.optim.grad_clip)

    def block(sync: bool) -> float:
        rt.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(sync)
        rt.barrier()
        return (time.perf_counter() - t0) / args.steps

    for _ in range(args.warmup):
        step(sync=True)
    times: dict[str, list[float]] = {"synced": [], "unsynced": []}
    modes = [True, False] if rt.world_size > 1 else [True]
    for r in range(args.rounds):
        for sync in modes if r % 2 == 0 else modes[::-1]:
            times["synced" if sync else "unsynced"].append(block(sync))
    allreduce = []
    if rt.world_size > 1:  # the floor: one all-reduce of every gradient element, in one flat buffer
        flat = torch.zeros(count_params(cfg.model))
        for _ in range(3):
            rt.barrier()
            t0 = time.perf_counter()
            torch.distributed.all_reduce(flat)
            allreduce.append(time.perf_counter() - t0)
    write_report(args.out, args.tag, rt.rank, {
        "world_size": rt.world_size, "accum": rt.accum, "threads": torch.get_num_threads(),
        "params": count_params(cfg.model), "times": times, "allreduce": allreduce,
    })
    finish_worker()


# ---------------------------------------------------------------------------- driver


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    shape = TINY_MODEL if args.tiny else FULL_MODEL
    tokens_per_step = args.global_batch * args.seq
    print(f"model {shape} | global batch {args.global_batch} x {args.seq} tokens, micro {args.micro}, fp32 | "
          f"{machine_load()}")
    common = [f"--seq={args.seq}", f"--micro={args.micro}", f"--global-batch={args.global_batch}",
              f"--steps={args.steps}", f"--rounds={args.rounds}", f"--warmup={args.warmup}"]
    common += ["--tiny"] if args.tiny else []
    runs: dict[tuple[int, int], list[dict]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        for i in range(args.launches):
            for nproc, threads in CONFIGS if i % 2 == 0 else CONFIGS[::-1]:
                t0 = time.perf_counter()
                rank0 = run_workers(__file__, nproc, [*common, f"--threads={threads}"], Path(tmp),
                                    tag=f"n{nproc}t{threads}-{i}", threads=threads)[0]
                runs[nproc, threads].append(rank0)
                print(f"  launch {i + 1}: {nproc} process(es) x {rank0['threads']} thread(s), accumulation "
                      f"{rank0['accum']}, {time.perf_counter() - t0:.0f} s | {machine_load()}", flush=True)

    def median(config: tuple[int, int], mode: str) -> float:
        return statistics.median(t for run in runs[config] for t in run["times"][mode])

    single, single1 = median((1, 2), "synced"), median((1, 1), "synced")
    synced, unsynced = median((2, 1), "synced"), median((2, 1), "unsynced")
    allreduce = statistics.median(t for run in runs[2, 1] for t in run["allreduce"])
    params = runs[2, 1][0]["params"]
    print(f"\n{'run (median step time)':<44}{'s/step':>8}{'tokens/s':>10}")
    for name, t in (("1 process x 2 threads", single), ("1 process x 1 thread", single1),
                    ("DDP 2 processes x 1 thread", synced), ("DDP 2 processes, all-reduce off (no_sync)", unsynced)):
        print(f"{name:<44}{t:>8.3f}{tokens_per_step / t:>10.0f}")
    print(f"\nratio DDP/1-process tokens/s: {single / synced:.2f}x (1 process x 2 threads; ideal about 1.0x on "
          f"{CORES} cores)")
    print(f"ratio DDP/1-process-1-thread tokens/s: {single1 / synced:.2f}x (ideal 2.0x: scaling efficiency "
          f"{single1 / synced / 2:.0%})")
    print(f"ratio DDP-without-all-reduce/1-process tokens/s: {single / unsynced:.2f}x (compute split alone; "
          f"vs 1 thread {single1 / unsynced:.2f}x)")
    print(f"communication overhead: {(synced - unsynced) / synced:.1%} of a DDP step "
          f"({(synced - unsynced) * 1e3:.0f} ms per step, synced minus no_sync)")
    print(f"all-reduce of {params / 1e6:.1f}M fp32 gradients in one flat buffer: {allreduce * 1e3:.0f} ms "
          f"({4 * params / allreduce / 1e9:.2f} GB/s; {allreduce / synced:.1%} of a DDP step if not overlapped)")
    print(f"done | {machine_load()}")


if __name__ == "__main__":
    main()
