"""``distllm distill``: a student trained on a teacher's distribution, in the one training loop.

The student is ``model`` of the config, trained by ``train.train`` exactly as ``distllm train`` trains
(checkpoints, resume, signals, engines, metrics); only the objective differs (``DistillTask``):

    loss = alpha * T**2 * D(teacher_T, student_T) + (1 - alpha) * cross-entropy     (distill.py)

summed over the counted tokens (labels != -100: every token of pretraining data, the response tokens of
SFT data) and normalised by the loop like any objective. ``divergence`` and ``ce`` (the two parts, per
counted token) are logged next to ``loss``.

Online (``distill.teacher``): the teacher (``teacher.py``) scores the same micro-batch without gradients
before the student's forward. Offline (``distill.topk_dir``): ``distllm distill-topk`` runs the teacher
once over the samples training will read -- the loader's global order (seed, global batch, data) for
``train.max_steps`` steps -- and stores its top-k log-probabilities at temperature T by stream position
(``data/topk.py``); training reads position ``step * G + j`` of the global batch next to the tokens
(``TopKBatches``), so any number of processes reads the same teacher rows, and the teacher is never in
memory. The loss is then taken between the k + 1 outcome distributions (the top k, "the rest"). A top-k
directory written for other data, tokenizer, seq_len, seed, batch or temperature is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from distllm.distill import linear_distill_loss, teacher_topk
from distllm.errors import ConfigError
from distllm.train import Task


def run_distill(cfg) -> "TrainResult":
    """``distllm distill``: the training loop with the distillation task, on token shards or SFT data."""
    from distllm.train import train

    base = None
    if cfg.distill.data == "sft":
        from distllm.sft import SFTTask

        base = SFTTask()
    return train(cfg, task=DistillTask(cfg, base))


def order_id(loader, seed: int, global_batch: int) -> str:
    """Identity of the training loader's global sample order: its data, mixture, seed and global batch."""
    state = {"sources": [s.data_id for s in loader.sources], "weights": list(loader.weights), "seed": seed,
             "global_batch": global_batch}
    return "order:" + hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:24]


class DistillTask(Task):
    """Distillation on top of a data task (pretraining by default; SFT data works the same: its labels
    are -100 outside the responses, so only response tokens count)."""

    name = "distill"

    def __init__(self, cfg, base: Task | None = None, topk: int | None = None):
        """``topk``: online, restrict the teacher to its top-k plus the rest (what offline stores), for
        comparing the two modes."""
        self.cfg, self.d, self.base = cfg, cfg.distill, base or Task()
        self.teacher, self.reader, self.online_topk = None, None, topk
        if not self.d.teacher and not self.d.topk_dir:
            raise ConfigError("distill needs distill.teacher (a run, checkpoint or Hugging Face model directory) or "
                              "distill.topk_dir (top-k written by `distllm distill-topk`)")

    # ---- the loop's seam
    def build_data(self, cfg, rt, cleanup: contextlib.ExitStack):
        loader, val, tokenizer_file = self.base.build_data(cfg, rt, cleanup)
        if self.d.topk_dir and self.d.data != "tokens":
            raise ConfigError("distill.topk_dir (offline distillation) reads token shards; set distill.data=tokens or "
                              "run the teacher online (distill.teacher, no distill.topk_dir)")
        if self.d.topk_dir:  # offline: the teacher's rows come with the batches
            self.reader = open_topk(cfg, loader, self.d.topk_dir)
            loader = TopKBatches(loader, self.reader, rt.plan, rt.rank)
        else:
            from distllm.teacher import load_teacher

            self.teacher = load_teacher(self.d.teacher, rt, loader.fingerprint, cfg.model.vocab_size,
                                        str(tokenizer_file))
        self.world_size = rt.world_size
        return loader, val, tokenizer_file

    def init_model(self, cfg, rt, model, optimizer) -> str:
        return self.base.init_model(cfg, rt, model, optimizer)

    def validate(self, model, val, rt, step: int) -> dict:
        return self.base.validate(model, val, rt, step)  # the student's own loss: comparable with training alone

    def checkpoint_state(self) -> dict:
        return {**self.base.checkpoint_state(), "distill": {"teacher": self.d.teacher, "topk_dir": self.d.topk_dir}}

    def describe(self) -> str:
        d = self.d
        what = (self.teacher.describe(self.world_size) if self.teacher is not None
                else f"teacher top-{self.reader.k} from {d.topk_dir} (offline)")
        loss = f"{d.alpha:g} * T^2 * {d.divergence}" + (f"(beta {d.beta:g})" if d.divergence == "jsd" else "")
        line = f"distill: {what} | loss {loss} + {1 - d.alpha:g} * ce, T = {d.temperature:g}"
        return "\n".join(x for x in (self.base.describe(), line) if x)  # the data task's line (SFT's stats) first

    def objective(self, model: torch.nn.Module, batch: dict):
        return distill_objective(model, batch, self.d, self.teacher, self.online_topk)


def distill_objective(model: torch.nn.Module, batch: dict, d, teacher=None, online_topk: int | None = None):
    """(loss_sum, {"divergence": sum, "ce": sum}) of one micro-batch: the teacher's logits from ``teacher``
    (online; cut to its top ``online_topk`` if given) or its top-k rows in the batch (offline)."""
    ids, docs, labels = batch["input_ids"], batch.get("doc_ids"), batch["labels"]
    if teacher is not None:
        target = {"teacher_logits": teacher(ids, docs)}  # (B, T, V), no gradients
        if online_topk:
            top_ids, top_lp, tail = teacher_topk(target.pop("teacher_logits"), online_topk, d.temperature)
            target = {"teacher_topk_ids": top_ids, "teacher_topk_logprobs": top_lp, "teacher_topk_tail": tail}
    else:
        target = {k: batch[k] for k in ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_topk_tail")}
    parts = {}

    def head_loss(hidden, weight, flat_labels):  # inside the student's lm_head: no (B*T, V) student logits
        loss, sums = linear_distill_loss(hidden, weight, flat_labels, **target, kind=d.divergence, alpha=d.alpha,
                                         temperature=d.temperature, beta=d.beta)
        parts.update(divergence=sums["divergence_sum"], ce=sums["ce_sum"])
        return loss

    loss = model(ids, doc_ids=docs, labels=labels, head_loss=head_loss)
    return loss, parts


# --------------------------------------------------------------------------- offline: top-k by stream position


def topk_meta(cfg, loader, k: int, teacher: dict | None = None):
    from distllm.data.topk import TopKMeta

    return TopKMeta(k=k, temperature=cfg.distill.temperature, seq_len=cfg.data.seq_len,
                    num_samples=cfg.train.max_steps * cfg.train.global_batch_size,
                    data_id=order_id(loader, cfg.train.seed, cfg.train.global_batch_size),
                    tokenizer_fingerprint=loader.fingerprint, vocab_size=cfg.model.vocab_size, teacher=teacher)


def open_topk(cfg, loader, directory: str):
    """The top-k directory for this run's order; DataError (one line) when it was written for anything else."""
    from distllm.data.topk import TeacherTopK
    from distllm.errors import DataError

    want = topk_meta(cfg, loader, cfg.distill.k)
    reader = TeacherTopK(directory, verify=cfg.data.verify_shards, data_id=want.data_id, seq_len=want.seq_len,
                         temperature=want.temperature, tokenizer_fingerprint=want.tokenizer_fingerprint,
                         vocab_size=want.vocab_size, k=want.k)
    if reader.num_samples < want.num_samples:
        raise DataError(f"teacher top-k {directory} covers {reader.num_samples // cfg.train.global_batch_size} steps, "
                        f"this run trains {cfg.train.max_steps} (train.max_steps); write it with the run's max_steps")
    return reader


class TopKBatches:
    """The training loader with the teacher's top-k rows of each micro-batch added, read by stream position:
    micro-step m of rank r in the global batch starting at position p holds ``p + plan.positions(m, r)``."""

    def __init__(self, loader, reader, plan, rank: int):
        self.loader, self.reader, self.plan, self.rank = loader, reader, plan, rank
        self.fingerprint = loader.fingerprint
        self.base, self.micro = 0, 0  # stream position of the current global batch; micro-step in it

    def __getattr__(self, name):  # sources, weights, vocab_size, ... of the wrapped loader
        return getattr(self.loader, name)

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.loader.next_batch()
        s = self.plan.positions(self.micro, self.rank)
        positions = np.arange(self.base + s.start, self.base + s.stop)
        batch.update({k: torch.from_numpy(v) for k, v in self.reader.read(positions).items()})
        self.last_indices = self.loader.last_indices
        self.micro += 1
        if self.micro == self.plan.accum:
            self.base, self.micro = self.base + self.plan.global_batch, 0
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self.base, self.micro = int(state["samples_seen"]), 0

    def close(self) -> None:
        self.loader.close()


def write_topk(cfg, samples_per_shard: int = 256) -> Path:
    """``distllm distill-topk``: the teacher's top-k (k = distill.k, at distill.temperature) of every sample
    the run's ``train.max_steps`` steps read, in the loader's global order, into ``distill.topk_dir``.
    One process (the teacher on its device); the shards hold ids (uint16 for vocabularies up to 65,536) and
    fp32 log-probabilities: (2 + 4) * k + 4 bytes per token."""
    from distllm import distributed
    from distllm.batch_plan import BatchPlan
    from distllm.data.loader import build_train_loader
    from distllm.data.topk import TopKWriter
    from distllm.teacher import load_teacher

    d = cfg.distill
    if not d.teacher or not d.topk_dir:
        raise ConfigError("distill-topk needs distill.teacher (the model to run) and distill.topk_dir (where to write)")
    rt = distributed.local_runtime(cfg.train.device if cfg.train.device != "auto" else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
    G, T = cfg.train.global_batch_size, cfg.data.seq_len
    plan = BatchPlan.build(G, G, 1)  # the whole global batch at once: positions [step * G, (step + 1) * G)
    with contextlib.closing(build_train_loader(cfg.data, plan, seed=cfg.train.seed,
                                               vocab_limit=cfg.model.vocab_size)) as loader:
        tok = Path(cfg.data.dir) / "tokenizer.json"
        teacher = load_teacher(d.teacher, rt, loader.fingerprint, cfg.model.vocab_size, str(tok))
        meta = topk_meta(cfg, loader, d.k, {"source": teacher.source, "kind": teacher.kind})
        writer = TopKWriter(d.topk_dir, meta, samples_per_shard)
        micro = cfg.train.micro_batch_size or min(G, 16)
        t0 = time.perf_counter()
        for step in range(cfg.train.max_steps):
            batch = loader.next_batch()
            for a in range(0, G, micro):
                ids = batch["input_ids"][a : a + micro].to(rt.device)
                docs = batch.get("doc_ids")
                logits = teacher(ids, None if docs is None else docs[a : a + micro].to(rt.device))  # (b, T, V)
                top_ids, top_lp, tail = teacher_topk(logits, d.k, d.temperature)
                writer.write(top_ids.cpu().numpy(), top_lp.cpu().numpy(), tail.cpu().numpy())
        path = writer.close()
    print(f"wrote the teacher's top-{d.k} of {meta.num_samples:,} samples x {T} positions "
          f"({cfg.train.max_steps} steps of {G}) to {d.topk_dir} in {time.perf_counter() - t0:.1f} s")
    return path
