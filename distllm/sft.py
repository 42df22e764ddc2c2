"""``distllm sft``: instruction fine-tuning as a task of the one training loop (``train.Task``).

What differs from pretraining, and nothing else:

* data: the conversations of ``sft.data`` rendered by the chat template, split by content hash,
  tokenized with the response mask and packed (``data/sft.py``), walked in the same global sample
  order as pretraining (``data/sft_loader.py``); the labels are -100 outside the responses, so the
  shared next-token objective and the loop's per-step normalisation give the response-only loss;
* start: ``sft.init_from``'s weights (a checkpoint, or a run's newest one), loaded into whatever
  engine wraps the model; the optimizer, schedule and step start afresh. A base model of another
  shape (the model section) or tokenizer is refused before anything is built, with one line;
* validation: the response-only loss on the held-out rows (``val_loss``), and greedy answers to the
  held-out prompts in ``RUN_DIR/answers/step_NNNNNN.jsonl`` (prompt, reference, answer);
* checkpoints: the tokenizer and the chat template (``state.json``'s ``chat_template``), so that
  ``eval``, ``generate --chat`` and ``export`` work on the SFT run.

Auto-resume, signals, ``exit_at_step``, the launchers and every engine are the loop's own.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from distllm import checkpoint
from distllm.batch_plan import validation_micro_batch
from distllm.chat import ChatTemplate, load_chat_template
from distllm.config import Config, check_vocab
from distllm.data.sft import SFTData, SFTDataset, build_sft_data
from distllm.data.sft_loader import SFTLoader
from distllm.data.shards import TOKENIZER_FILE
from distllm.durable import write_durably
from distllm.evaluate import rank_batches
from distllm.errors import ConfigError
from distllm.generate import chat_generate
from distllm.metrics import perplexity
from distllm.tokenizer import eot_id, fingerprint, load_tokenizer
from distllm.train import Task, TrainResult, config_differences, train


def run_sft(cfg: Config) -> TrainResult:
    """``distllm sft``: the training loop with the SFT task."""
    return train(cfg, task=SFTTask())


class SFTTask(Task):
    name = "sft"

    def __init__(self):
        self.base: Path | None = None  # the resolved sft.init_from checkpoint
        self.template: ChatTemplate | None = None
        self.data: SFTData | None = None

    # ---- data: checked against the base model first
    def build_data(self, cfg: Config, rt, cleanup: contextlib.ExitStack):
        s = cfg.sft
        base_state = None
        if s.init_from is not None:
            self.base = checkpoint.locate(s.init_from)
            base_state = checkpoint.read_state(self.base)
            check_base_shape(cfg, self.base, base_state)
        tok_file = tokenizer_file(cfg, self.base)
        tok = load_tokenizer(tok_file)
        fp = fingerprint(tok)
        if base_state is not None and base_state.get("tokenizer_fingerprint") != fp:
            raise ConfigError(
                f"sft.init_from {self.base} was trained with another tokenizer ({base_state.get('tokenizer_fingerprint', '?')[:12]}) "
                f"than {tok_file} ({fp[:12]}); fine-tune with the tokenizer the base model was trained with "
                "(leave tokenizer.path unset to use the checkpoint's own)"
            )
        check_vocab(cfg.model.vocab_size, tok.get_vocab_size(), tok_file)
        self.template = load_chat_template(s.chat_template)
        self.data = build_sft_data(s.data, tok, self.template, cfg.data.seq_len, s.packing, s.overlong,
                                   s.val_fraction, s.max_examples, s.eval_prompts)
        loader = SFTLoader(self.data.train, rt.plan, cfg.train.seed, rt.rank, s.data, fp,
                           pin_memory=rt.device.type == "cuda")
        run_dir = Path(cfg.run.dir) / "debug" if cfg.train.debug else Path(cfg.run.dir)
        val = SFTValidation(self.data, validation_micro_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size),
                            cfg.train.eval_batches, rt.rank, rt.world_size, tok, self.template, s.max_new_tokens,
                            run_dir)
        return loader, val, tok_file

    # ---- start: the base model's weights into the wrapped model, a fresh optimizer
    def init_model(self, cfg: Config, rt, model, optimizer) -> str:
        if self.base is None:
            return ""
        load_base_weights(rt, model, optimizer, self.base, verify=cfg.checkpoint.verify)
        return f"initialised from {self.base} (weights only)"

    def validate(self, model, val: "SFTValidation", rt, step: int) -> dict:
        return val.run(model, rt, step)

    def checkpoint_state(self) -> dict:
        return {"chat_template": self.template.source, "init_from": str(self.base) if self.base else None}

    def describe(self) -> str:
        tr, va = self.data.train.stats(), self.data.val.stats()
        return (f"sft data: train {tr['examples']} examples ({tr['truncated']} truncated, {tr['dropped']} dropped) in "
                f"{tr['rows']} sequences, {tr['response_tokens']} response tokens, {tr['fill']:.0%} filled | "
                f"val {va['examples']} examples ({va['truncated']} truncated, {va['dropped']} dropped) in "
                f"{va['rows']} sequences | {len(self.data.prompts)} held-out prompts answered at each evaluation")


# ---------------------------------------------------------------------------- the base model


def check_base_shape(cfg: Config, path: Path, state: dict) -> None:
    """The model section must describe the base model: one line naming every differing key."""
    differ = config_differences(state.get("config", {}), cfg.to_dict(), ("model",))
    if differ:
        raise ConfigError(
            f"sft.init_from {path} is a model of another shape: "
            + ", ".join(f"{k} {b!r} here, {a!r} there" for k, a, b in differ[:6])
            + "; copy the model section of the base model's config"
        )


def tokenizer_file(cfg: Config, base: Path | None) -> Path:
    """``tokenizer.path`` if set, else the base checkpoint's tokenizer.json, else ``data.dir``'s."""
    if cfg.tokenizer.path is not None:
        path = Path(cfg.tokenizer.path).expanduser()
        what = "tokenizer.path"
    elif base is not None:
        path, what = base / TOKENIZER_FILE, f"sft.init_from {base}"
    else:
        from distllm.data.storage import store_from_config

        path, what = store_from_config(cfg.data).local_path(TOKENIZER_FILE), f"data.dir {cfg.data.dir}"
    if not Path(path).is_file():
        raise ConfigError(f"no tokenizer: {path} ({what}) does not exist; set tokenizer.path")
    return Path(path)


def load_base_weights(rt, model, optimizer, path: Path, verify: bool = True) -> None:
    """The checkpoint's weights into the engine's model (one process, DDP or ZeRO-1/2/3); the optimizer's
    moments are left empty (its state starts afresh). Every rank calls it."""
    checkpoint.load(rt, path, model, optimizer, verify=verify, weights_only=True)


# ---------------------------------------------------------------------------- validation


class SFTValidation:
    """The response-only loss on the first ``eval_batches x micro_batch`` held-out rows (rank r takes rows
    r, r + N, ...: the same rows for any number of processes; every rank runs the same number of forward
    passes, which ZeRO-3 needs), and greedy answers to the held-out prompts."""

    def __init__(self, data: SFTData, micro_batch: int, eval_batches: int, rank: int, world_size: int, tok,
                 template: ChatTemplate, max_new_tokens: int, run_dir: Path):
        self.rows: SFTDataset = data.val
        self.prompts = data.prompts
        self.num_rows = min(eval_batches * micro_batch, self.rows.num_samples)
        self.batch_size, self.world_size = micro_batch, world_size
        self.tok, self.template, self.max_new_tokens = tok, template, max_new_tokens
        self.rank, self.run_dir = rank, run_dir
        self.eos = eot_id(tok)

    @torch.no_grad()
    def loss(self, model, rt) -> dict:
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # (summed nats, response tokens)
        for ids, real in rank_batches(self.num_rows, self.batch_size, self.rank, self.world_size):
            weight = float(real > 0)  # 0: a padding pass
            batch = {k: torch.from_numpy(v).to(rt.device) for k, v in self.rows.read(ids).items()}
            loss_sum = model(batch["input_ids"], doc_ids=batch["doc_ids"], labels=batch["labels"])
            total[0] += weight * loss_sum.double()
            total[1] += weight * (batch["labels"] != -100).sum()
        model.train(was_training)
        nats, count = rt.sum(total).tolist()
        loss = nats / count
        return {"val_loss": loss, "val_ppl": perplexity(loss), "val_response_tokens": int(count)}

    def answers(self, model, rt, step: int) -> Path | None:
        """Greedy answers to the held-out prompts -> ``answers/step_NNNNNN.jsonl`` (written by rank 0). Every
        rank generates them all (the same tokens: greedy on the same weights), so ZeRO-3's gathers match."""
        if not self.prompts:
            return None
        module = rt.unwrap(model)
        lines = []
        for p in self.prompts:
            reply, new = chat_generate(module, self.tok, self.template, p.messages, self.max_new_tokens)
            lines.append({"prompt": p.messages[-1]["content"], "reference": p.reference, "answer": reply,
                          "stopped": self.eos in new, "new_tokens": len(new), "messages": p.messages, "where": p.where})
        if self.rank != 0:
            return None
        path = self.run_dir / "answers" / f"step_{step:06d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        return path

    def run(self, model, rt, step: int) -> dict:
        metrics = self.loss(model, rt)
        self.answers(model, rt, step)
        return metrics
