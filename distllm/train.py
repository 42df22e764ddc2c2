"""The training loop. Reads top to bottom: set up, build, (resume), loop, save.

One optimizer step consumes ``train.global_batch_size`` sequences: every process runs
``accum = global / (micro x processes)`` micro-batches of ``train.micro_batch_size`` and the
gradients are averaged once, on the last micro-batch.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distllm import checkpoint, distributed
from distllm.config import Config, check_vocab, save_config
from distllm.data.loader import BatchLoader, TokenShards
from distllm.errors import UserError
from distllm.evaluate import val_batches, validation_loss
from distllm.loss import next_token_loss
from distllm.metrics import MetricsLogger, perplexity
from distllm.model import count_params, flops_per_token
from distllm.model.flops import mfu, peak_flops
from distllm.optim import apply_config, build_optimizer, lr_at, set_lr


class NonFiniteLossError(UserError):
    """Training diverged (NaN / inf); no optimizer step was taken with the bad gradients."""


@dataclass
class TrainResult:
    step: int
    loss: float
    val_loss: float
    checkpoint: Path
    is_main: bool = True


def train(cfg: Config) -> TrainResult:
    # ---- runtime, config, run directory
    rt = distributed.setup(cfg.train)
    cfg.validate(world_size=rt.world_size)
    run_dir = Path(cfg.run.dir)
    resume_path = checkpoint.resolve(cfg.checkpoint.resume_from, run_dir)
    if resume_path is None and checkpoint.latest(run_dir) is not None:
        raise UserError(
            f"run directory {run_dir} already has checkpoints; continue it with "
            f"--checkpoint.resume_from=latest or start a new run with --run.dir=OTHER_DIR"
        )
    seed_everything(cfg.train.seed + rt.rank)

    # ---- data
    train_data = TokenShards(cfg.data.dir, "train")
    val_data = TokenShards(cfg.data.dir, "val")
    check_vocab(cfg, train_data.vocab_size)
    T, B = cfg.data.seq_len, cfg.train.micro_batch_size
    accum = cfg.train.global_batch_size // (B * rt.world_size)
    loader = BatchLoader(train_data, T, B, seed=cfg.train.seed, shuffle=True, rank=rt.rank, world_size=rt.world_size)
    n_val = val_batches(val_data, T, B, cfg.train.eval_batches, rt.rank, rt.world_size)

    # ---- model and optimizer (single-device code; distribution is applied by rt.parallelize)
    model = cfg.model.build().to(rt.device)
    optimizer = build_optimizer(model, cfg.optim, rt.device.type)
    step = 0
    if resume_path is not None:
        state = checkpoint.load(resume_path, model, optimizer, restore_rng=True)
        apply_config(optimizer, cfg.optim)  # the config's betas / eps / weight decay, not the saved ones
        if state["tokenizer_fingerprint"] != train_data.fingerprint:
            raise UserError(f"checkpoint {resume_path} was trained with a different tokenizer than {cfg.data.dir}")
        loader.load_state_dict(state["data"])
        step = state["step"]
    model, optimizer = rt.parallelize(model, optimizer, cfg.train)

    # ---- bookkeeping
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = MetricsLogger(run_dir, enabled=rt.is_main, tensorboard=cfg.logging.tensorboard,
                        progress=cfg.logging.progress, total_steps=cfg.train.max_steps, start_step=step,
                        append=resume_path is not None)
    tokens_per_step = cfg.train.global_batch_size * T
    flops_tok = flops_per_token(cfg.model, T)
    peak = cfg.logging.peak_flops or peak_flops(rt.device, rt.compute_dtype)
    log.print(
        f"model {count_params(cfg.model) / 1e6:.2f}M params | {rt.world_size} process(es) on {rt.device.type} "
        f"({rt.precision}) | global batch {cfg.train.global_batch_size} x {T} tokens = micro {B} x accum {accum} "
        f"x {rt.world_size} | " + (f"resumed from {resume_path} at step {step}" if resume_path else "from scratch")
    )

    def save(at_step: int) -> Path:
        state = {"data": loader.state_dict(), "tokenizer_fingerprint": train_data.fingerprint,
                 "config": cfg.to_dict(), "tokens_seen": at_step * tokens_per_step}
        if rt.is_main:  # data parallel: every rank holds the same weights and optimizer state
            checkpoint.save(run_dir, at_step, rt.unwrap(model), optimizer, state, cfg.checkpoint.keep_last)
            log.print(f"saved checkpoint {checkpoint.step_path(run_dir, at_step)}")
        rt.barrier()
        return checkpoint.step_path(run_dir, at_step)

    def evaluate(at_step: int) -> float:
        val = validation_loss(model, val_data, T, B, n_val, rt.device, rt.rank, rt.world_size)
        val = rt.mean(val).item()
        log.log({"step": at_step, "val_loss": val, "val_ppl": perplexity(val)})
        return val

    # ---- the loop
    model.train()
    if step == 0 and cfg.train.eval_every:
        evaluate(0)  # the untrained model's validation loss, as a baseline in metrics.jsonl
    loss_sum, loss_count = torch.zeros((), device=rt.device), 0
    loss_value, val_loss, ckpt_path = float("nan"), float("nan"), None
    timer, timed_steps, paused = time.perf_counter(), 0, 0.0  # throughput excludes evaluation and saving
    while step < cfg.train.max_steps:
        lr = lr_at(step, cfg.optim, cfg.train.max_steps)
        set_lr(optimizer, lr)
        step_loss = torch.zeros((), device=rt.device)
        for micro in range(accum):
            window = next(loader).to(rt.device, non_blocking=True)
            with rt.no_sync(model, sync=micro == accum - 1):
                loss = next_token_loss(model, window)
                rt.backward(loss / accum)
            step_loss += loss.detach() / accum
        grad_norm = rt.clip_grad_norm(model, cfg.optim.grad_clip)
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm at step {step + 1} (loss {rt.mean(step_loss).item():.4g}); the optimizer "
                f"step was skipped and nothing was saved. Last complete checkpoint: {checkpoint.latest(run_dir)}. "
                f"Lower optim.lr or raise optim.warmup_steps"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        timed_steps += 1
        loss_sum += step_loss
        loss_count += 1
        log.advance()

        if step % cfg.logging.log_every == 0 or step == cfg.train.max_steps:
            loss_value = rt.mean(loss_sum / loss_count).item()
            tokens_per_s = timed_steps * tokens_per_step / (time.perf_counter() - timer - paused)
            log.log({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, flops_tok, peak * rt.world_size),
                     "tokens": step * tokens_per_step})
            loss_sum.zero_()
            loss_count = 0
            timer, timed_steps, paused = time.perf_counter(), 0, 0.0
        pause_start = time.perf_counter()
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.max_steps:
            val_loss = evaluate(step)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.max_steps:
            ckpt_path = save(step)
        paused += time.perf_counter() - pause_start

    if ckpt_path is None:  # resumed at (or past) max_steps: nothing to train
        ckpt_path = resume_path
        log.print(f"already at step {step} >= train.max_steps; nothing to train")
    rt.barrier()
    log.close()
    return TrainResult(step=step, loss=loss_value, val_loss=val_loss, checkpoint=ckpt_path, is_main=rt.is_main)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
