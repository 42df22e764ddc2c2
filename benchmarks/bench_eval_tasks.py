"""``distllm eval --tasks`` items per second against lm-evaluation-harness's HF backend on the export.

    python benchmarks/bench_eval_tasks.py --run runs/debug --tasks piqa.jsonl     # a trained run
    python benchmarks/bench_eval_tasks.py --run runs/debug                        # synthetic HellaSwag-like items
    python benchmarks/bench_eval_tasks.py --run runs/debug --items 40 --lm-eval-batch 16   # smoke run

Both score the same items of the same checkpoint in fp32 on this machine, in one process:

* distllm: ``distllm.eval.multiple_choice.score`` on the checkpoint (tokenization, the shared-context
  KV-cache forwards, metrics); the model is loaded before the clock starts;
* lm-eval: ``HFLM(pretrained=EXPORT).loglikelihood(requests)`` on the ``distllm export`` of the same
  checkpoint, the requests built by its own task code from a task YAML over the same items
  (``write_lm_eval_task``); the model is loaded and the requests built before the clock starts.

Both report acc / acc_norm, which must agree (checked); the ratio is of items per second.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path


def synthetic_items(n: int, seed: int = 0) -> list[dict]:
    """HellaSwag's shape: a context of 30-60 words and 4 endings of 10-25 words."""
    rng = random.Random(seed)
    words = ("the a of to and in is it that for on with as was by at an be this from or are which not "
             "function return value class module import file list string data object name type error "
             "default argument used call new first time set line number key only if when each other").split()
    rows = []
    for _ in range(n):
        ctx = " ".join(rng.choice(words) for _ in range(rng.randint(30, 60))).capitalize() + "."
        ends = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 25))) + "." for _ in range(4)]
        rows.append({"context": ctx, "choices": ends, "label": rng.randrange(4)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/debug", help="run or checkpoint directory (default: %(default)s)")
    p.add_argument("--tasks", default=None, help="a task file (default: synthetic HellaSwag-like items)")
    p.add_argument("--items", type=int, default=200, help="items to score (the first N of --tasks)")
    p.add_argument("--lm-eval-batch", type=int, default=32, help="lm-eval's batch_size (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from distllm import checkpoint
    from distllm.config import from_dict
    from distllm.eval import multiple_choice as mc
    from distllm.eval.tasks import load_task, write_lm_eval_task
    from distllm.export import export
    from distllm.model import Transformer
    from distllm.tokenizer import load_tokenizer

    ckpt = checkpoint.locate(args.run)
    state = checkpoint.read_state(ckpt)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        rows = ([json.loads(x) for x in Path(args.tasks).read_text().splitlines() if x.strip()] if args.tasks
                else synthetic_items(args.items))[: args.items]
        name = Path(args.tasks).name.split(".")[0] if args.tasks else "synthetic"
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = load_task(path)
        tok = load_tokenizer(ckpt / "tokenizer.json")
        model = Transformer(from_dict({"model": state["config"]["model"]}).model)
        checkpoint.load_weights(ckpt, model)
        model.eval()

        mc.score(model, [task], tok, batch_tokens=256)  # warm-up (allocator, kernels) on a copy of the task
        task = load_task(path)  # no cached encodings: tokenization is timed
        t0 = time.perf_counter()
        ours = mc.score(model, [task], tok)["tasks"][name]
        ours_s = time.perf_counter() - t0
        print(f"distllm: {len(task)} items in {ours_s:.2f} s = {len(task) / ours_s:.1f} items/s; "
              f"acc {ours['acc']:.4f}, acc_norm {ours['acc_norm']:.4f}")

        export(ckpt, tmp / "hf")
        write_lm_eval_task(task, tmp / "lm_eval_tasks")
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict

        lm = HFLM(pretrained=str(tmp / "hf"), dtype="float32", batch_size=args.lm_eval_batch, device="cpu")
        lm_task = get_task_dict([name], TaskManager(include_path=str(tmp / "lm_eval_tasks")))[name]
        lm_task.build_all_requests(rank=0, world_size=1)
        requests = [inst for inst in lm_task.instances]
        t0 = time.perf_counter()
        results = lm.loglikelihood(requests)
        theirs_s = time.perf_counter() - t0
        by_doc: dict[int, list[tuple[int, float]]] = {}
        for inst, (ll, _) in zip(requests, results):
            by_doc.setdefault(inst.doc_id, []).append((inst.idx, ll))
        lls = {d: [ll for _, ll in sorted(v)] for d, v in by_doc.items()}
        theirs = mc.task_metrics(task, lls)
        print(f"lm-eval HF backend (batch {args.lm_eval_batch}): {len(task)} items in {theirs_s:.2f} s = "
              f"{len(task) / theirs_s:.1f} items/s; acc {theirs['acc']:.4f}, acc_norm {theirs['acc_norm']:.4f}")
        same = (theirs["acc"], theirs["acc_norm"]) == (ours["acc"], ours["acc_norm"])
        print(f"same acc / acc_norm: {'yes' if same else 'NO'}")
        print(f"ratio distllm / lm-eval items/s: {theirs_s / ours_s:.2f}x")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
