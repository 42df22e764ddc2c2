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
context fills a KV cache (``Transformer.new_kv_cache``), and one more forward of all choices starts
from copies of it. Items share these forwards in batches of about ``batch_tokens`` tokens: the cache
API has one start position per batch, so a batch runs the first ``shortest context - 1`` tokens of
each context once, and then, per choice, the rest of its context (a few tokens: contexts in a batch
differ by at most ``slack``) and the choice, in forwards of rows of similar length (little padding). Items that need truncation (a choice
would not fit next to the whole context) are scored one choice per row with lm-eval's left truncation.

Processes. The batches are formed from the whole task set, identically in every process; rank r
runs batches r, r + N, r + 2N, ... and the log-likelihoods are gathered (``Runtime.gather_object``),
so every batch is computed the same way for any number of processes and 1 and N processes report
the same numbers. Every rank runs the same number of forwards (idle ranks run one-token passes),
which ZeRO-3's collective forward and DDP's buffer broadcast need. The model may be wrapped (DDP, a
DeepSpeed engine): forwards go through the wrapper, the KV cache is made from the unwrapped module.
"""

from __future__ import annotations

import contextlib
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
    """Items with contexts of about the same length. Their shared prefix -- the first ``prefix`` context
    tokens, one less than the shortest context -- runs once per item into a KV cache; one more forward
    runs, for every choice, the rest of its item's context and the choice (all rows start at position
    ``prefix``, so the positions are exact)."""

    items: list[EncodedItem]

    @property
    def prefix(self) -> int:
        return min(len(e.context) for e in self.items) - 1

    def rows(self) -> list[tuple[int, list[int], list[int]]]:
        """(item in batch, continuation, tokens from position ``prefix``: rest of the context + choice[:-1])."""
        P = self.prefix
        return [(k, c, e.context[P:] + c[:-1]) for k, e in enumerate(self.items) for c in e.continuations]

    def chunks(self) -> list[list[int]]:
        """The rows split into forwards of similar length (longest first), so little of a forward is padding:
        a row joins a chunk while the chunk's longest row is at most 5/4 of it (+ 2 tokens)."""
        lengths = [len(t) for _, _, t in self.rows()]
        order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
        out: list[list[int]] = []
        for r in order:
            if out and lengths[out[-1][0]] <= 1.25 * lengths[r] + 2:
                out[-1].append(r)
            else:
                out.append([r])
        return out

    def forwards(self) -> int:
        return (self.prefix > 0) + len(self.chunks())


@dataclass
class TruncatedBatch:
    """(item, choice) rows scored one by one with lm-eval's left truncation."""

    rows: list[tuple[EncodedItem, int]]

    def forwards(self) -> int:
        return 1


def slack(length: int) -> int:
    """Context tokens a batch may recompute per choice beyond its shortest context (a quarter, at least 4)."""
    return max(4, length // 4)


def plan_batches(items: list[EncodedItem], max_len: int, batch_tokens: int) -> list:
    """The global list of batches (the same in every process): items sorted by context length, cut into
    batches of about ``batch_tokens`` tokens whose contexts differ by at most ``slack`` tokens; then the
    rows that need truncation, by length. At least one item or row per batch."""
    fitting = sorted((e for e in items if e.fits(max_len)), key=lambda e: (len(e.context), e.task, e.item))
    truncated = [(e, i) for e in items if not e.fits(max_len) for i in range(len(e.continuations))]
    batches: list = []
    group: list[EncodedItem] = []
    rows = tail = 0  # choices in the group; longest (rest of context + choice) in it
    for e in fitting:
        shortest = len(group[0].context) if group else len(e.context)
        e_tail = len(e.context) - shortest + max(len(c) for c in e.continuations)
        new_rows, new_tail = rows + len(e.continuations), max(tail, e_tail)
        if group and (len(e.context) - shortest > slack(shortest)
                      or new_rows * new_tail + len(group) * shortest > batch_tokens):
            batches.append(SharedBatch(group))
            group, new_rows, new_tail = [], len(e.continuations), max(len(c) for c in e.continuations)
        group.append(e)
        rows, tail = new_rows, new_tail
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


@contextlib.contextmanager
def _head_rows(module: torch.nn.Module, rows: torch.Tensor):
    """While active, the output projection (``module.lm_head``) sees only ``rows`` of the flattened
    (B * T, d) hidden states, so a forward returns (len(rows), V) logits and the vocabulary projection
    is never paid for positions that are not scored (a forward pre-hook: it works through DDP and
    DeepSpeed wrappers alike). A model without ``lm_head`` is left alone (it returns (B, T, V))."""
    head = getattr(module, "lm_head", None)
    if not isinstance(head, torch.nn.Module):
        yield
        return

    def select(_, args):
        x = args[0]
        return (x.reshape(-1, x.shape[-1]).index_select(0, rows.to(x.device)), *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def _scored(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(N, V) logits of the scored positions: as returned under ``_head_rows``, or picked from (B, T, V)."""
    return logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1]).index_select(0, rows)


def _logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) from logits (..., V) and targets (...) as fp32 (..., )."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _run_shared(model, module, batch: SharedBatch, device) -> dict[tuple[int, int], list[float]]:
    items, P = batch.items, batch.prefix
    rows = batch.rows()  # (item in batch, continuation, tokens from position P)
    prefix = None
    if P > 0:  # the shared prefix: once per item, then copied to each of its choices' rows
        prefix = module.new_kv_cache(len(items), P)
        with _head_rows(module, torch.zeros(0, dtype=torch.long, device=device)):  # only the cache is wanted
            model(torch.tensor([e.context[:P] for e in items], dtype=torch.long, device=device), cache=prefix,
                  start_pos=0)
    scores: dict[int, float] = {}
    for chunk in batch.chunks():
        R, width = len(chunk), max(len(rows[r][2]) for r in chunk)
        cache = module.new_kv_cache(R, P + width)
        if prefix is not None:
            owner = torch.tensor([rows[r][0] for r in chunk], device=device)  # (R,)
            for layer in range(len(cache.k)):
                cache.k[layer][:, :, :P] = prefix.k[layer][owner]
                cache.v[layer][:, :, :P] = prefix.v[layer][owner]
        inputs = torch.zeros(R, width, dtype=torch.long, device=device)  # right-padded: pads come after
        targets = torch.zeros(R, width, dtype=torch.long, device=device)
        mask = torch.zeros(R, width, dtype=torch.bool, device=device)
        for i, r in enumerate(chunk):
            k, c, t = rows[r]
            inputs[i, : len(t)] = torch.tensor(t)
            first = len(items[k].context) - P - 1  # the last context token predicts the choice's first
            targets[i, first : first + len(c)] = torch.tensor(c)
            mask[i, first : first + len(c)] = True
        flat = mask.flatten().nonzero().flatten()  # (N,) scored positions of the (R * width) grid
        with _head_rows(module, flat):
            logits = _scored(model(inputs, cache=cache, start_pos=P), flat)  # (N, V)
        picked = torch.zeros(R * width, dtype=torch.float64, device=device)
        picked[flat] = _logprobs(logits, targets.flatten()[flat]).double()
        scores.update(zip(chunk, picked.view(R, width).sum(-1).tolist()))
    out, r = {}, 0
    for e in items:
        k = len(e.continuations)
        out[(e.task, e.item)] = [scores[r + i] for i in range(k)]
        r += k
    return out


def _run_truncated(model, module, batch: TruncatedBatch, max_len: int, device) -> dict[tuple[int, int, int], float]:
    seqs, conts = [], []
    for e, i in batch.rows:
        cont = e.continuations[i]
        seqs.append((e.context + cont)[-(max_len + 1):][:-1])
        conts.append(cont)
    width = max(len(s) for s in seqs)
    inputs = torch.zeros(len(seqs), width, dtype=torch.long, device=device)  # right-padded
    for r, s in enumerate(seqs):
        inputs[r, : len(s)] = torch.tensor(s)
    # the last len(cont) input positions of each row predict its continuation
    flat = torch.tensor([r * width + j for r, (s, c) in enumerate(zip(seqs, conts)) for j in range(len(s) - len(c), len(s))],
                        dtype=torch.long, device=device)  # (N,)
    with _head_rows(module, flat):
        logits = _scored(model(inputs), flat)  # (N, V)
    lp = _logprobs(logits, torch.tensor([t for c in conts for t in c], device=device)).double()
    out, n = {}, 0
    for (e, i), cont in zip(batch.rows, conts):
        out[(e.task, e.item, i)] = float(lp[n : n + len(cont)].sum())
        n += len(cont)
    return out


@torch.no_grad()
def loglikelihoods(model, items: list[EncodedItem], max_len: int, rt=None, device=None,
                   batch_tokens: Optional[int] = None) -> dict[tuple[int, int], list[float]]:
    """{(task, item): [log-likelihood of each choice]} for ``items``, computed by all ranks of ``rt``
    together (each rank passes the same ``items``); every rank gets every result."""
    module = _unwrap(model, rt)
    device = device if device is not None else (rt.device if rt is not None else next(module.parameters()).device)
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
                single.update(_run_truncated(model, module, batch, max_len, device))
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
