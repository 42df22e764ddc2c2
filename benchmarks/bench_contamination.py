"""Contamination check throughput (MB of corpus text per second) against lm-evaluation-harness's janitor.

    python benchmarks/bench_contamination.py                 # ~12 MB of Python stdlib text, 200 items
    python benchmarks/bench_contamination.py --mb 2 --items 40 --janitor-mb 1   # smoke run
    python benchmarks/bench_contamination.py --tasks piqa.jsonl   # real items (half planted in the corpus)

The corpus is the running interpreter's standard library (.py files, sorted), with half of the items
(context + correct choice) planted whole into documents chosen by a fixed seed; it is prepared with
``distllm prepare`` into a temporary directory. Both sides get the same items and the same documents:

* distllm: ``distllm.eval.contamination.check`` on the prepared train shards, with 1 and with 2
  worker processes, from the shards (decoding the tokens back to text is part of its time);
* lm-eval: ``Janitor(ngram_n=13).register_contaminant(item)`` for each item, then ``clean`` of each
  document's text (decoded before the clock starts; the janitor runs in Python: its C++ helper is not
  built by ``pip install lm-eval``). ``--janitor-mb`` limits it to a prefix of the documents.

Both must find the same dirty documents (checked); the ratio is of MB/s.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np


def stdlib_documents(limit_bytes: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text)
            total += len(text.encode())
        if total >= limit_bytes:
            break
    return docs


def synthetic_items(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze")
             for b in ("bar", "dun", "fel", "gor", "hin", "jas", "kem", "lon", "mur", "nix", "pol", "quv",
                       "rem", "sot", "tar", "wen", "yol", "zip", "bex", "cav")]
    items = []
    for _ in range(n):
        ctx = " ".join(rng.choice(words) for _ in range(rng.randint(15, 30))).capitalize()
        choices = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + "." for _ in range(4)]
        items.append({"context": ctx, "choices": choices, "label": rng.randrange(4)})
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=12.0, help="corpus size in MB of text (default: %(default)s)")
    p.add_argument("--items", type=int, default=200, help="synthetic items (without --tasks)")
    p.add_argument("--tasks", default=None, help="a task file instead of synthetic items")
    p.add_argument("--janitor-mb", type=float, default=None, help="time the janitor on this much of the corpus")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from distllm.config import from_dict
    from distllm.data.prepare import prepare
    from distllm.eval import contamination as C
    from distllm.eval.tasks import load_task
    from distllm.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-contamination-") as tmp:
        tmp = Path(tmp)
        if args.tasks:
            rows = [json.loads(line) for line in Path(args.tasks).read_text().splitlines() if line.strip()]
            task_path = Path(args.tasks)
        else:
            rows = synthetic_items(args.items, args.seed)
            task_path = tmp / "synthetic.jsonl"
            task_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = load_task(task_path)
        texts = [f"{i.context} {i.choices[i.gold]}" for i in task.items]

        docs = stdlib_documents(int(args.mb * 1e6))
        rng = random.Random(args.seed)
        for text in texts[::2]:  # half of the items, whole, into random documents
            d = rng.randrange(len(docs))
            cut = docs[d].find("\n", rng.randrange(max(1, len(docs[d]))))
            cut = len(docs[d]) if cut < 0 else cut
            docs[d] = docs[d][:cut] + "\n# " + text + "\n" + docs[d][cut:]
        corpus = tmp / "corpus"
        corpus.mkdir()
        for k, doc in enumerate(docs):
            (corpus / f"{k:05d}.txt").write_text(doc, encoding="utf-8")
        cfg = from_dict({"data": {"source": str(corpus), "dir": str(tmp / "data"), "val_fraction": 0.001,
                                  "num_proc": 2, "shard_tokens": 1_000_000},
                         "tokenizer": {"vocab_size": 8192}, "logging": {"progress": False}})
        prepare(cfg)
        data = str(tmp / "data")

        runs = {}
        for num_proc in (1, 2):
            report, dirty = C.check(data, [task], num_proc=num_proc, progress=False)
            runs[num_proc] = (report, dirty)
            print(f"distllm, {num_proc} process{'es' if num_proc > 1 else ''}: {report['text_bytes'] / 1e6:.1f} MB "
                  f"in {report['seconds']:.2f} s = {report['mb_per_s']:.2f} MB/s; {report['tasks'][task.name]['dirty']} "
                  f"dirty items, {report['dirty_documents']} dirty documents")
        report, dirty = runs[2]

        # the same documents as text, decoded before the janitor's clock starts
        manifest = json.loads((tmp / "data" / "manifest.json").read_text())
        tok = load_tokenizer(tmp / "data" / "tokenizer.json")
        eot = manifest["tokenizer"]["eot_id"]
        stream = np.concatenate([np.fromfile(tmp / "data" / e["file"], dtype=manifest["dtype"], offset=64)
                                 for e in manifest["splits"]["train"]["shards"]])
        ends = np.flatnonzero(stream == eot)
        starts = np.concatenate([[0], ends[:-1] + 1])
        documents = tok.decode_batch([stream[a:e].tolist() for a, e in zip(starts, ends)])
        budget = int((args.janitor_mb or args.mb) * 1e6)
        chosen, size = [], 0
        for k, doc in enumerate(documents):
            if size >= budget:
                break
            chosen.append(k)
            size += len(doc.encode())

        from lm_eval.decontamination.janitor import Janitor

        class Observed(Janitor):
            """The janitor, noting whether each document had a contaminated n-gram (for the comparison)."""

            def _split_chunks(self, dirty_string, dirty_parts):
                parts = list(dirty_parts)
                self.found = bool(parts)
                return super()._split_chunks(dirty_string, parts)

        janitor = Observed(ngram_n=13)
        t0 = time.perf_counter()
        for text in texts:
            janitor.register_contaminant_python(text)
        dirty_docs = set()
        for k in chosen:
            janitor.clean_python(documents[k])
            if janitor.found:
                dirty_docs.add(int(starts[k]))
        seconds = time.perf_counter() - t0
        janitor_rate = size / 1e6 / seconds
        print(f"lm-eval janitor (Python): {size / 1e6:.1f} MB in {seconds:.2f} s = {janitor_rate:.2f} MB/s; "
              f"{len(dirty_docs)} dirty documents")

        ours = {a for a, _ in dirty if a <= int(starts[chosen[-1]])}
        same = ours == dirty_docs
        print(f"same dirty documents: {'yes' if same else 'NO'} ({len(ours)} vs {len(dirty_docs)})")
        for num_proc in (1, 2):
            print(f"ratio distllm ({num_proc} process{'es' if num_proc > 1 else ''}) / janitor MB/s: "
                  f"{runs[num_proc][0]['mb_per_s'] / janitor_rate:.1f}x")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
