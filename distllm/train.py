"""The training loop. Reads top to bottom: set up, decide on resume, build, loop, save.

One optimizer step consumes ``train.global_batch_size`` sequences: every process runs
``accum = global / (micro x processes)`` micro-batches of ``train.micro_batch_size``, and the
engine (one process, DDP or DeepSpeed ZeRO; see ``distributed.py``) syncs the gradients once, on
the last micro-batch. Every decision that ends or pauses the loop (a signal, the time limit, a
periodic save, a non-finite gradient) is agreed by all ranks at a step boundary, so they always
save at the same step and never wait for each other forever.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distllm import checkpoint, distributed, faults
from distllm.config import Config, parse_duration, save_config
from distllm.data.loader import TokenShards, build_train_loader
from distllm.data.storage import storage_kwargs
from distllm.errors import CheckpointError, ConfigError, UserError
from distllm.evaluate import ValidationSet, validation_metrics
from distllm.loss import next_token_loss
from distllm.metrics import MetricsLogger
from distllm.model import count_params, flops_per_token
from distllm.model.flops import mfu, peak_flops
from distllm.optim import apply_config, build_optimizer, lr_at, set_lr
from distllm.preemption import StopRequest


class NonFiniteLossError(UserError):
    """Training diverged (NaN / inf); no optimizer step was taken with the bad gradients."""


@dataclass
class TrainResult:
    step: int
    loss: float
    val_loss: float
    checkpoint: Path | None
    is_main: bool = True
    stopped: str = ""  # why the run ended before max_steps ("" = it reached max_steps)
    exit_code: int = 0


def train(cfg: Config) -> TrainResult:
    # ---- runtime and the resume decision (made once, on rank 0, and broadcast)
    stop = StopRequest()  # from here on, SIGTERM / SIGUSR1 / SIGINT only set a flag
    if cfg.train.debug:
        cfg = debug_config(cfg)
    rt = distributed.setup(cfg)
    run_dir = Path(cfg.run.dir)
    resume_path = on_main(rt, lambda: decide_resume(cfg, run_dir))
    deadline = time.monotonic() + parse_duration(cfg.train.time_limit) if cfg.train.time_limit else None

    # ---- data: one global sample order, this rank's slice of every global batch
    T, B = cfg.data.seq_len, cfg.train.micro_batch_size
    loader = build_train_loader(cfg.data, micro_batch_size=B, global_batch_size=cfg.train.global_batch_size,
                                seed=cfg.train.seed, rank=rt.rank, world_size=rt.world_size,
                                vocab_limit=cfg.model.vocab_size)  # data of a larger vocabulary is refused
    if cfg.train.debug:
        loader = FirstBatchOnly(loader)
    val_split = TokenShards(cfg.data.dir, "val", storage=storage_kwargs(cfg.data))
    val = ValidationSet(val_split, T, B, cfg.train.eval_batches, rt.rank, rt.world_size, cfg.data.document_mask)
    tokenizer_file = val_split.tokenizer_path  # copied into every checkpoint (a local copy for s3:// data)

    # ---- model and optimizer: the same initialisation on every rank, then the engine's wrap
    torch.manual_seed(cfg.train.seed)
    with rt.init_context():  # ZeRO-3: parameters are partitioned as they are created
        model = cfg.model.build()
    if rt.zero_stage != 3:
        model = model.to(rt.device)
    seed_everything(cfg.train.seed + rt.rank)  # rank-dependent streams only from here on
    optimizer = build_optimizer(model, cfg.optim, rt.device.type)
    model, optimizer = rt.parallelize(model, optimizer, cfg.train)
    step, skipped_total = 0, 0
    if resume_path is not None:
        state = checkpoint.load(rt, resume_path, model, optimizer, verify=cfg.checkpoint.verify)
        apply_config(optimizer, cfg.optim)  # the config's betas / eps / weight decay, not the saved ones
        if state["tokenizer_fingerprint"] != loader.fingerprint:
            raise UserError(f"checkpoint {resume_path} was trained with a different tokenizer than {cfg.data.dir}")
        loader.load_state_dict(state["data"])
        step, skipped_total = state["step"], state.get("skipped_steps", 0)

    # ---- bookkeeping
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    resume_step = step if resume_path is not None else None  # records after it are dropped from the logs
    log = MetricsLogger(run_dir, enabled=rt.is_main, tensorboard=cfg.logging.tensorboard,
                        progress=cfg.logging.progress, total_steps=cfg.train.max_steps, start_step=step,
                        resume_step=resume_step)
    trace = SampleTrace(run_dir, rt.rank, resume_step) if cfg.logging.trace_samples else None
    tokens_per_step = cfg.train.global_batch_size * T
    flops_tok = flops_per_token(cfg.model, T)
    peak = cfg.logging.peak_flops or peak_flops(rt.device, rt.compute_dtype)
    log.print(
        f"model {count_params(cfg.model) / 1e6:.2f}M params | {rt.world_size} process(es) on {rt.device.type}, "
        f"{rt.engine_name} ({rt.precision}) | global batch {cfg.train.global_batch_size} x {T} tokens = micro {B} "
        f"x accum {rt.accum} x {rt.world_size} | "
        + (f"resumed from {resume_path} at step {step}" if resume_path else "from scratch")
    )

    last_save = time.monotonic()
    save_seconds = 0.0

    def save(at_step: int) -> Path:
        nonlocal last_save, save_seconds
        t0 = time.monotonic()
        state = {"data": loader.state_dict(), "tokenizer_fingerprint": loader.fingerprint,
                 "config": cfg.to_dict(), "tokens_seen": at_step * tokens_per_step, "skipped_steps": skipped_total}
        path = checkpoint.save(rt, run_dir, at_step, model, optimizer, state, cfg.checkpoint.keep_last,
                               tokenizer_file=tokenizer_file)
        last_save, save_seconds = time.monotonic(), time.monotonic() - t0
        log.print(f"saved checkpoint {path} ({save_seconds:.1f} s)")
        return path

    def evaluate(at_step: int) -> float:
        metrics = validation_metrics(model, val, rt.device, rt)  # val_loss, val_ppl, val_bpb
        log.log({"step": at_step, **metrics})
        return metrics["val_loss"]

    # ---- the loop
    model.train()
    if step == 0 and cfg.train.eval_every:
        evaluate(0)  # the untrained model's validation loss, as a baseline in metrics.jsonl
    pending: list[tuple[int, float, torch.Tensor, torch.Tensor, np.ndarray]] = []  # logged lazily
    recent = deque(maxlen=50)  # recent step losses, for spike detection
    loss_value, val_loss, ckpt_path, stopped, exit_code = float("nan"), float("nan"), None, "", 0
    skipped_in_a_row, slowest_step, first_loss = 0, 0.0, None
    timer, timed_steps, paused = time.perf_counter(), 0, 0.0  # throughput excludes evaluation and saving
    while step < cfg.train.max_steps:
        t_step = time.monotonic()
        lr = lr_at(step, cfg.optim, cfg.train.max_steps)
        set_lr(optimizer, lr)
        step_loss = torch.zeros((), device=rt.device)
        indices = []
        for _ in range(rt.accum):
            window = next(loader).to(rt.device, non_blocking=True)
            indices.append(loader.last_indices)
            doc_ids = None
            if cfg.data.document_mask:  # attention stays inside each packed document
                doc_ids = torch.as_tensor(loader.last_doc_ids).to(rt.device, non_blocking=True)
            with rt.accumulate(model):
                loss = next_token_loss(model, window, doc_ids)
                if faults.trigger("loss", rank=rt.rank, step=step + 1):
                    loss = loss * float("inf")
                rt.backward(loss)
            step_loss += loss.detach() / rt.accum
        grad_norm, applied = rt.optimizer_step(model, optimizer, cfg.optim.grad_clip)
        step_samples = np.concatenate(indices)  # this rank's global sample indices of the step
        step += 1
        timed_steps += 1
        log.advance()
        if not applied:  # a non-finite gradient on some rank: every rank skipped this step
            skipped_total += 1
            skipped_in_a_row += 1
            log.log({"step": step, "skipped": True, "loss": rt.mean(step_loss).item(), "grad_norm": float(grad_norm)})
            if cfg.train.on_nonfinite == "halt" or skipped_in_a_row > cfg.train.max_skipped_steps:
                why = ("train.on_nonfinite is 'halt'" if cfg.train.on_nonfinite == "halt"
                       else f"{skipped_in_a_row} consecutive steps were skipped")
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {step}; the optimizer step was skipped and {why}. "
                    f"Last good checkpoint: {checkpoint.latest(run_dir)}. Lower optim.lr or raise optim.warmup_steps"
                )
        else:
            skipped_in_a_row = 0
            pending.append((step, lr, step_loss, grad_norm, step_samples))
        if trace is not None:
            trace.write(step, step_samples)
        faults.trigger("step", rank=rt.rank, step=step)
        slowest_step = max(slowest_step, time.monotonic() - t_step)

        if pending and (step % cfg.logging.log_every == 0 or step == cfg.train.max_steps):
            losses = rt.mean(torch.stack([p[2] for p in pending])).tolist()  # the logging sync, not every step
            for (s, _, _, _, ids), value in zip(pending, losses):
                check_spike(rt, log, recent, cfg.train.spike_factor, s, value, ids)
            loss_value = sum(losses) / len(losses)
            first_loss = losses[0] if first_loss is None else first_loss
            tokens_per_s = timed_steps * tokens_per_step / (time.perf_counter() - timer - paused)
            s, lr_last, _, norm, _ = pending[-1]
            log.log({"step": s, "loss": loss_value, "lr": lr_last, "grad_norm": float(norm),
                     "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, flops_tok, peak * rt.world_size),
                     "tokens": s * tokens_per_step})
            pending.clear()
            timer, timed_steps, paused = time.perf_counter(), 0, 0.0

        # ---- step boundary: every rank agrees on what happens next
        now = time.monotonic()
        time_up = deadline is not None and now + 2 * slowest_step + save_seconds + 5 >= deadline
        periodic = cfg.checkpoint.every_minutes > 0 and now - last_save >= 60 * cfg.checkpoint.every_minutes
        sigint, signalled, time_up, periodic = rt.any(stop.signum == signal.SIGINT, stop.requested, time_up and rt.is_main,
                                                      periodic and rt.is_main)
        last = step == cfg.train.max_steps
        exit_now = step == cfg.train.exit_at_step
        pause_start = time.perf_counter()
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or last:
            val_loss = evaluate(step)
        if not cfg.train.debug and (last or signalled or time_up or exit_now or periodic
                                    or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)):
            ckpt_path = save(step)
        paused += time.perf_counter() - pause_start
        if signalled or time_up or exit_now:
            stopped = ("interrupted (SIGINT)" if sigint else "a stop signal" if signalled
                       else "train.time_limit" if time_up else "train.exit_at_step")
            exit_code = 130 if sigint else 0
            log.print(f"stopping at step {step} for {stopped}: saved {ckpt_path}; run the same command to resume")
            break

    if cfg.train.debug:
        overfit_check(log, first_loss=first_loss, last_loss=loss_value, steps=step)
    elif ckpt_path is None and step >= cfg.train.max_steps:  # resumed at (or past) max_steps: nothing to train
        ckpt_path = resume_path
        log.print(f"already at step {step} >= train.max_steps; nothing to train")
    rt.barrier()
    log.close()
    if trace is not None:
        trace.close()
    loader.close()
    val_split.close()
    stop.restore()
    return TrainResult(step=step, loss=loss_value, val_loss=val_loss, checkpoint=ckpt_path, is_main=rt.is_main,
                       stopped=stopped, exit_code=exit_code)


# ---------------------------------------------------------------------------- helpers


SHAPE_KEYS = ("model", "data.seq_len")


def decide_resume(cfg: Config, run_dir: Path) -> Path | None:
    """Rank 0: which committed checkpoint to continue from (None = a fresh run); clean up crashed saves."""
    checkpoint.remove_leftovers(run_dir)
    path = checkpoint.resolve(cfg.checkpoint.resume_from, run_dir)
    if path is None:
        if checkpoint.latest(run_dir) is not None:
            raise UserError(
                f"run directory {run_dir} already has checkpoints and checkpoint.resume_from is null; continue it "
                f"with --checkpoint.resume_from=latest or start a new run with --run.dir=OTHER_DIR"
            )
        if (run_dir / "metrics.jsonl").exists():
            raise UserError(
                f"run directory {run_dir} holds metrics.jsonl of an earlier run but no committed checkpoint to "
                "continue from; use a new --run.dir (or delete the old directory)"
            )
        return None
    saved = checkpoint.read_state(path).get("config", {})
    differ = config_differences(saved, cfg.to_dict(), SHAPE_KEYS)
    if differ:
        raise ConfigError(
            f"checkpoint {path} was trained with a different model or data shape: "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in differ[:6])
            + "; use the same settings or a new --run.dir"
        )
    return path


def config_differences(saved: dict, current: dict, keys: tuple[str, ...]) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for every differing key under ``keys``."""
    out = []
    for key in keys:
        section, _, name = key.partition(".")
        a, b = saved.get(section, {}), current.get(section, {})
        if name:
            a, b = {name: a.get(name)}, {name: b.get(name)}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append((f"{section}.{k}", a.get(k), b.get(k)))
    return out


def on_main(rt, fn):
    """Run ``fn`` on rank 0 only and hand its result (or its user error) to every rank."""
    result, error = None, None
    if rt.is_main:
        try:
            result = fn()
        except UserError as e:
            error = (type(e).__name__, str(e))
    result, error = rt.broadcast_object((result, error))
    if error is not None:
        kind = {"ConfigError": ConfigError, "CheckpointError": CheckpointError}.get(error[0], UserError)
        raise kind(error[1])
    return result


def check_spike(rt, log, recent: deque, factor: float, step: int, loss: float, ids: np.ndarray) -> None:
    """Log a loss spike with the global sample indices of its batch (gathered from every rank)."""
    if factor and len(recent) >= 10 and math.isfinite(loss):
        mean = sum(recent) / len(recent)
        if loss > factor * mean:  # the same decision on every rank: the losses are all-reduced
            samples = sorted(int(i) for part in rt.gather_object(ids.tolist()) for i in part)
            log.log({"step": step, "loss_spike": loss, "recent_mean": mean, "samples": samples})
    recent.append(loss)


DEBUG_STEPS = 40


def debug_config(cfg: Config) -> Config:
    """``train.debug``: the same loop on one small batch, trained on again and again (a model that cannot
    overfit one batch has a bug), nothing compiled, nothing saved, nothing resumed."""
    import copy

    cfg = copy.deepcopy(cfg)
    t = cfg.train
    t.micro_batch_size = t.global_batch_size = min(t.micro_batch_size, 4)
    t.max_steps, t.compile, t.eval_every = DEBUG_STEPS, False, 0
    t.exit_at_step = None
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, t.max_steps // 4)
    cfg.checkpoint.resume_from, cfg.checkpoint.every, cfg.checkpoint.every_minutes = None, 0, 0.0
    cfg.logging.log_every = min(cfg.logging.log_every, 5)
    return cfg


class FirstBatchOnly:
    """The loader's first micro-batch, over and over (debug mode's overfit check)."""

    def __init__(self, loader):
        self.loader, self.batch = loader, None
        self.fingerprint, self.vocab_size = loader.fingerprint, loader.vocab_size

    def __next__(self) -> torch.Tensor:
        if self.batch is None:
            self.batch = next(self.loader)
            self.last_indices = self.loader.last_indices
        return self.batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def close(self) -> None:
        self.loader.close()


def overfit_check(log, first_loss: float | None, last_loss: float, steps: int) -> None:
    """Debug mode passes when the loss on the one repeated batch fell below 3/4 of its first value (a model that cannot fit one batch has a bug)."""
    if first_loss is None or not last_loss < 0.75 * first_loss:
        raise UserError(
            f"debug overfit check failed: the loss on one repeated batch went {first_loss} -> {last_loss} in "
            f"{steps} steps (expected below 3/4 of the first); check the data, the model and optim.lr"
        )
    log.print(f"debug overfit check passed: loss {first_loss:.4f} -> {last_loss:.4f} on one batch in {steps} steps")


class SampleTrace:
    """``run.dir/samples/rank<R>.jsonl``: {"step", "samples"} per step, the global sample indices this rank
    trained on. A resumed run drops the lines after its checkpoint, as metrics.jsonl does."""

    def __init__(self, run_dir: Path, rank: int, resume_step: int | None):
        from distllm.metrics import truncate_after

        path = run_dir / "samples" / f"rank{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            truncate_after(path, resume_step)
        self.file = open(path, "a" if resume_step is not None else "w", buffering=1)  # line-buffered

    def write(self, step: int, samples: np.ndarray) -> None:
        self.file.write(json.dumps({"step": step, "samples": samples.tolist()}) + "\n")

    def close(self) -> None:
        self.file.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
