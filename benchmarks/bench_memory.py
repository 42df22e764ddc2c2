"""Per-rank memory of a ~100M-parameter model with AdamW on 2 CPU processes: DDP vs DeepSpeed ZeRO-1/2/3.

    python benchmarks/bench_memory.py                         # 100.7M params, 7 jobs, ~4 min on 2 cores
    python benchmarks/bench_memory.py --engines DDP,ZeRO-3    # a subset (DDP, the baseline, is required)
    python benchmarks/bench_memory.py --tiny                  # a 2-layer toy model (smoke run, ~25 s per job)

The model is the gpt2-124m preset's shape (12 layers, 12 heads, d_model 768, SwiGLU 2048, tied
embeddings) with a 20480-token vocabulary instead of 50304, which lands at 100.7M parameters. Each
engine is a separate ``torchrun --nproc_per_node 2`` job (gloo) that builds the model the way
``distllm.train`` does (``rt.init_context()``, ``build_optimizer``, ``rt.parallelize``) and trains
--steps steps of micro-batch 1 x --seq tokens in fp32 (random tokens; accumulation 1). DDP is the
baseline; ZeRO-3 also runs once with DeepSpeed's default 5e8-element buckets
(``--distributed.bucket_elements=500000000``) against distllm's sizing from the model
(``distributed.bucket_elements``: 1/8 of the parameters, at least d_model^2). Any further
``--section.key=value`` arguments go to every job's distllm config.

Peak RSS depends on the allocator as much as on the engine. glibc's dynamic mmap threshold grows to
the largest block freed (up to 32 MiB), after which the per-parameter tensors (a few MB each) come
from the heap and fragmentation keeps freed pages resident. distllm fixes the threshold at 4 MiB on
CPU (``distllm/hostmem.py``: tensors that large get their own mappings, returned to the system when
freed), and asks torch for transparent huge pages on tensors of 2 MiB and more (a page fault per
2 MiB, not per 4 KiB, which is what makes the mapped tensors cheap), so the main rows are what
``distllm train`` does; the "glibc default" rows run DDP and ZeRO-3 again with
``DISTLLM_MMAP_THRESHOLD=0`` (glibc's threshold left alone; huge pages still on). The "RSS by phase" table shows the
rest ('trimmed' is the RSS after ``malloc_trim(0)`` at the end).

What is counted ("state" per rank), at the accumulation boundary of the last step: after the
backward pass (for DeepSpeed the engine's own ``backward()``, called here without its ``step()``, so
the gradients are still held) and before the optimizer step. Every live tensor of the process is
found through the garbage collector and counted once per storage (views of a flat buffer count
once, by the buffer's size), in this order:

* params:    storage of the module's parameters; under ZeRO-3 the local partitions ``p.ds_tensor``
             (a released ZeRO-3 parameter has an empty ``p.data``; small ones stay whole).
* master:    fp32 master copies the optimizer steps, when they are not the parameters themselves:
             the flat partitions of the base optimizer (``engine.optimizer.optimizer``). DDP has none:
             its AdamW steps the fp32 parameters directly.
* optimizer: AdamW's state tensors (``exp_avg``, ``exp_avg_sq``, ``step``) of that base optimizer.
* grads:     every other live tensor: ``p.grad`` under DDP; under ZeRO the gradient partitions and the
             engine's reduce buffers (which hold gradients). The part that is a public per-parameter
             gradient (``p.grad``, or ``deepspeed.utils.safe_get_local_grad`` under ZeRO-3) is shown
             too, as "grad API".

Bytes are allocated storage sizes: a buffer allocated but not touched (DeepSpeed's default reduce
bucket of 5e8 elements is 2 GB) counts whole here, while only the pages written show in the RSS.

Not counted in "state" (it shows in peak RSS): tensors held only from C++ (DDP's reducer buckets, a
second copy of every gradient since Accelerate keeps ``gradient_as_bucket_view=False``; the autograd
graph, freed by then), allocator caches, and the libraries themselves. Peak RSS is ``VmHWM`` of each
rank (the same figure as ``ru_maxrss``), read after the last step; "base RSS" is the RSS with torch
and distllm imported, before ``distributed.setup`` (which imports Accelerate and DeepSpeed: the
"setup" phase); "RSS@bnd" the RSS at the measured boundary; "s/step" the median time of the steps
after the first (which allocates everything), without the counting. Every figure is the larger of
the two ranks. The target lines compare the main rows.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multiproc import finish_worker, machine_load, peak_rss_bytes, rss_bytes, run_workers, write_report  # noqa: E402

FULL_MODEL = {"n_layers": 12, "n_heads": 12, "d_model": 768, "ffn_hidden": 2048, "vocab_size": 20480,
              "max_seq_len": 1024, "tie_embeddings": True}
TINY_MODEL = {"n_layers": 2, "n_heads": 4, "d_model": 64, "ffn_hidden": 192, "vocab_size": 512,
              "max_seq_len": 64, "tie_embeddings": True}
GLIBC_DEFAULT = {"DISTLLM_MMAP_THRESHOLD": "0"}  # distllm leaves glibc's dynamic mmap threshold alone
# label -> (distllm config overrides, environment of the job)
ENGINES = {
    "DDP": ([], {}),
    "ZeRO-1": (["--distributed.zero_stage=1"], {}),
    "ZeRO-2": (["--distributed.zero_stage=2"], {}),
    "ZeRO-3": (["--distributed.zero_stage=3"], {}),
    "ZeRO-3 5e8 buckets": (["--distributed.zero_stage=3", "--distributed.bucket_elements=500000000"], {}),
    "DDP glibc default": ([], GLIBC_DEFAULT),
    "ZeRO-3 glibc default": (["--distributed.zero_stage=3"], GLIBC_DEFAULT),
}
CATEGORIES = ("params", "master", "grads", "optimizer")
MB = 1e6


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a toy model: a seconds-long smoke run")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps, at least 2 (the first is not timed)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of: " + ", ".join(ENGINES))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args()
    args.overrides = overrides
    return args


# ---------------------------------------------------------------------------- worker (one rank)


def worker(args: argparse.Namespace) -> None:
    from distllm import hostmem

    hostmem.enable_huge_pages()  # before torch, as the distllm command does (distllm/hostmem.py)
    import torch

    from distllm import distributed

    from distllm.model import Transformer
    from distllm.config import apply_overrides, from_dict
    from distllm.loss import next_token_loss
    from distllm.model import count_params
    from distllm.optim import build_optimizer

    base_rss = rss_bytes()
    model_shape = dict(TINY_MODEL if args.tiny else FULL_MODEL)
    seq = min(args.seq, model_shape["max_seq_len"])
    raw = {
        "model": model_shape,
        "tokenizer": {"vocab_size": model_shape["vocab_size"]},
        "data": {"seq_len": seq},
        "train": {"micro_batch_size": 1, "global_batch_size": 2, "max_steps": args.steps + 1, "device": "cpu",
                  "precision": "fp32"},
        "optim": {"warmup_steps": 0},
    }
    cfg = from_dict(apply_overrides(raw, args.overrides))
    rt = distributed.setup(cfg)
    phases = {"setup": rss_bytes()}  # RSS after each phase, then the peak so far
    torch.manual_seed(cfg.train.seed)
    with rt.init_context():  # ZeRO-3: partitioned as it is built
        model = Transformer(cfg.model)
    if rt.zero_stage != 3:
        model = model.to(rt.device)
    phases["build"] = rss_bytes()
    optimizer = build_optimizer(model, cfg.optim, rt.device.type)
    model, optimizer = rt.parallelize(model, optimizer, cfg.train)
    phases["wrap"] = rss_bytes()
    phases["wrap peak"] = peak_rss_bytes()

    tokens = torch.Generator().manual_seed(rt.rank)
    counted: dict[str, int] = {}
    step_times = []  # seconds per step, without the counting
    for step in range(args.steps):
        t0 = time.perf_counter()
        window = torch.randint(0, cfg.model.vocab_size, (1, seq + 1), generator=tokens)  # (B, T+1)
        measure = step == args.steps - 1
        with rt.accumulate(model):
            loss = next_token_loss(model, window)
            if measure and rt.deepspeed:  # the engine's backward without its step: gradients still held
                model.set_gradient_accumulation_boundary(is_boundary=True)
                model.backward(loss)
            else:
                rt.backward(loss)
        if measure:
            del loss
            t_count = time.perf_counter()
            counted = count_state(rt, model, optimizer)
            t0 += time.perf_counter() - t_count
            if rt.deepspeed:
                model.step()
        rt.optimizer_step(model, optimizer, cfg.optim.grad_clip)
        step_times.append(time.perf_counter() - t0)
        if step == 0:
            phases["step 1"] = rss_bytes()
    phases["end"] = rss_bytes()
    phases["trimmed"] = trimmed_rss()
    report = {
        "engine": rt.engine_name,
        "params_total": count_params(cfg.model),
        "bucket_elements": distributed.bucket_elements(cfg) if rt.deepspeed else None,
        "base_rss": base_rss,
        "peak_rss": peak_rss_bytes(),
        "seconds_per_step": statistics.median(step_times[1:]),  # the first step allocates everything
        "phases": phases,
        **counted,
    }
    write_report(args.out, args.tag, rt.rank, report)
    finish_worker()


def trimmed_rss() -> int:
    """RSS after glibc's ``malloc_trim(0)`` hands freed heap pages back to the system: what of the RSS is
    memory the process freed but the allocator kept (0 if this is not glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return 0
    return rss_bytes()


def count_state(rt, model, optimizer) -> dict[str, int]:
    """Bytes per category of every live tensor storage of this process (see the module docstring)."""
    import torch

    module = rt.unwrap(model)
    base = model.optimizer.optimizer if rt.deepspeed else optimizer.optimizer  # the torch AdamW that steps
    seen: set[int] = set()
    sizes: dict[str, int] = dict.fromkeys(CATEGORIES, 0)

    def claim(category: str, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        sizes[category] += storage.nbytes()

    params = list(module.parameters())
    for p in params:
        claim("params", p.data)
        claim("params", getattr(p, "ds_tensor", None))  # ZeRO-3: this rank's partition
    buffers = {b.untyped_storage().data_ptr() for b in module.buffers()}  # RoPE tables: not training state
    seen |= buffers
    for flat in list(base.state) + [q for g in base.param_groups for q in g["params"]]:
        claim("master", flat)
    for st in base.state.values():
        for value in st.values():
            claim("optimizer", value)
    grad_api = 0
    for p in params:  # the per-parameter gradients a public API hands out
        if rt.zero_stage == 3:
            from deepspeed.utils import safe_get_local_grad

            g = safe_get_local_grad(p)
        else:
            g = p.grad
        grad_api += g.numel() * g.element_size() if g is not None else 0
        claim("grads", g)
    gc.collect()
    for obj in gc.get_objects():  # everything else alive: the engines' gradient partitions and buffers
        if isinstance(obj, torch.Tensor):
            claim("grads", obj)
    return {**sizes, "grad_api": grad_api, "rss_at_boundary": rss_bytes()}


# ---------------------------------------------------------------------------- driver


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    engines = [e.strip() for e in args.engines.split(",")]
    unknown = [e for e in engines if e not in ENGINES]
    if args.steps < 2:
        raise SystemExit("--steps: at least 2 (the first step is not timed)")
    if unknown or "DDP" not in engines:
        raise SystemExit(f"--engines: unknown {unknown} (DDP, the baseline, is required); choose from {list(ENGINES)}")
    shape = TINY_MODEL if args.tiny else FULL_MODEL
    print(f"model {shape} | 2 processes x 1 thread, fp32, AdamW, micro-batch 1 x {args.seq} tokens, "
          f"{args.steps} steps | {machine_load()}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for label in engines:
            extra = [f"--steps={args.steps}", f"--seq={args.seq}"] + (["--tiny"] if args.tiny else [])
            t0 = time.perf_counter()
            overrides, env = ENGINES[label]
            ranks = run_workers(__file__, 2, extra + overrides + args.overrides, Path(tmp),
                                tag=label.replace(" ", "_"), threads=1, env=env)
            row = {k: max(r[k] for r in ranks) for k in (*CATEGORIES, "grad_api", "base_rss", "peak_rss",
                                                          "rss_at_boundary", "seconds_per_step")}
            row.update(params_total=ranks[0]["params_total"], bucket=ranks[0]["bucket_elements"],
                       phases={k: max(r["phases"][k] for r in ranks) for k in ranks[0]["phases"]})
            results[label] = row
            print(f"  ran {label} in {time.perf_counter() - t0:.0f} s", flush=True)
    print_table(results)
    print(f"done | {machine_load()}")


def print_table(results: dict[str, dict]) -> None:
    ddp = results["DDP"]
    n = ddp["params_total"]
    print(f"\nper-rank bytes (max of 2 ranks), MB = 1e6 bytes; model {n / 1e6:.1f}M parameters = {4 * n / MB:.0f} MB fp32")
    head = (f"{'engine':<20}{'bucket':>8}{'params':>9}{'master':>9}{'grads':>9}{'grad API':>9}{'optim':>9}"
            f"{'state':>9}{'x DDP':>7}{'optim x':>8}{'base RSS':>9}{'RSS@bnd':>9}{'peak RSS':>9}{'x DDP':>7}"
            f"{'s/step':>7}")
    print(head)
    print("-" * len(head))
    for label, r in results.items():
        state = sum(r[c] for c in CATEGORIES)
        bucket = f"{r['bucket'] / 1e6:.1f}M" if r["bucket"] else "-"
        print(f"{label:<20}{bucket:>8}" + "".join(f"{r[c] / MB:>9.1f}" for c in ("params", "master", "grads"))
              + f"{r['grad_api'] / MB:>9.1f}{r['optimizer'] / MB:>9.1f}{state / MB:>9.1f}"
              + f"{state / state_of(ddp):>7.2f}{r['optimizer'] / ddp['optimizer']:>8.2f}"
              + f"{r['base_rss'] / MB:>9.0f}{r['rss_at_boundary'] / MB:>9.0f}{r['peak_rss'] / MB:>9.0f}"
              + f"{r['peak_rss'] / ddp['peak_rss']:>7.2f}{r['seconds_per_step']:>7.2f}")
    print("(state = params + master + grads + optim; optim = AdamW moments; x DDP = ratio to the DDP row)\n")

    def target(label: str, what: str, value: float, limit: float, note: str = "") -> None:
        verdict = "met" if value <= limit else "MISSED"
        print(f"ratio {label} {what} / DDP: {value:.2f}x (target <= {limit}x: {verdict}){note}")

    if "ZeRO-3" in results:
        z3 = results["ZeRO-3"]
        target("ZeRO-3", "state per rank", state_of(z3) / state_of(ddp), 0.55,
               f"; without the fp32 master copy {(state_of(z3) - z3['master']) / state_of(ddp):.2f}x")
    if "ZeRO-1" in results:
        z1 = results["ZeRO-1"]
        target("ZeRO-1", "optimizer state per rank", z1["optimizer"] / ddp["optimizer"], 0.55,
               f"; with its fp32 master partition {(z1['optimizer'] + z1['master']) / ddp['optimizer']:.2f}x")
    if "ZeRO-3" in results:
        target("ZeRO-3", "peak RSS per rank", results["ZeRO-3"]["peak_rss"] / ddp["peak_rss"], 0.8)
    if "ZeRO-3 glibc default" in results and "DDP glibc default" in results:
        r = results["ZeRO-3 glibc default"]["peak_rss"] / results["DDP glibc default"]["peak_rss"]
        print(f"ratio ZeRO-3 peak RSS per rank / DDP, both with glibc's default mmap threshold: {r:.2f}x")
        for label in ("DDP", "ZeRO-3"):  # what distllm's fixed threshold costs in step time
            if label in results:
                fixed, default = results[label], results[f"{label} glibc default"]
                print(f"ratio {label} peak RSS / the same with glibc's default: "
                      f"{fixed['peak_rss'] / default['peak_rss']:.2f}x; s/step "
                      f"{fixed['seconds_per_step'] / default['seconds_per_step']:.2f}x")
    if "ZeRO-3 5e8 buckets" in results:
        d = results["ZeRO-3 5e8 buckets"]
        print(f"ratio ZeRO-3 with DeepSpeed's 5e8 buckets peak RSS / DDP: {d['peak_rss'] / ddp['peak_rss']:.2f}x "
              f"(state {state_of(d) / state_of(ddp):.2f}x)")
        if "ZeRO-3" in results:
            saved = d["peak_rss"] - results["ZeRO-3"]["peak_rss"]
            print(f"bucket sizing from the model saves {saved / MB:.0f} MB of peak RSS per rank under ZeRO-3")
    phases = list(ddp["phases"])
    print("\nRSS per rank after each phase, MB (max of 2 ranks; 'trimmed' = after malloc_trim(0) at the end)")
    print(f"{'engine':<20}" + "".join(f"{p:>11}" for p in phases) + f"{'peak':>11}")
    for label, r in results.items():
        print(f"{label:<20}" + "".join(f"{r['phases'][p] / MB:>11.0f}" for p in phases) + f"{r['peak_rss'] / MB:>11.0f}")


def state_of(r: dict) -> int:
    return sum(r[c] for c in CATEGORIES)


if __name__ == "__main__":
    main()
