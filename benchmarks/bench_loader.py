"""Training-data loader: throughput, start-up and memory, each beside a baseline measured in the same run.

    python benchmarks/bench_loader.py            # all five parts, a few minutes on 2 idle cores
    python benchmarks/bench_loader.py --quick    # smaller sizes (smoke run)

1. Tokens/s reading local shards in one process: distllm's loader (global shuffled order,
   resumable state, shards verified against the manifest; synchronous and with a prefetch thread)
   against nanoGPT's ``get_batch`` (a fresh ``np.memmap`` per batch, random windows, no order and no
   state) over the same shards. Timed blocks alternate between the readers; medians are reported.
   With the page cache warm both read memory, so this measures the per-batch overhead.
2. Start-up for a synthetic corpus of --many-shards shards, each in a fresh process: building the
   loader and its first batch, with the peak resident memory, against the previous design (read
   every shard header, memory-map every shard, and store the epoch's permutation).
3. Memory of the global order at 1e9 samples: the computed permutation against a stored one
   (``np.random.permutation``, measured at 1e7 samples and scaled linearly; 1e9 would need 8 GB).
4. Document masking: tokens/s of a debug-model training step with the causal mask against a
   block-diagonal (per-document) mask of the same windows. The model does not take document ids
   yet; this part passes the loader's mask to its attention function from outside.
5. Fraction of a debug-model training step spent waiting in ``next(loader)``, with the prefetch
   thread against reading in the step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from distllm.config import DataConfig, ModelConfig
from distllm.data.loader import ORDER_CHUNK, build_train_loader
from distllm.data.order import Permutation
from distllm.data.packing import document_attention_mask
from distllm.data.shards import HEADER_SIZE, open_shard, verify, write_manifest, write_shard
from distllm.tokenizer import fingerprint, save_tokenizer, train_tokenizer
from distllm.batch_plan import BatchPlan

VOCAB = 32768
EOT = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=8, help="shards of the throughput corpus")
    p.add_argument("--shard-tokens", type=int, default=4_000_000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=100, help="batches per timed block")
    p.add_argument("--rounds", type=int, default=7, help="timed blocks per reader")
    p.add_argument("--many-shards", type=int, default=1000)
    p.add_argument("--many-shard-tokens", type=int, default=100_000)
    p.add_argument("--mask-steps", type=int, default=20)
    p.add_argument("--wait-steps", type=int, default=20)
    p.add_argument("--parts", default="12345", help="which parts to run, e.g. 13")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--startup", nargs=2, metavar=("DESIGN", "DIR"), help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    if args.quick:
        args.shards, args.shard_tokens, args.batches, args.rounds = 2, 500_000, 20, 3
        args.many_shards, args.many_shard_tokens, args.mask_steps, args.wait_steps = 50, 20_000, 3, 3
    return args


def make_corpus(path: Path, shards: int, shard_tokens: int, seed: int = 0, vocab: int = VOCAB) -> Path:
    """A prepared-looking data dir of random tokens (documents of ~600 tokens ended by EOT)."""
    path.mkdir(parents=True)
    tok = train_tokenizer(["a tiny tokenizer for the benchmark corpus"] * 4, vocab_size=300)
    save_tokenizer(tok, path / "tokenizer.json")
    fp = fingerprint(tok)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(shards):
        tokens = rng.integers(1, vocab, shard_tokens, dtype=np.uint16)
        tokens[rng.random(shard_tokens) < 1 / 600] = EOT
        entries.append(write_shard(path / f"train_{i:06d}.bin", tokens, fp))
    val = write_shard(path / "val_000000.bin", rng.integers(1, VOCAB, 10_000, dtype=np.uint16), fp)
    total = sum(e["num_tokens"] for e in entries)
    write_manifest(path, {
        "format_version": 1, "source": "synthetic", "created": "now",
        "tokenizer": {"file": "tokenizer.json", "fingerprint": fp, "vocab_size": vocab, "eot_id": EOT},
        "dtype": "uint16",
        "splits": {"train": {"num_tokens": total, "num_documents": total // 600, "shards": entries},
                   "val": {"num_tokens": 10_000, "num_documents": 1, "shards": [val]}},
    })  # fmt: skip
    return path


# --------------------------------------------------------------------------- 1. throughput


def nanogpt_get_batch(paths: list[Path], B: int, T: int, rng: np.random.Generator) -> torch.Tensor:
    """nanoGPT's train.py get_batch over shards: a fresh memmap per batch (of a random shard), random windows."""
    data = np.memmap(paths[rng.integers(len(paths))], dtype=np.uint16, mode="r", offset=HEADER_SIZE)
    ix = torch.randint(len(data) - T, (B,))
    x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix.tolist()])
    return x, y


def bench_throughput(args, root: Path) -> None:
    data_dir = make_corpus(root / "throughput", args.shards, args.shard_tokens)
    paths = sorted(data_dir.glob("train_*.bin"))
    B, T = args.batch, args.seq
    cfg = DataConfig(dir=str(data_dir), seq_len=T)

    t0 = time.perf_counter()
    verify_all = build_train_loader(cfg, BatchPlan(B, B), seed=0)
    shards = verify_all.sources[0]
    for k in range(shards.num_shards):
        shards.path(k)  # waits for the verification of shard k
    verify_s = time.perf_counter() - t0
    mb = sum(p.stat().st_size for p in paths) / 1e6
    verify_all.close()
    print(f"corpus: {args.shards} shards x {args.shard_tokens / 1e6:.1f}M tokens ({mb:.0f} MB); "
          f"batch {B} x {T + 1} tokens")
    print(f"  verifying every shard (sha256 + token ids, 2 threads): {verify_s:.2f} s = {mb / verify_s:.0f} MB/s")

    readers = {
        "distllm loader, synchronous": build_train_loader(DataConfig(dir=str(data_dir), seq_len=T, prefetch=0),
                                                          BatchPlan(B, B), seed=0),
        "distllm loader, prefetch 4": build_train_loader(DataConfig(dir=str(data_dir), seq_len=T, prefetch=4),
                                                         BatchPlan(B, B), seed=0),
    }
    rng = np.random.default_rng(0)
    fns = {name: (lambda r=r: next(r)) for name, r in readers.items()}
    fns["nanoGPT get_batch (baseline)"] = lambda: nanogpt_get_batch(paths, B, T, rng)
    for fn in fns.values():  # warm-up: verification, page cache, thread start
        for _ in range(args.batches):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.rounds):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in names:
            t = time.perf_counter()
            for _ in range(args.batches):
                fns[name]()
            times[name].append(time.perf_counter() - t)
    for reader in readers.values():
        reader.close()
    tokens = args.batches * B * T
    base = tokens / statistics.median(times["nanoGPT get_batch (baseline)"])
    for name, ts in times.items():
        tps = tokens / statistics.median(ts)
        print(f"  {name:32s} {tps / 1e6:8.1f}M tokens/s   {tps / base:5.2f}x baseline")


# --------------------------------------------------------------------------- 2. start-up with many shards


def resident_mb() -> float:
    """This process's resident memory now (Linux ``/proc/self/statm``), in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def startup_child(design: str, data_dir: str) -> None:
    """In a fresh process: time to a first batch and the resident memory it added (printed as JSON)."""
    before = resident_mb()
    B, T = 16, 1024
    t0 = time.perf_counter()
    if design == "distllm":
        loader = build_train_loader(DataConfig(dir=data_dir, seq_len=T, prefetch=0), BatchPlan(B, B), seed=0)
        built = time.perf_counter() - t0
        next(loader)
        loader.close()
    else:  # previous design: all headers read (verify), every shard memory-mapped, the permutation stored
        manifest = verify(data_dir)
        maps = [open_shard(Path(data_dir) / e["file"]) for e in manifest["splits"]["train"]["shards"]]
        n = (sum(len(m) for m in maps) - 1) // T
        order = np.random.default_rng([0, 0]).permutation(n)
        built = time.perf_counter() - t0
        starts = np.cumsum([0] + [len(m) for m in maps])
        for i in order[:B]:
            k = int(np.searchsorted(starts, i * T, side="right")) - 1
            maps[k][i * T - starts[k] : i * T - starts[k] + T + 1].astype(np.int64)
    first = time.perf_counter() - t0
    rss = resident_mb() - before
    print(json.dumps({"built_s": built, "first_batch_s": first, "rss_mb": rss}))


def bench_startup(args, root: Path) -> None:
    data_dir = make_corpus(root / "many", args.many_shards, args.many_shard_tokens, seed=1)
    mb = sum(p.stat().st_size for p in data_dir.glob("train_*.bin")) / 1e6
    print(f"corpus: {args.many_shards} shards x {args.many_shard_tokens / 1e3:.0f}k tokens ({mb:.0f} MB), "
          "batch 16 x 1025; each row a fresh process, page cache warm")
    results = {}
    for design in ("previous", "distllm"):
        out = subprocess.run([sys.executable, __file__, "--startup", design, str(data_dir)], check=True,
                             capture_output=True, text=True).stdout
        results[design] = json.loads(out.strip().splitlines()[-1])
    for design, label in (("previous", "previous loader (baseline)"), ("distllm", "distllm loader")):
        r = results[design]
        print(f"  {label:28s} built in {r['built_s'] * 1e3:7.1f} ms, "
              f"first batch at {r['first_batch_s'] * 1e3:7.1f} ms, "
              f"resident memory +{r['rss_mb']:.1f} MB")
    print(f"  ratio (baseline / distllm): build {results['previous']['built_s'] / results['distllm']['built_s']:.1f}x, "
          f"first batch {results['previous']['first_batch_s'] / results['distllm']['first_batch_s']:.2f}x "
          "(distllm's first batch includes the sha256 of the shards it reads)")


# --------------------------------------------------------------------------- 3. order memory


def peak_bytes(fn) -> int:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def bench_order_memory() -> None:
    n, G = 10**9, 512
    # the loader computes ORDER_CHUNK positions of an epoch's order at once and keeps only those
    computed = peak_bytes(lambda: Permutation(n, key=1)[0:ORDER_CHUNK])
    t = time.perf_counter()
    perm = Permutation(n, key=1)
    for chunk in range(20):
        perm[chunk * ORDER_CHUNK : (chunk + 1) * ORDER_CHUNK]
    per_batch_us = (time.perf_counter() - t) / 20 * G / ORDER_CHUNK * 1e6
    small = 10**7
    stored_small = peak_bytes(lambda: np.random.default_rng(0).permutation(small))
    stored = stored_small * n / small
    print(f"order of {n:.0e} samples, global batch {G}:")
    print(f"  computed permutation (distllm): {computed / 1e3:.0f} KB peak per process, computed "
          f"{ORDER_CHUNK} positions at a time ({per_batch_us:.0f} us per global batch)")
    print(f"  stored permutation (baseline):  {stored_small / 1e6:.0f} MB measured at {small:.0e} samples -> "
          f"{stored / 1e9:.1f} GB at {n:.0e} per process; ratio {stored / computed:.0f}x")


# --------------------------------------------------------------------------- 4. document masking


def debug_model_setup(root: Path):
    """configs/debug.yaml's model, an AdamW optimizer and a corpus of its vocabulary: (model, opt, data_dir, B, T)."""
    from distllm.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, n_layers=4, n_heads=4, n_kv_heads=2, d_model=192, max_seq_len=256)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data_dir = root / "debug"
    if not data_dir.exists():
        make_corpus(data_dir, 4, 500_000, vocab=cfg.vocab_size)
    return model, opt, data_dir, 16, 128


def train_step(model, opt, window: torch.Tensor) -> None:
    from distllm.loss import next_token_loss

    next_token_loss(model, window).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_document_mask(args, root: Path) -> None:
    import distllm.model.transformer as transformer_module

    model, opt, data_dir, B, T = debug_model_setup(root)
    loader = build_train_loader(DataConfig(dir=str(data_dir), seq_len=T, prefetch=0, document_mask=True),
                                BatchPlan(B, B), seed=0)
    window = next(loader)
    masks = {"causal (baseline)": None, "per-document": document_attention_mask(loader.last_doc_ids)}
    docs_per_window = float((loader.last_doc_ids[:, -1] + 1).float().mean())
    loader.close()
    original = transformer_module.attention

    def attention_with(mask):
        def attention(q, k, v, attn_mask=None, is_causal=False):
            if is_causal and mask is not None:
                return original(q, k, v, attn_mask=mask)
            return original(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

        return attention

    def step_seconds(mask) -> float:
        transformer_module.attention = attention_with(mask)
        try:
            t = time.perf_counter()
            train_step(model, opt, window)
            return time.perf_counter() - t
        finally:
            transformer_module.attention = original

    for mask in masks.values():  # warm-up
        step_seconds(mask)
    times = {name: [] for name in masks}
    for i in range(args.mask_steps):  # single steps, alternating which goes first
        for name in masks if i % 2 == 0 else reversed(masks):
            times[name].append(step_seconds(masks[name]))
    base = statistics.median(times["causal (baseline)"])
    print(f"debug model (4 layers x 192, GQA 4/2), batch {B} x {T}, {docs_per_window:.1f} documents per window, "
          f"CPU fp32, median of {args.mask_steps} steps each:")
    for name, ts in times.items():
        print(f"  {name:20s} {B * T / statistics.median(ts):8.0f} tokens/s   {base / statistics.median(ts):5.2f}x")


# --------------------------------------------------------------------------- 5. waiting for data


def bench_data_wait(args, root: Path) -> None:
    model, opt, data_dir, B, T = debug_model_setup(root)
    print(f"debug model training steps, batch {B} x {T}, {args.wait_steps} steps each, CPU fp32:")
    for prefetch in (0, 2):
        cfg = DataConfig(dir=str(data_dir), seq_len=T, prefetch=prefetch)
        with build_train_loader(cfg, BatchPlan(B, B), seed=0) as loader:
            for _ in range(2):  # warm-up: shard verification, thread start
                train_step(model, opt, next(loader))
            waited = total = 0.0
            for _ in range(args.wait_steps):
                t0 = time.perf_counter()
                window = next(loader)
                t1 = time.perf_counter()
                train_step(model, opt, window)
                waited, total = waited + t1 - t0, total + time.perf_counter() - t0
        label = "prefetch 2" if prefetch else "synchronous (baseline)"
        print(f"  {label:24s} waiting for data {waited / args.wait_steps * 1e3:7.3f} ms per step = "
              f"{100 * waited / total:.3f}% of the step ({total / args.wait_steps * 1e3:.0f} ms)")


def main() -> None:
    args = parse_args()
    if args.startup:
        startup_child(*args.startup)
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = Path(tempfile.mkdtemp(prefix="distllm-bench-loader-"))
    try:
        if "1" in args.parts:
            print("== 1. loader throughput (one process, local shards)")
            bench_throughput(args, root)
        if "2" in args.parts:
            print("== 2. start-up with many shards")
            bench_startup(args, root)
        if "3" in args.parts:
            print("== 3. memory of the global order")
            bench_order_memory()
        if "4" in args.parts:
            print("== 4. document masking")
            bench_document_mask(args, root)
        if "5" in args.parts:
            print("== 5. step time spent waiting for data")
            bench_data_wait(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
