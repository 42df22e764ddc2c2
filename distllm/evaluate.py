"""Validation loss, perplexity and bits per byte, during training and of a saved checkpoint (``distllm eval``);
``distllm eval --tasks`` scores multiple-choice task files (``distllm.eval.multiple_choice``).

The validation set is the first ``eval_batches x micro_batch_size`` samples of the val split, in
order: the same samples for any number of processes. Rank r evaluates samples r, r + N, r + 2N, ...;
the per-sample losses are summed over ranks, so 1 and 2 processes report the same mean (up to float
summation order). Every rank runs the same number of forward passes (a rank with nothing left runs
a zero-weight pass), which ZeRO-3's collective forward needs. With ``data.document_mask`` the
samples get their document ids exactly as the training loader makes them
(``data.packing.document_ids``), so validation sees the attention training sees.

Bits per byte = summed negative log-likelihood (nats) / (ln 2 x UTF-8 bytes of the scored tokens),
the bytes of each token from the byte-level tokenizer (``tokenizer.token_byte_lengths``;
``<|endoftext|>`` has none): a number that runs with different tokenizers can compare.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from distllm import checkpoint
from distllm.batch_plan import validation_micro_batch
from distllm.config import Config
from distllm.data.loader import SampleIndex, TokenShards
from distllm.data.packing import document_ids
from distllm.data.storage import storage_kwargs
from distllm.distributed import resolve_device
from distllm.errors import DataError
from distllm.loss import next_token_loss
from distllm.metrics import perplexity
from distllm.model import Transformer
from distllm.tokenizer import load_tokenizer, token_byte_lengths


def rank_batches(num_rows: int, micro_batch: int, rank: int, world_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """This rank's share of rows 0..num_rows-1 (rows r, r + N, ...: the same rows for any number of processes)
    in micro-batches: (row ids, how many are real). Every rank yields the same number of batches, which
    ZeRO-3's gathers need: a rank out of rows gets a zero-weight pass on row 0."""
    mine = np.arange(rank, num_rows, world_size)
    for k in range(math.ceil(math.ceil(num_rows / world_size) / micro_batch)):
        ids = mine[k * micro_batch : (k + 1) * micro_batch]
        yield (ids, len(ids)) if len(ids) else (np.zeros(1, dtype=np.int64), 0)


class ValidationSet:
    """This rank's share of the fixed validation samples, in micro-batches."""

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch_size: int, eval_batches: int,
                 rank: int = 0, world_size: int = 1, document_mask: bool = False):
        self.samples = SampleIndex(shards, seq_len)
        wanted = eval_batches * micro_batch_size
        self.num_samples = min(wanted, len(self.samples))
        if self.num_samples == 0:
            raise DataError(f"the val split of {shards.data_dir} has no sample of {seq_len + 1} tokens; "
                            "raise data.val_fraction or lower data.seq_len")
        self.seq_len = seq_len
        self.batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.eot_id = shards.eot_id if document_mask else None
        """Set: each sample carries its document ids (``data.document_mask``)."""
        self.byte_lengths = torch.from_numpy(token_byte_lengths(load_tokenizer(shards.tokenizer_path)))  # (vocab,)

    def batches(self):
        """(tokens (b, seq_len + 1), weight, doc_ids (b, seq_len) or None); weight 0 marks a padding pass."""
        for ids, weight in rank_batches(self.num_samples, self.batch_size, self.rank, self.world_size):
            tokens = torch.from_numpy(self.samples.read(ids))
            docs = None if self.eot_id is None else document_ids(tokens[:, :-1], self.eot_id)  # as the loader does
            yield tokens, weight, docs

    def target_bytes(self, tokens: torch.Tensor) -> int:
        """UTF-8 bytes of the scored (target) tokens of a batch (b, seq_len + 1)."""
        return int(self.byte_lengths[tokens[:, 1:]].sum())


@torch.no_grad()
def validation_metrics(model: torch.nn.Module, val: ValidationSet, device: torch.device, rt=None) -> dict:
    """``val_loss`` (mean next-token loss), ``val_ppl`` and ``val_bpb`` (bits per byte) over the whole
    validation set (all ranks take part when ``rt`` is given; every rank gets the same numbers)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=device)  # (summed nats, scored tokens, their bytes)
    for tokens, weight, docs in val.batches():
        loss = next_token_loss(model, tokens.to(device), None if docs is None else docs.to(device))  # mean
        if weight:
            total[0] += loss.double() * weight * val.seq_len
            total[1] += weight * val.seq_len
            total[2] += val.target_bytes(tokens)
    model.train(was_training)
    if rt is not None:
        total = rt.sum(total)
    nats, count, nbytes = total.tolist()
    loss = nats / count
    return {"val_loss": loss, "val_ppl": perplexity(loss), "val_bpb": nats / (math.log(2) * nbytes) if nbytes else None}


def validation_loss(model: torch.nn.Module, val: ValidationSet, device: torch.device, rt=None) -> float:
    """Mean next-token loss over the whole validation set (all ranks take part when ``rt`` is given)."""
    return validation_metrics(model, val, device, rt)["val_loss"]


def load_for_inference(cfg: Config, target: str | None):
    """Build the model a checkpoint was trained with, load its weights, put it on ``train.device``.

    ``target`` is a run directory or a checkpoint directory (default: ``run.dir``). The model shape
    comes from the checkpoint's own saved config, so a changed run file cannot mismatch it.
    """
    from distllm.config import from_dict

    path = checkpoint.locate(target or cfg.run.dir)
    state = checkpoint.read_state(path)
    saved = from_dict({"model": state["config"]["model"]})
    model = Transformer(saved.model)
    checkpoint.load_weights(path, model)
    return model.to(resolve_device(cfg.train.device)).eval(), state, path


def run_eval(cfg: Config, target: str | None = None) -> dict:
    """``distllm eval``: validation loss / perplexity / bits per byte of a checkpoint on its data's val split."""
    model, state, path = load_for_inference(cfg, target)
    device = next(model.parameters()).device
    shards = TokenShards(cfg.data.dir, "val", storage=storage_kwargs(cfg.data))
    if shards.fingerprint != state["tokenizer_fingerprint"]:
        raise DataError(
            f"the data in {cfg.data.dir} was tokenized with a different tokenizer than checkpoint {path} "
            f"(fingerprint {shards.fingerprint[:12]} != {state['tokenizer_fingerprint'][:12]})"
        )
    seq_len = state["config"]["data"]["seq_len"]
    val = ValidationSet(shards, seq_len, validation_micro_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size),
                        cfg.train.eval_batches, document_mask=cfg.data.document_mask)
    return {"checkpoint": str(path), "step": state["step"], **validation_metrics(model, val, device),
            "val_tokens": val.num_samples * seq_len, "document_mask": cfg.data.document_mask}


# --------------------------------------------------------------------------- multiple-choice tasks


def checkpoint_tokenizer(cfg: Config, path, state: dict):
    """The tokenizer a checkpoint trained with: its own copy, else data.dir's (checked by fingerprint)."""
    from distllm.data.shards import TOKENIZER_FILE
    from distllm.data.storage import store_from_config
    from distllm.tokenizer import fingerprint

    tok_file = path / TOKENIZER_FILE
    if not tok_file.is_file():
        tok_file = store_from_config(cfg.data).local_path(TOKENIZER_FILE)
    tok = load_tokenizer(tok_file)
    if fingerprint(tok) != state["tokenizer_fingerprint"]:
        raise DataError(f"{tok_file} is a different tokenizer than the one checkpoint {path} was trained with; "
                        "point data.dir at that run's data")
    return tok


def task_runtime(cfg: Config):
    """The processes of ``distllm eval --tasks``: one (no process group), or those of torchrun /
    accelerate launch, each holding the whole model (data parallel over items, no engine wrap)."""
    from distllm import distributed

    world = distributed.launcher_world_size()
    if world == 1:
        return distributed.local_runtime(str(resolve_device(cfg.train.device)))
    cfg.train.micro_batch_size = validation_micro_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    cfg.train.global_batch_size = cfg.train.micro_batch_size * world  # nothing trains: any batch shape will do
    cfg.train.debug = False
    cfg.distributed.zero_stage = None  # every rank holds the whole model (no optimizer state to shard)
    cfg.distributed.deepspeed_config = None
    return distributed.setup(cfg)


def run_task_eval(cfg: Config, target: str | None, task_files: str, per_item: bool = False,
                  contamination: str | None = None, delimiter: str = " ", batch_tokens: int | None = None,
                  out: str | None = None) -> dict:
    """``distllm eval TARGET --tasks A.jsonl,B.jsonl``: multiple-choice accuracy of a checkpoint, as
    lm-evaluation-harness 0.4 scores it (``distllm.eval.multiple_choice``). With ``contamination`` (a
    report of ``distllm contamination``) each task is also scored on its clean subset. Every rank
    returns the result; the main one writes it to ``RUN_DIR/eval/`` (or ``out``)."""
    from distllm.config import from_dict
    from distllm.eval import multiple_choice
    from distllm.eval.tasks import load_tasks

    tasks = load_tasks(task_files)
    clean = clean_subsets(tasks, contamination) if contamination else None
    rt = task_runtime(cfg)
    path = checkpoint.locate(target or cfg.run.dir)
    state = checkpoint.read_state(path)
    tokenizer = checkpoint_tokenizer(cfg, path, state)
    model = Transformer(from_dict({"model": state["config"]["model"]}).model)
    checkpoint.load_weights(path, model)
    model = model.to(rt.device).eval()
    result = multiple_choice.score(model, tasks, tokenizer, rt, rt.device, delimiter=delimiter, per_item=per_item,
                                   batch_tokens=batch_tokens, clean=clean)
    report = {"checkpoint": str(path), "step": state["step"], "processes": rt.world_size,
              "delimiter": delimiter, **result}
    if contamination:
        report["contamination_report"] = str(contamination)
    if rt.is_main:
        report["written_to"] = str(_write_eval(report, path, tasks, out))
    return report


def clean_subsets(tasks, report_path: str) -> dict[str, list[int]]:
    """Each task's clean item indices from a contamination report, which must have checked these files."""
    from distllm.eval.contamination import load_report

    report = load_report(report_path)
    out = {}
    for task in tasks:
        entry = report["tasks"].get(task.name)
        if entry is None:
            raise DataError(f"contamination report {report_path} has no task {task.name!r} (it checked "
                            f"{', '.join(report['tasks']) or 'none'}); run `distllm contamination` with {task.path}")
        if entry.get("sha256") != task.sha256 or entry.get("items") != len(task.items):
            raise DataError(f"contamination report {report_path} checked another version of {task.path} "
                            "(its sha256 differs); run `distllm contamination` again")
        out[task.name] = list(entry["clean_indices"])
    return out


def _write_eval(report: dict, path, tasks, out: str | None):
    import json
    import re
    from pathlib import Path

    from distllm.durable import write_durably

    if out is None:
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        names = re.sub(r"[^A-Za-z0-9_.+-]", "_", "+".join(t.name for t in tasks))[:80]
        out = run_dir / "eval" / f"tasks_step{report['step']:07d}_{names}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_durably(out, json.dumps(report, indent=1) + "\n")
    return out


def side_by_side(report: dict) -> str:
    """GPT-3 table C.1 form: each task's scores on the full set and on its clean subset."""
    lines = [f"{'task':<20} {'items':>6} {'acc':>15} {'acc_norm':>15}   {'clean items':>11} {'acc':>15} "
             f"{'acc_norm':>15}  {'dirty':>5}"]

    def pm(m, key):
        if m[key] is None:
            return "-"
        err = m[f"{key}_stderr"]
        return f"{m[key]:.4f}" + (f"±{err:.4f}" if err is not None else "")

    for name, m in report["tasks"].items():
        row = f"{name:<20} {m['items']:>6} {pm(m, 'acc'):>15} {pm(m, 'acc_norm'):>15}"
        if "clean" in m:
            c = m["clean"]
            row += f"   {c['items']:>11} {pm(c, 'acc'):>15} {pm(c, 'acc_norm'):>15}  {m['items'] - c['items']:>5}"
        lines.append(row)
    return "\n".join(lines)
