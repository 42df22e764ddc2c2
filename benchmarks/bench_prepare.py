"""``distllm prepare`` throughput (MB of text per second) against ``datasets.map`` in the same run.

Both tokenize the same corpus (default: the Python standard library, about 12 MB in 730
files) with the same tokenizer (trained once first, then given as ``tokenizer.path``, so neither
side's figure includes tokenizer training), with 1 and with 2 processes:

* distllm: ``prepare`` end to end: scan (UTF-8 check, hashes, split), tokenize, write the
  train/val shards (fsynced) and the manifest;
* baseline: ``datasets.load_dataset("text", sample_by="document")`` and ``Dataset.map`` of a
  batched ``encode_batch`` (ids + end-of-text) with ``num_proc`` = the same number of
  processes, written to a fresh Arrow cache (the usual Hugging Face way to tokenize a corpus).

With one process both let the Rust tokenizer use its threads on every core. Each figure is the
best of ``--repeats`` runs (the machine may be shared). Prints MB/s and the ratio distllm /
baseline for each process count (a ratio >= 1 means prepare is at least as fast).

    python benchmarks/bench_prepare.py [--source python-stdlib] [--procs 1 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from distllm.config import from_dict
from distllm.data.corpus import local_source
from distllm.data.prepare import prepare
from distllm.tokenizer import EOT, load_tokenizer


def config(source: str, out: Path, tokenizer: str | None, num_proc: int, vocab_size: int):
    return from_dict({
        "data": {"source": source, "dir": str(out), "num_proc": num_proc},
        "tokenizer": {"path": tokenizer, "vocab_size": vocab_size},
        "logging": {"progress": False},
    })  # fmt: skip


def time_prepare(source: str, tokenizer: str, num_proc: int, vocab_size: int, tmp: Path) -> tuple[float, int]:
    out = tmp / f"prepare-{num_proc}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = prepare(config(source, out, tokenizer, num_proc, vocab_size))
    seconds = time.perf_counter() - start
    tokens = sum(manifest["splits"][s]["num_tokens"] for s in ("train", "val"))
    return seconds, tokens


def time_datasets_map(files: list[str], tokenizer: str, num_proc: int, tmp: Path) -> tuple[float, int]:
    import datasets

    cache = tmp / f"hf-cache-{num_proc}"
    shutil.rmtree(cache, ignore_errors=True)
    datasets.disable_progress_bars()
    start = time.perf_counter()
    ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train", cache_dir=str(cache))
    tok = load_tokenizer(tokenizer)
    eot = tok.token_to_id(EOT)

    def encode(batch):
        return {"ids": [e.ids + [eot] for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}

    ds = ds.map(encode, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=["text"])
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for batch in ds.with_format("arrow").iter(10_000) for ids in batch["ids"].to_pylist())
    return seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="python-stdlib", help="a local corpus of .txt files (data.source)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    src = local_source(config(args.source, Path("unused"), None, 1, args.vocab_size).data)
    files = [f.path for f in src.files]
    if any(not f.endswith((".txt", ".py")) for f in files):
        raise SystemExit("the baseline reads documents with datasets' text builder: use a corpus of .txt files")
    text_mb = sum(len(Path(f).read_bytes().decode("utf-8", "replace").encode()) for f in files) / 1e6
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp_name:
        tmp = Path(tmp_name)
        print(f"corpus {src.origin}: {len(files)} files, {text_mb:.1f} MB of text; CPUs: {os.cpu_count()}")
        trained = tmp / "tokenizer"
        prepare(config(args.source, trained, None, max(args.procs), args.vocab_size))
        tokenizer = str(trained / "tokenizer.json")

        best: dict[tuple[str, int], float] = {}
        for _ in range(args.repeats):
            for procs in args.procs:
                seconds, ours = time_prepare(args.source, tokenizer, procs, args.vocab_size, tmp)
                best[("prepare", procs)] = min(best.get(("prepare", procs), seconds), seconds)
                seconds, theirs = time_datasets_map(files, tokenizer, procs, tmp)
                best[("map", procs)] = min(best.get(("map", procs), seconds), seconds)
        print(f"tokens: prepare {ours:,} (all usable documents, train + val), datasets.map {theirs:,}")
        print(f"{'processes':>9}  {'prepare MB/s':>12}  {'datasets.map MB/s':>17}  {'ratio':>6}")
        for procs in args.procs:
            ours_mbs, theirs_mbs = text_mb / best[("prepare", procs)], text_mb / best[("map", procs)]
            print(f"{procs:>9}  {ours_mbs:>12.2f}  {theirs_mbs:>17.2f}  {ours_mbs / theirs_mbs:>5.2f}x")


if __name__ == "__main__":
    main()
