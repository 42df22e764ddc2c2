"""Checkpoint save and load of a ~100M-parameter model with AdamW state: distllm against torch.save and DeepSpeed.

    python benchmarks/bench_checkpoint.py             # 100.7M params (d_model 768 x 12 layers, vocab 20480)
    python benchmarks/bench_checkpoint.py --tiny      # a toy model (smoke run, seconds)
    python benchmarks/bench_checkpoint.py --no-multi  # one process only

Part 1, one process (``distributed.local_runtime()``), fp32 on the CPU: the model (the gpt2-124m
preset's shape with a 20480-token vocabulary) takes one AdamW step on random tokens so that the
moments exist, then, alternating over --rounds rounds:

* distllm: ``checkpoint.save`` (safetensors weights + moments hashed as they are written, RNG and state
  JSON, fsync of every file and directory, the ``COMPLETE`` manifest, atomic rename) and
  ``checkpoint.load`` (sha256 of the files read, in threads, then weights and moments copied in); and
  an asynchronous save through ``Checkpointer(async_save=True)``: the time ``save`` blocks the caller
  (the snapshot) and the time until it is committed;
* baseline: ``torch.save({"model": ..., "optimizer": ...})`` + fsync of the file, and ``torch.load``
  + ``load_state_dict``.

distllm's save and its baseline's alternate within each round (which goes first alternates too), after an
untimed warm-up save of each (the first writes into a fresh page cache are slow on a VM), and each starts
from a settled disk: ``os.sync`` first, so that no save pays for the writeback of the one before (DeepSpeed
and a plain ``torch.save`` leave their pages dirty). Until December the baselines ran after all of distllm's
rounds, on a warmer machine; that order alone made distllm's save look 2-3x slower.

Part 2, 2 processes (``torchrun``, gloo) for DDP, ZeRO-2 and ZeRO-3: distllm's save (each rank writes
its share, nothing gathered) against, in the same job, DeepSpeed's ``engine.save_checkpoint`` (ZeRO) or
rank 0's ``torch.save`` + fsync of the whole state (DDP: what a DDP script does); the asynchronous
save's blocking time against the synchronous save; load on the 2 ranks against DeepSpeed's
``load_checkpoint``. Times run barrier to barrier. Part 3 loads part 2's 2-rank checkpoints into one
process. ``--ranks 1`` runs part 2 on one rank, which then has a spare core for its hashing thread, as a
rank on a GPU node has (8 GPUs on 100+ cores); with 2 ranks on 2 cores, sha256 competes with the writes.

Peak host memory during a save: the growth of this process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) over its RSS before the save, until the save is committed: a synchronous
CPU save writes the tensors in place, an asynchronous one copies them to host memory first (its price).
Files go to --dir (default: a temporary directory) and are read back from a warm page cache.
Medians and bests (minimums) over the rounds are printed, and the ratios of both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multiproc import finish_worker, machine_load, run_workers, write_report  # noqa: E402

FULL_MODEL = {"n_layers": 12, "n_heads": 12, "d_model": 768, "ffn_hidden": 2048, "vocab_size": 20480,
              "max_seq_len": 1024, "tie_embeddings": True}
TINY_MODEL = {"n_layers": 2, "n_heads": 4, "d_model": 64, "ffn_hidden": 192, "vocab_size": 512,
              "max_seq_len": 64, "tie_embeddings": True}
SEQ = 128
MB = 1e6


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a toy model: a seconds-long smoke run (with --no-multi)")
    p.add_argument("--rounds", type=int, default=3, help="save+load rounds per format, alternating")
    p.add_argument("--no-multi", action="store_true", help="skip the 2-process parts (DDP, ZeRO-2, ZeRO-3)")
    p.add_argument("--engines", default="ddp,zero2,zero3", help="2-process engines to measure (comma-separated)")
    p.add_argument("--ranks", type=int, default=2, help="processes for part 2 (1: one rank with the other cores "
                   "free, as a GPU node's rank has them)")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tiny:
        args.rounds = 1
    return args


def config(tiny: bool, zero_stage: int | None = None, world: int = 1):
    from distllm.config import from_dict

    shape = TINY_MODEL if tiny else FULL_MODEL
    return from_dict({
        "model": shape,
        "tokenizer": {"vocab_size": shape["vocab_size"]},
        "data": {"seq_len": min(SEQ, shape["max_seq_len"])},
        "train": {"micro_batch_size": 1, "global_batch_size": world, "max_steps": 10,
                  "device": "cpu", "precision": "fp32"},
        "optim": {"warmup_steps": 0},
        "distributed": {"zero_stage": zero_stage},
    })


def train_state(cfg) -> dict:
    """What the training loop puts beside the tensors (its state.json)."""
    return {"data": {"epoch": 0, "sample": 1}, "tokenizer_fingerprint": "bench", "config": cfg.to_dict(),
            "tokens_seen": cfg.data.seq_len, "skipped_steps": 0}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@contextlib.contextmanager
def time_calls(totals: dict[str, float]):
    """Sum the seconds spent in the functions distllm's save/load calls, by part, into ``totals``."""
    from distllm import checkpoint

    targets = [(checkpoint, "sha256_file", "sha256"), (checkpoint.tensorfile, "write", "write+hash+fsync tensors"),
               (checkpoint, "own_shard", "collect state")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]

    def wrap(fn, part):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[part] += time.perf_counter() - t0
        return timed

    for (owner, name, part), (_, _, fn) in zip(targets, originals):
        setattr(owner, name, wrap(fn, part))
    try:
        yield totals
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def one_step(model, optimizer, rt, vocab: int, seq: int) -> None:
    """One training step on random tokens, so that AdamW's moments exist."""
    import torch

    from distllm.loss import next_token_loss

    window = torch.randint(0, vocab, (1, seq + 1), generator=torch.Generator().manual_seed(rt.rank))  # (B, T+1)
    if rt.accelerator is None:
        next_token_loss(model, window).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    with rt.accumulate(model):
        rt.backward(next_token_loss(model, window))
    rt.optimizer_step(model, optimizer, 1.0)


@contextlib.contextmanager
def peak_growth(out: dict, key: str):
    """The growth of this process's peak RSS over its RSS at entry, into ``out[key]`` (bytes)."""
    from multiproc import peak_rss_bytes, rss_bytes

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = rss_bytes()
    try:
        yield
    finally:
        out[key] = max(0, peak_rss_bytes() - before)


def settle(barrier=lambda: None) -> None:
    """Before each timed save: every dirty page of the previous writer is on disk (``os.sync``), so that no save
    pays for another's writeback (DeepSpeed's ``save_checkpoint`` and a plain ``torch.save`` leave theirs
    unsynced), and every rank starts together."""
    os.sync()
    barrier()


def save_rounds(rt, cfg, model, optimizer, run_root: Path, rounds: int, t: dict, mem: dict, baseline,
                barrier=lambda: None):
    """distllm's synchronous save alternated with ``baseline(round)`` (which times itself into ``t``), then
    distllm's load and its asynchronous save (blocked / until committed); into ``t``.

    An untimed warm-up save of each comes first (a fresh page cache is slow to fill at first), the order of
    the two saves alternates from round to round, and each starts from a settled disk (``settle``)."""
    from distllm import checkpoint

    def timed(name, fn):
        barrier()
        t0 = time.perf_counter()
        out = fn()
        barrier()
        t[name].append(time.perf_counter() - t0)
        return out

    def distllm_save(r: int, record: bool = True) -> Path:
        run_dir = run_root / f"distllm-{r}"
        if not record:
            return checkpoint.save(rt, run_dir, 1, model, optimizer, train_state(cfg), keep_last=1)
        parts: dict[str, float] = defaultdict(float)
        with time_calls(parts), peak_growth(mem, "distllm save"):
            path = timed("distllm save", lambda: checkpoint.save(rt, run_dir, 1, model, optimizer,
                                                                 train_state(cfg), keep_last=1))
        for part, sec in parts.items():
            t[f"distllm save: {part} (rank {rt.rank})"].append(sec)
        return path

    def remove(path: Path) -> None:
        if rt.is_main:
            shutil.rmtree(path)
        barrier()

    remove(distllm_save(-1, record=False).parent.parent)  # the warm-ups: recorded nowhere
    baseline(-1)
    path = None
    saver = checkpoint.Checkpointer(rt, run_root / "async", 1, None, async_save=True)  # one, as in a training run
    for r in range(rounds):
        if path is not None:
            remove(path.parent.parent)
        for which in (("distllm", "baseline") if r % 2 == 0 else ("baseline", "distllm")):
            settle(barrier)
            if which == "distllm":
                path = distllm_save(r)
            else:
                baseline(r)
        timed("distllm load", lambda: checkpoint.load(rt, path, model, optimizer, verify=True))
        timed("distllm load, verify=False", lambda: checkpoint.load(rt, path, model, optimizer, verify=False))
        # the first asynchronous save allocates its host buffer; later ones reuse it
        which = "first" if r == 0 else "later"
        settle(barrier)
        with peak_growth(mem, f"distllm async save ({which})"):
            timed(f"distllm async save ({which}): blocked", lambda: saver.save(r + 1, model, optimizer,
                                                                               train_state(cfg)))
            timed(f"distllm async save ({which}): until committed", saver.wait)
        t[f"distllm async save ({which}): until committed"][-1] += t[f"distllm async save ({which}): blocked"][-1]
    return path


def report(title: str, t: dict, rounds: int) -> "Times":
    times = Times(t)
    print(f"{title + ' (' + str(rounds) + ' rounds)':<56}{'median':>9}{'best':>9}")
    for k in t:
        print(f"{k:<56}{times.med[k]:>9.2f}{times.best[k]:>9.2f}")
    return times


class Times:
    """Medians and bests (minimums) over the rounds, and ratios of both: on a shared VM a round can be slowed 2-4x
    by other tenants or by the first touch of returned memory, the best round shows each side's own cost."""

    def __init__(self, t: dict):
        self.med = {k: statistics.median(v) for k, v in t.items()}
        self.best = {k: min(v) for k, v in t.items()}

    def ratio(self, a: str, b: str) -> str:
        return f"{self.med[a] / self.med[b]:.2f}x (best rounds {self.best[a] / self.best[b]:.2f}x)"


def async_blocked(times: "Times") -> str:
    """The blocking time of an asynchronous save in a running job (a later one: the first allocates its buffer)
    against the synchronous save."""
    later = "distllm async save (later): blocked"
    return times.ratio(later if later in times.med else "distllm async save (first): blocked", "distllm save")


def print_memory(mem: dict, state_bytes: float) -> None:
    order = sorted(mem, key=lambda k: not k.startswith("distllm"))  # distllm's first, then the baseline's
    print("peak host memory growth during a save: " + ", ".join(f"{k} {mem[k] / MB:.0f} MB" for k in order)
          + f" (this rank's share of the state: {state_bytes / MB:.0f} MB)")


# ---------------------------------------------------------------------------- part 1: one process


def single_process(args: argparse.Namespace, root: Path) -> None:
    import torch

    from distllm import checkpoint, distributed
    from distllm.model import Transformer, count_params
    from distllm.optim import build_optimizer

    cfg = config(args.tiny)
    rt = distributed.local_runtime()
    torch.set_num_threads(1)  # as the 2-process workers: on a loaded machine, OpenMP's spinning threads slow copies 8x
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    one_step(model, optimizer, rt, cfg.model.vocab_size, cfg.data.seq_len)
    print(f"part 1: one process (1 intra-op thread), {count_params(cfg.model) / 1e6:.1f}M parameters + AdamW moments, fp32 | "
          f"{machine_load()}", flush=True)
    t: dict[str, list[float]] = defaultdict(list)
    mem: dict[str, int] = {}

    def torch_save(r: int) -> None:
        file = root / f"torch-{r}.pt"
        with peak_growth(mem, "torch.save"):
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, file)
            checkpoint.fsync_path(file)  # the fsync distllm's save does
            seconds = time.perf_counter() - t0
        if r >= 0:
            t["torch.save + fsync"].append(seconds)
        file.unlink()

    save_rounds(rt, cfg, model, optimizer, root / "one", args.rounds, t, mem, torch_save)
    shutil.rmtree(root / "one")
    file = root / "torch.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, file)
    for r in range(args.rounds):
        t0 = time.perf_counter()
        state = torch.load(file, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        t["torch.load + load_state_dict"].append(time.perf_counter() - t0)
        del state
    file.unlink()
    times = report("\npart 1", t, args.rounds)
    print(f"ratio one-process distllm save / torch.save + fsync: {times.ratio('distllm save', 'torch.save + fsync')} "
          "(target <= 1.0x)")
    print(f"ratio async save blocked / sync save: {async_blocked(times)} (target <= 0.2x; the first, allocating its "
          f"buffer: {times.ratio('distllm async save (first): blocked', 'distllm save')}); async until committed "
          f"{times.med['distllm async save (first): until committed']:.2f} s")
    print(f"ratio distllm load / torch.load + load_state_dict: {times.ratio('distllm load', 'torch.load + load_state_dict')} "
          f"(verify=False: {times.ratio('distllm load, verify=False', 'torch.load + load_state_dict')})")
    state_bytes = sum(p.numel() * 12 for p in model.parameters())
    print_memory(mem, state_bytes)


# ---------------------------------------------------------------------------- part 2: 2 processes


def worker(args: argparse.Namespace) -> None:
    import torch

    from distllm import checkpoint, distributed
    from distllm.model import Transformer
    from distllm.optim import build_optimizer

    stage = None if args.mode == "ddp" else int(args.mode.removeprefix("zero"))
    cfg = config(args.tiny, zero_stage=stage, world=args.ranks)
    rt = distributed.setup(cfg)
    torch.manual_seed(cfg.train.seed)
    with rt.init_context():
        model = Transformer(cfg.model)
    if stage != 3:
        model = model.to(rt.device)
    optimizer = build_optimizer(model, cfg.optim, rt.device.type)
    model, optimizer = rt.parallelize(model, optimizer, cfg.train)
    one_step(model, optimizer, rt, cfg.model.vocab_size, cfg.data.seq_len)
    rt.unwrap(model)  # Accelerate imports DeepSpeed on its first unwrap (5 s): not the save's cost
    root = Path(args.dir) / args.mode
    t: dict[str, list[float]] = defaultdict(list)
    mem: dict[str, int] = {}

    def timed(name: str, fn):
        rt.barrier()
        t0 = time.perf_counter()
        out = fn()
        rt.barrier()
        t[name].append(time.perf_counter() - t0)
        return out

    def baseline(r: int) -> None:
        """DeepSpeed's save_checkpoint (ZeRO; also with the fsync of its files that distllm's save includes) or
        rank 0's torch.save + fsync of the whole state (DDP: what a DDP script does)."""
        base = root / f"baseline-{r}"
        if rt.deepspeed:
            rt.barrier()
            t0 = time.perf_counter()
            with peak_growth(mem, "deepspeed save_checkpoint"):
                model.save_checkpoint(str(base), tag="step1")
            rt.barrier()
            plain = time.perf_counter() - t0
            # DeepSpeed does not fsync: what the same durability costs it (each rank its own files)
            for f in sorted(base.rglob("*")):
                zero_rank = re.search(r"zero_pp_rank_(\d+)_", f.name)  # ZeRO shards; the rest is rank 0's
                if f.is_file() and (int(zero_rank.group(1)) == rt.rank if zero_rank else rt.is_main):
                    checkpoint.fsync_path(f)
            rt.barrier()
            if r >= 0:
                t["deepspeed save_checkpoint"].append(plain)
                t["deepspeed save_checkpoint + fsync"].append(time.perf_counter() - t0)
        else:
            rt.barrier()
            t0 = time.perf_counter()
            with peak_growth(mem, "rank-0 torch.save"):
                if rt.is_main:
                    base.mkdir(parents=True, exist_ok=True)
                    file = base / "state.pt"
                    torch.save({"model": rt.unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}, file)
                    checkpoint.fsync_path(file)
            rt.barrier()
            if r >= 0:
                t["rank-0 torch.save + fsync"].append(time.perf_counter() - t0)
        if rt.is_main and (r < 0 or not rt.deepspeed):
            shutil.rmtree(base, ignore_errors=True)
        rt.barrier()

    path = save_rounds(rt, cfg, model, optimizer, root, args.rounds, t, mem, baseline, barrier=rt.barrier)
    # DeepSpeed's loads last: its load_checkpoint re-links the parameters to fresh fragments
    for r in range(args.rounds if rt.deepspeed else 0):
        timed("deepspeed load_checkpoint", lambda: model.load_checkpoint(str(root / f"baseline-{r}"), tag="step1"))
    if rt.is_main:
        for r in range(args.rounds):
            shutil.rmtree(root / f"baseline-{r}", ignore_errors=True)
    rt.barrier()
    if rt.is_main:  # kept for part 3: a 2-rank checkpoint loaded into one process
        shutil.copytree(path, Path(args.dir) / f"keep-{args.mode}")
    from distllm.model import count_params

    write_report(args.out, args.tag, rt.rank, {"times": t, "mem": mem, "state_bytes": count_params(cfg.model) * 12})
    finish_worker()


def two_processes(args: argparse.Namespace, root: Path, mode: str) -> None:
    print(f"\npart 2: {args.ranks} processes, {mode} | {machine_load()}", flush=True)
    extra = [f"--rounds={args.rounds}", f"--dir={root}", f"--mode={mode}", f"--ranks={args.ranks}"] + \
        (["--tiny"] if args.tiny else [])
    reports = run_workers(__file__, args.ranks, extra, root, tag=mode, threads=1, torchrun=True)
    times = report(f"part 2, {mode}, rank 0", reports[0]["times"], args.rounds)
    if mode == "ddp":
        print(f"ratio DDP distllm save / rank-0 torch.save + fsync: {times.ratio('distllm save', 'rank-0 torch.save + fsync')} "
              "(target <= 1.0x)")
    else:
        print(f"ratio {mode} distllm save / deepspeed save_checkpoint: "
              f"{times.ratio('distllm save', 'deepspeed save_checkpoint')} (target <= 1.0x; / deepspeed save_checkpoint + "
              f"fsync of its files, the durability distllm's save includes: "
              f"{times.ratio('distllm save', 'deepspeed save_checkpoint + fsync')})")
        print(f"ratio {mode} distllm load ({args.ranks} ranks) / deepspeed load_checkpoint: "
              f"{times.ratio('distllm load', 'deepspeed load_checkpoint')} (verify=False, no sha256: "
              f"{times.ratio('distllm load, verify=False', 'deepspeed load_checkpoint')})")
    print(f"ratio {mode} async save blocked / sync save: {async_blocked(times)} (target <= 0.2x; the first, allocating "
          f"its buffer: {times.ratio('distllm async save (first): blocked', 'distllm save')})")
    for rank, rep in enumerate(reports):
        print(f"rank {rank}: ", end="")
        print_memory(rep["mem"], rep["state_bytes"] / args.ranks)  # what each rank writes (DDP: its share)


def one_process_load(args: argparse.Namespace, root: Path, modes: list[str]) -> None:
    import torch

    from distllm import checkpoint, distributed
    from distllm.model import Transformer
    from distllm.optim import build_optimizer

    cfg = config(args.tiny)
    rt = distributed.local_runtime()
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    one_step(model, optimizer, rt, cfg.model.vocab_size, cfg.data.seq_len)
    print(f"\npart 3: one process loads the {args.ranks}-rank checkpoints | {machine_load()}")
    for mode in modes:
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            checkpoint.load(rt, root / f"keep-{mode}", model, optimizer, verify=True)
            times.append(time.perf_counter() - t0)
        print(f"{f'1-rank load of a {args.ranks}-rank {mode} checkpoint':<56}{statistics.median(times):>9.2f}")


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-", dir=args.dir) as tmp:
        single_process(args, Path(tmp))
        if not args.no_multi:
            modes = args.engines.split(",")
            for mode in modes:
                two_processes(args, Path(tmp), mode)
            one_process_load(args, Path(tmp), modes)
    print(f"done | {machine_load()}")


if __name__ == "__main__":
    main()
