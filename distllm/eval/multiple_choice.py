"""Multiple-choice scoring exactly as lm-evaluation-harness 0.4 does it for ``output_type: multiple_choice``.

For an item with context ``c`` and choices ``x_1..x_k``, choice i is scored by the summed
log-likelihood of the continuation ``delimiter + x_i`` given ``c``:

* Encoding (lm-eval's ``_encode_pair``): trailing whitespace of the context moves to the start of
  the continuation; ``context + continuation`` is encoded as one text and cut where the encoding of
  the context alone ends (its length), so the boundary tokens are the ones the model would see in
  running text. The context tokens are that encoding of the context. An empty context is replaced by
  the prefix token (``<|endoftext|>``, the export's BOS) unless the continuation already starts with
  it. Nothing else is prepended: lm-eval adds no BOS on the export (its tokenizer adds none).
* Truncation: ``(context + continuation)[-(max_seq_len + 1):][:-1]`` is the model input and the
  last ``len(continuation)`` positions are scored; a continuation longer than ``max_seq_len`` is an error.
* Metrics: ``acc`` = argmax of the log-likelihoods is the gold index; ``acc_norm`` = argmax of
  log-likelihood / ``len(choice)`` in characters, without the delimiter; ties go to the first
  (numpy's argmax); standard errors ``sqrt(p (1 - p) / (n - 1))`` (lm-eval's ``mean_stderr``).

Speed. The choices of an item share the context, so the context runs once: a forward of the
context fills a KV cache (``Transformer.new_kv_cache``), its last position scores every choice's
first token, and one more forward of all choices' remaining tokens starts from copies of that cache.
Items whose contexts have the same number of tokens share these forwards (the cache API has one start
position per batch), in batches of about ``batch_tokens`` tokens. Items that need truncation (a choice
would not fit next to the whole context) are scored one choice per row with lm-eval's left truncation.

Processes. The batches are formed from the whole task set, identically in every process; rank r
runs batches r, r + N, r + 2N, ... and the log-likelihoods are gathered (``Runtime.gather_object``),
so every batch is computed the same way for any number of processes and 1 and N processes report
the same numbers. Every rank runs the same number of forwards (idle ranks run one-token passes),
which ZeRO-3's collective forward and DDP's buffer broadcast need. The model may be wrapped (DDP, a
DeepSpeed engine): forwards go through the wrapper, the KV cache is made from the unwrapped module.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from distllm.errors import DataError
from distllm.eval.tasks import Item, Task

DEFAULT_DELIMITER = " "


# --------------------------------------------------------------------------- encoding


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                prefix_id: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness 0.4 makes them for a causal model."""
    if context == "":
        cont = encode(continuation)
        if not cont:
            return [prefix_id], []
        return ([prefix_id], cont) if cont[0] != prefix_id else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


@dataclass
class EncodedItem:
    task: int  # index into the task list
    item: int  # index into the task's items
    context: list[int]
    continuations: list[list[int]]

    def fits(self, max_len: int) -> bool:
        """No truncation: every choice scored after the whole context (lm-eval cuts nothing)."""
        return all(len(self.context) + len(c) <= max_len + 1 for c in self.continuations)


def encode_task(task: Task, task_index: int, tokenizer, prefix_id: int, delimiter: str,
                max_len: int) -> list[EncodedItem]:
    """Every item of ``task`` encoded (cached on the task per tokenizer, delimiter and max length)."""
    from distllm.tokenizer import fingerprint

    key = (fingerprint(tokenizer), delimiter, max_len, prefix_id)
    cached = task._encoded.get(key)
    if cached is not None:
        return [EncodedItem(task_index, e.item, e.context, e.continuations) for e in cached]

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text).ids

    out = []
    for item in task.items:
        ctx, conts = None, []
        for choice in item.choices:
            c, cont = encode_pair(encode, item.context, delimiter + choice, prefix_id)
            where = f"{task.path}: item {item.index}"
            if not c:
                raise DataError(f"{where}: the context is only whitespace, which lm-evaluation-harness cannot score")
            if not cont:
                raise DataError(f"{where}: choice {len(conts)} encodes to no tokens (an empty choice and delimiter)")
            if len(cont) > max_len:
                raise DataError(f"{where}: choice {len(conts)} is {len(cont)} tokens, longer than the model's "
                                f"context of {max_len}")
            ctx = c  # the same for every choice: it depends on the context alone
            conts.append(cont)
        out.append(EncodedItem(task_index, item.index, ctx, conts))
    task._encoded[key] = out
    return out


# --------------------------------------------------------------------------- batches


@dataclass
class SharedBatch:
    """Items whose contexts have the same length: one context forward, one forward of all choices."""

    items: list[EncodedItem]

    def forwards(self) -> int:
        return 1 + any(len(c) > 1 for e in self.items for c in e.continuations)


@dataclass
class TruncatedBatch:
    """(item, choice) rows scored one by one with lm-eval's left truncation."""

    rows: list[tuple[EncodedItem, int]]

    def forwards(self) -> int:
        return 1


def plan_batches(items: list[EncodedItem], max_len: int, batch_tokens: int) -> list:
    """The global list of batches (the same in every process): shared-context batches by context length,
    then truncated rows by length, each of about ``batch_tokens`` tokens (at least one item or row)."""
    shared: dict[int, list[EncodedItem]] = {}
    truncated: list[tuple[EncodedItem, int]] = []
    for e in items:
        if e.fits(max_len):
            shared.setdefault(len(e.context), []).append(e)
        else:
            truncated.extend((e, i) for i in range(len(e.continuations)))
    batches: list = []
    for length in sorted(shared, reverse=True):
        group, cost, longest, rows = [], 0, 0, 0
        for e in shared[length]:
            longest_e = max(len(c) for c in e.continuations)
            new_rows, new_longest = rows + len(e.continuations), max(longest, longest_e)
            if group and new_rows * (length + new_longest) > batch_tokens:
                batches.append(SharedBatch(group))
                group, new_rows, new_longest = [], len(e.continuations), longest_e
            group.append(e)
            rows, longest = new_rows, new_longest
        if group:
            batches.append(SharedBatch(group))
    def width(row: tuple[EncodedItem, int]) -> int:  # input tokens after truncation
        return min(len(row[0].context) + len(row[0].continuations[row[1]]) - 1, max_len)

    truncated.sort(key=lambda row: -width(row))  # longest first: a chunk's first row sets its width
    chunk: list = []
    for row in truncated:
        if chunk and (len(chunk) + 1) * width(chunk[0]) > batch_tokens:
            batches.append(TruncatedBatch(chunk))
            chunk = []
        chunk.append(row)
    if chunk:
        batches.append(TruncatedBatch(chunk))
    return batches


def default_batch_tokens(vocab_size: int) -> int:
    """Tokens per forward: about 512 MiB of fp32 logits, between 256 and 8192 tokens."""
    return int(max(256, min(8192, (1 << 27) // max(vocab_size, 1))))


# --------------------------------------------------------------------------- forwards


def _unwrap(model, rt) -> torch.nn.Module:
    inner = rt.unwrap(model) if rt is not None else model
    inner = getattr(inner, "module", inner)  # a plain DDP / engine without a Runtime
    return getattr(inner, "_orig_mod", inner)


def _logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) from logits (..., V) and targets (...) as fp32 (..., )."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _run_shared(model, module, batch: SharedBatch, device) -> dict[tuple[int, int], list[float]]:
    items = batch.items
    L = len(items[0].context)
    ctx = torch.tensor([e.context for e in items], dtype=torch.long, device=device)  # (k, L)
    cache = module.new_kv_cache(len(items), L)
    logits = model(ctx, cache=cache, start_pos=0)  # (k, L, V)
    last = logits[:, -1].float().log_softmax(-1)  # (k, V): predicts each choice's first token
    rows = [(k, c) for k, e in enumerate(items) for c in e.continuations]  # (item in batch, continuation)
    owner = torch.tensor([k for k, _ in rows], device=device)  # (R,)
    first = torch.tensor([c[0] for _, c in rows], device=device)  # (R,)
    scores = last[owner, first].double()  # (R,)
    tail = max(len(c) for _, c in rows) - 1
    if tail > 0:
        R = len(rows)
        big = module.new_kv_cache(R, L + tail)
        for layer in range(len(big.k)):  # every row starts from its item's context
            big.k[layer][:, :, :L] = cache.k[layer][owner, :, :L]
            big.v[layer][:, :, :L] = cache.v[layer][owner, :, :L]
        inputs = torch.zeros(R, tail, dtype=torch.long, device=device)  # right-padded: pads come after
        targets = torch.zeros(R, tail, dtype=torch.long, device=device)
        mask = torch.zeros(R, tail, dtype=torch.bool, device=device)
        for r, (_, c) in enumerate(rows):
            n = len(c) - 1
            inputs[r, :n] = torch.tensor(c[:-1])
            targets[r, :n] = torch.tensor(c[1:])
            mask[r, :n] = True
        logits = model(inputs, cache=big, start_pos=L)  # (R, tail, V)
        picked = torch.zeros(R, tail, dtype=torch.float64, device=device)
        picked[mask] = _logprobs(logits[mask], targets[mask]).double()  # (N,): the padding is never normalised
        scores += picked.sum(-1)
    out, r = {}, 0
    for e in items:
        k = len(e.continuations)
        out[(e.task, e.item)] = scores[r : r + k].tolist()
        r += k
    return out


def _run_truncated(model, batch: TruncatedBatch, max_len: int, device) -> dict[tuple[int, int, int], float]:
    seqs, conts = [], []
    for e, i in batch.rows:
        cont = e.continuations[i]
        seqs.append((e.context + cont)[-(max_len + 1):][:-1])
        conts.append(cont)
    width = max(len(s) for s in seqs)
    inputs = torch.zeros(len(seqs), width, dtype=torch.long, device=device)  # right-padded
    for r, s in enumerate(seqs):
        inputs[r, : len(s)] = torch.tensor(s)
    logits = model(inputs)  # (B, width, V)
    out = {}
    for r, ((e, i), s, cont) in enumerate(zip(batch.rows, seqs, conts)):
        n = len(cont)
        positions = logits[r, len(s) - n : len(s)]  # (n, V): the last n input positions predict the continuation
        out[(e.task, e.item, i)] = float(_logprobs(positions, torch.tensor(cont, device=device)).double().sum())
    return out


@torch.no_grad()
def loglikelihoods(model, items: list[EncodedItem], max_len: int, rt=None, device=None,
                   batch_tokens: Optional[int] = None) -> dict[tuple[int, int], list[float]]:
    """{(task, item): [log-likelihood of each choice]} for ``items``, computed by all ranks of ``rt``
    together (each rank passes the same ``items``); every rank gets every result."""
    module = _unwrap(model, rt)
    device = device if device is not None else (rt.device if rt is not None else module.tok_emb.weight.device)
    rank, world = (rt.rank, rt.world_size) if rt is not None else (0, 1)
    batch_tokens = batch_tokens or default_batch_tokens(module.cfg.vocab_size)
    batches = plan_batches(items, max_len, batch_tokens)
    mine = batches[rank::world]
    planned = sum(b.forwards() for b in mine)
    most = max(rt.gather_object(planned)) if world > 1 else planned
    was_training = model.training
    model.eval()
    shared: dict[tuple[int, int], list[float]] = {}
    single: dict[tuple[int, int, int], float] = {}
    try:
        for batch in mine:
            if isinstance(batch, SharedBatch):
                shared.update(_run_shared(model, module, batch, device))
            else:
                single.update(_run_truncated(model, batch, max_len, device))
        pad = torch.zeros(1, 1, dtype=torch.long, device=device)
        for _ in range(most - planned):  # the same number of forwards on every rank
            model(pad)
    finally:
        model.train(was_training)
    parts = rt.gather_object((shared, single)) if world > 1 else [(shared, single)]
    out: dict[tuple[int, int], list[float]] = {}
    pieces: dict[tuple[int, int], dict[int, float]] = {}
    for s, t in parts:
        out.update(s)
        for (task, item, i), ll in t.items():
            pieces.setdefault((task, item), {})[i] = ll
    for key, by_choice in pieces.items():
        out[key] = [by_choice[i] for i in range(len(by_choice))]
    return out


# --------------------------------------------------------------------------- metrics


def mean_stderr(values: np.ndarray) -> Optional[float]:
    """lm-eval's standard error of a mean: sample standard deviation / sqrt(n); None below 2 values."""
    n = len(values)
    if n < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(n))


def item_predictions(item: Item, lls: Sequence[float]) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood per character of the choice)."""
    lls = np.asarray(lls, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in item.choices])
    with np.errstate(divide="ignore", invalid="ignore"):
        return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def task_metrics(task: Task, lls: dict[int, list[float]], indices: Optional[Sequence[int]] = None,
                 per_item: bool = False) -> dict:
    """acc, acc_norm and their standard errors over ``indices`` (default: every item) of ``task``."""
    chosen = [task.items[i] for i in (range(len(task.items)) if indices is None else indices)]
    acc, acc_norm, rows = [], [], []
    for item in chosen:
        pred, pred_norm = item_predictions(item, lls[item.index])
        acc.append(float(pred == item.gold))
        acc_norm.append(float(pred_norm == item.gold))
        if per_item:
            rows.append({"index": item.index, "gold": item.gold, "pred": pred, "pred_norm": pred_norm,
                         "loglikelihoods": lls[item.index]})
    a, b = np.array(acc), np.array(acc_norm)
    out = {"items": len(chosen),
           "acc": float(a.mean()) if len(a) else None, "acc_stderr": mean_stderr(a),
           "acc_norm": float(b.mean()) if len(b) else None, "acc_norm_stderr": mean_stderr(b)}
    if per_item:
        out["per_item"] = rows
    return out


# --------------------------------------------------------------------------- entry points


def prefix_token(tokenizer) -> int:
    """The token that stands in for an empty context: ``<|endoftext|>`` (the export's BOS)."""
    from distllm.tokenizer import eot_id

    return eot_id(tokenizer)


def score(model, tasks: list[Task], tokenizer, rt=None, device=None, *, delimiter: str = DEFAULT_DELIMITER,
          per_item: bool = False, batch_tokens: Optional[int] = None,
          clean: Optional[dict[str, list[int]]] = None) -> dict:
    """Score every task: ``{"tasks": {name: {file, items, acc, acc_stderr, acc_norm, acc_norm_stderr[,
    per_item][, clean]}}, "seconds", "items_per_s"}``; ``clean`` (task name -> item indices) adds the
    scores on that subset. Same result on every rank."""
    module = _unwrap(model, rt)
    max_len = module.cfg.max_seq_len
    prefix = prefix_token(tokenizer)
    t0 = time.perf_counter()
    encoded = [e for k, t in enumerate(tasks) for e in encode_task(t, k, tokenizer, prefix, delimiter, max_len)]
    lls = loglikelihoods(model, encoded, max_len, rt, device, batch_tokens)
    seconds = time.perf_counter() - t0
    results = {}
    for k, task in enumerate(tasks):
        by_item = {i: lls[(k, i)] for i in range(len(task.items))}
        results[task.name] = {"file": task.path, **task_metrics(task, by_item, per_item=per_item)}
        if clean is not None and task.name in clean:
            results[task.name]["clean"] = task_metrics(task, by_item, clean[task.name])
    total = sum(len(t) for t in tasks)
    return {"tasks": results, "seconds": seconds, "items_per_s": total / seconds if seconds > 0 else None}


def score_tasks(model, tasks: list[Task], tokenizer, rt=None, device=None) -> dict[str, float]:
    """For the training loop: flat metrics ``eval/<task>/acc``, ``.../acc_norm``, ``.../acc_stderr``,
    ``.../acc_norm_stderr`` (all ranks call it together; every rank gets the same numbers). ``model``
    may be wrapped (DDP, a DeepSpeed engine, ZeRO-3 included); its training flag is restored."""
    out = {}
    for name, m in score(model, tasks, tokenizer, rt, device)["tasks"].items():
        for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            if m[key] is not None:
                out[f"eval/{name}/{key}"] = m[key]
    return out
