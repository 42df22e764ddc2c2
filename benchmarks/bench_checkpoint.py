"""Checkpoint save and load of a ~100M-parameter model with AdamW state: distllm's format against torch.save/load.

    python benchmarks/bench_checkpoint.py             # 100.7M params (d_model 768 x 12 layers, vocab 20480)
    python benchmarks/bench_checkpoint.py --tiny      # a toy model, one process only (smoke run, seconds)
    python benchmarks/bench_checkpoint.py --no-zero2  # skip the 2-process ZeRO-2 part

Part 1, one process (``distributed.local_runtime()``), fp32 on the CPU: the model (the gpt2-124m
preset's shape with a 20480-token vocabulary) takes one AdamW step on random tokens so that the
moments exist, then, alternating over --rounds rounds:

* distllm: ``checkpoint.save`` (safetensors weights + moments, RNG and state JSON, fsync of every file
  and of the directories, sha256 of every file into the ``COMPLETE`` manifest, atomic rename) and
  ``checkpoint.load`` (sha256 of every file checked against the manifest, then weights and moments
  copied into the live model and optimizer; also timed with ``verify=False``);
* baseline: ``torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()})`` to one
  file (timed alone and with an fsync added, since distllm's figure includes its fsyncs) and
  ``torch.load(weights_only=True)`` followed by ``load_state_dict`` on the model and the optimizer.

Inside the timed distllm calls, the time spent in four functions is summed by thin wrappers:
sha256 hashing (``checkpoint.sha256_file``), fsync (``checkpoint.fsync_path``), writing tensors
(``safetensors.torch.save_file``) and collecting the state to write (``checkpoint.owned_state``).

The training loop is blocked for the whole save: ``checkpoint.save`` is synchronous, so blocked
time = total time. Files are written to --dir (default: a temporary directory) and read back right
after, from a warm page cache, for both formats alike. Medians over the rounds are printed.

Part 2 (optional, on by default at full size): the same model on 2 processes under DeepSpeed ZeRO-2
(``torchrun``, gloo): distllm's collective save/load (every parameter gathered whole; each rank
writes the parameters it owns) against DeepSpeed's own ``engine.save_checkpoint`` /
``load_checkpoint`` (sharded optimizer state, no gathering) in the same job: all distllm rounds
first, then DeepSpeed's (after DeepSpeed's ``load_checkpoint``, ``safe_get_full_optimizer_state``
no longer works: it re-links the parameters without their optimizer state).
"""

from __future__ import annotations

import argparse
import contextlib
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
    p.add_argument("--tiny", action="store_true", help="a toy model on one process: a seconds-long smoke run")
    p.add_argument("--rounds", type=int, default=3, help="save+load rounds per format, alternating")
    p.add_argument("--no-zero2", action="store_true", help="skip the 2-process ZeRO-2 part")
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tiny:
        args.rounds, args.no_zero2 = 1, True
    return args


def config(tiny: bool, zero_stage: int | None = None):
    from distllm.config import from_dict

    shape = TINY_MODEL if tiny else FULL_MODEL
    return from_dict({
        "model": shape,
        "tokenizer": {"vocab_size": shape["vocab_size"]},
        "data": {"seq_len": min(SEQ, shape["max_seq_len"])},
        "train": {"micro_batch_size": 1, "global_batch_size": 2 if zero_stage is not None else 1, "max_steps": 10,
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
    import safetensors.torch

    from distllm import checkpoint

    targets = [(checkpoint, "sha256_file", "sha256"), (checkpoint, "fsync_path", "fsync"),
               (safetensors.torch, "save_file", "write tensors"), (checkpoint, "owned_state", "collect state")]
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


# ---------------------------------------------------------------------------- part 1: one process


def single_process(args: argparse.Namespace, root: Path) -> dict[str, list[float]]:
    import torch

    from distllm import checkpoint, distributed

    from distllm.model import Transformer
    from distllm.model import count_params
    from distllm.optim import build_optimizer

    cfg = config(args.tiny)
    rt = distributed.local_runtime()
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    one_step(model, optimizer, rt, cfg.model.vocab_size, cfg.data.seq_len)
    print(f"part 1: one process, {count_params(cfg.model) / 1e6:.1f}M parameters + AdamW moments, fp32 | "
          f"{machine_load()}", flush=True)

    t: dict[str, list[float]] = defaultdict(list)
    sizes: dict[str, int] = {}
    for r in range(args.rounds):
        for fmt in ("distllm", "torch") if r % 2 == 0 else ("torch", "distllm"):
            if fmt == "distllm":
                run_dir = root / f"distllm-{r}"
                parts: dict[str, float] = defaultdict(float)
                with time_calls(parts):
                    t0 = time.perf_counter()
                    path = checkpoint.save(rt, run_dir, 1, model, optimizer, train_state(cfg), keep_last=1)
                    t["distllm save"].append(time.perf_counter() - t0)
                for part, s in parts.items():
                    t[f"distllm save: {part}"].append(s)
                sizes["distllm"] = dir_bytes(path)
                parts = defaultdict(float)
                with time_calls(parts):
                    t0 = time.perf_counter()
                    checkpoint.load(rt, path, model, optimizer, verify=True)
                    t["distllm load"].append(time.perf_counter() - t0)
                t["distllm load: sha256"].append(parts["sha256"])
                t0 = time.perf_counter()
                checkpoint.load(rt, path, model, optimizer, verify=False)
                t["distllm load, verify=False"].append(time.perf_counter() - t0)
                shutil.rmtree(run_dir)
            else:
                file = root / f"torch-{r}.pt"
                t0 = time.perf_counter()
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, file)
                t["torch.save"].append(time.perf_counter() - t0)
                checkpoint.fsync_path(file)  # the fsync distllm's save does
                t["torch.save + fsync"].append(time.perf_counter() - t0)
                sizes["torch"] = file.stat().st_size
                t0 = time.perf_counter()
                state = torch.load(file, weights_only=True)
                t["torch.load"].append(time.perf_counter() - t0)
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                t["torch.load + load_state_dict"].append(time.perf_counter() - t0)
                del state
                file.unlink()

    med = {k: statistics.median(v) for k, v in t.items()}
    print(f"\n{'part 1 (median of ' + str(args.rounds) + ' rounds)':<48}{'seconds':>9}")
    for k, v in med.items():
        print(f"{k:<48}{v:>9.2f}")
    print(f"bytes: distllm {sizes['distllm'] / MB:.0f} MB, torch.save {sizes['torch'] / MB:.0f} MB "
          f"(ratio {sizes['distllm'] / sizes['torch']:.3f}x)\n")
    save, load = med["distllm save"], med["distllm load"]
    print(f"ratio distllm save / torch.save: {save / med['torch.save']:.2f}x "
          f"(/ torch.save + fsync: {save / med['torch.save + fsync']:.2f}x)")
    print(f"ratio distllm load / torch.load + load_state_dict: {load / med['torch.load + load_state_dict']:.2f}x "
          f"(verify=False: {med['distllm load, verify=False'] / med['torch.load + load_state_dict']:.2f}x)")
    print(f"training loop blocked per checkpoint: {save:.2f} s = the whole save (checkpoint.save is synchronous)")
    hashed, synced, written = (med.get(f"distllm save: {p}", 0.0) for p in ("sha256", "fsync", "write tensors"))
    print(f"of the save: sha256 {hashed:.2f} s ({hashed / save:.0%}), write tensors {written:.2f} s "
          f"({written / save:.0%}), fsync {synced:.2f} s ({synced / save:.0%}), "
          f"collect state {med.get('distllm save: collect state', 0.0):.2f} s; "
          f"of the load: sha256 {med['distllm load: sha256']:.2f} s ({med['distllm load: sha256'] / load:.0%})")
    return t


# ---------------------------------------------------------------------------- part 2: ZeRO-2 on 2 processes


def zero2_worker(args: argparse.Namespace) -> None:
    import torch

    from distllm import checkpoint, distributed

    from distllm.model import Transformer
    from distllm.optim import build_optimizer

    cfg = config(args.tiny, zero_stage=2)
    rt = distributed.setup(cfg)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model).to(rt.device)
    optimizer = build_optimizer(model, cfg.optim, rt.device.type)
    model, optimizer = rt.parallelize(model, optimizer, cfg.train)
    one_step(model, optimizer, rt, cfg.model.vocab_size, cfg.data.seq_len)
    root = Path(args.dir) / "zero2"
    t: dict[str, list[float]] = defaultdict(list)
    sizes: dict[str, int] = {}

    def timed(name: str, fn):
        rt.barrier()
        t0 = time.perf_counter()
        out = fn()
        rt.barrier()
        t[name].append(time.perf_counter() - t0)
        return out

    # distllm's rounds first: DeepSpeed's load_checkpoint re-links every parameter to a fresh fragment
    # mapping without its optimizer-state link (its flag says linked), after which
    # safe_get_full_optimizer_state fails; distllm never calls load_checkpoint, so it never meets this.
    for fmt in ("distllm", "deepspeed"):
        for r in range(args.rounds):
            if fmt == "distllm":
                run_dir = root / f"distllm-{r}"
                parts: dict[str, float] = defaultdict(float)
                with time_calls(parts):
                    path = timed("distllm save", lambda: checkpoint.save(rt, run_dir, 1, model, optimizer,
                                                                         train_state(cfg), keep_last=1))
                for part, s in parts.items():
                    t[f"distllm save: {part} (rank 0)"].append(s)
                timed("distllm load", lambda: checkpoint.load(rt, path, model, optimizer, verify=True))
            else:
                run_dir = root / f"deepspeed-{r}"
                timed("deepspeed save_checkpoint", lambda: model.save_checkpoint(str(run_dir), tag="step1"))
                timed("deepspeed load_checkpoint", lambda: model.load_checkpoint(str(run_dir), tag="step1"))
            if rt.is_main:
                sizes[fmt] = dir_bytes(run_dir)
                shutil.rmtree(run_dir)
            rt.barrier()
    write_report(args.out, args.tag, rt.rank, {"times": t, "sizes": sizes})
    finish_worker()


def zero2(args: argparse.Namespace, root: Path) -> None:
    print(f"\npart 2: 2 processes, DeepSpeed ZeRO-2 | {machine_load()}", flush=True)
    extra = [f"--rounds={args.rounds}", f"--dir={root}"] + (["--tiny"] if args.tiny else [])
    rank0 = run_workers(__file__, 2, extra, root, tag="zero2", threads=1)[0]
    med = {k: statistics.median(v) for k, v in rank0["times"].items()}
    print(f"{'part 2 (median of ' + str(args.rounds) + ' rounds, barrier to barrier)':<48}{'seconds':>9}")
    for k, v in med.items():
        print(f"{k:<48}{v:>9.2f}")
    sizes = rank0["sizes"]
    print(f"bytes: distllm {sizes['distllm'] / MB:.0f} MB, DeepSpeed {sizes['deepspeed'] / MB:.0f} MB")
    print(f"training loop blocked per checkpoint under ZeRO-2: {med['distllm save']:.2f} s = the whole save "
          f"(synchronous); of it, on rank 0: collect state (gathers) "
          f"{med.get('distllm save: collect state (rank 0)', 0.0):.2f} s, "
          f"sha256 {med.get('distllm save: sha256 (rank 0)', 0.0):.2f} s")
    print(f"ratio ZeRO-2 distllm save / deepspeed save_checkpoint: "
          f"{med['distllm save'] / med['deepspeed save_checkpoint']:.2f}x")
    print(f"ratio ZeRO-2 distllm load / deepspeed load_checkpoint: "
          f"{med['distllm load'] / med['deepspeed load_checkpoint']:.2f}x")


def main() -> None:
    args = parse_args()
    if args.worker:
        return zero2_worker(args)
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-", dir=args.dir) as tmp:
        single_process(args, Path(tmp))
        if not args.no_zero2:
            zero2(args, Path(tmp))
    print(f"done | {machine_load()}")


if __name__ == "__main__":
    main()
