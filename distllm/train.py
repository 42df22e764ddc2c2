"""The training loop: one loop for every objective. Reads top to bottom: set up, decide on resume,
build, loop, clean up.

One optimizer step consumes one global batch (``BatchPlan``): every process runs ``accum``
micro-batches, and the engine (one process, DDP or DeepSpeed ZeRO; ``distributed.py``) syncs the
gradients once, on the last one. The loss is the step's summed token loss divided by the tokens that
count in the whole step, over every micro-batch and process (``objectives.py``), so accumulation and
the number of processes do not change it. Every decision that ends or pauses the loop (a signal, the
time limit, ``exit_at_step``, a periodic save, a non-finite gradient) is agreed by all ranks at a step
boundary (``decide``), so they always save at the same step and never wait for each other forever.
Whatever way ``train`` exits (return, user error, crash, Ctrl-C), the signal handlers are restored and
the logs, loader and progress bar closed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import shutil
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distllm import checkpoint, distributed, errors, faults, upload
from distllm.batch_plan import validation_micro_batch
from distllm.config import Config, parse_duration, redacted_dict, save_config
from distllm.data.loader import TokenShards, build_train_loader
from distllm.data.storage import storage_kwargs
from distllm.errors import CheckpointError, ConfigError, UserError
from distllm.eval.multiple_choice import score_tasks
from distllm.eval.tasks import load_tasks
from distllm.evaluate import ValidationSet, validation_metrics
from distllm.metrics import MetricsLogger
from distllm.model import Transformer, count_params, flops_per_token
from distllm.model.flops import mfu, peak_flops
from distllm.objectives import counted_tokens, next_token_objective
from distllm.optim import apply_config, build_optimizer, lr_at, set_lr
from distllm.preemption import StopRequest
from distllm.run_lock import RunLock
from distllm.tokenizer import load_tokenizer


logger = logging.getLogger(__name__)


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


class Task:
    """What one kind of training brings to the one loop; the rest (steps, normalisation, checkpoints,
    resume, signals, engines) is shared. This class is pretraining; ``distllm.sft.SFTTask`` and the
    distillation task override what differs:

    * ``build_data(cfg, rt, cleanup)`` -> (loader, val, tokenizer_file). The loader yields this rank's
      micro-batches of one world-size-independent global order (``next_batch()`` -> dict of tensors,
      ``last_indices``, ``fingerprint`` of its tokenizer, ``state_dict()`` / ``load_state_dict()`` at a
      step boundary, ``close()``); ``val`` is what ``validate`` reads; the tokenizer file goes into
      every checkpoint.
    * ``objective(model, batch)`` -> (loss_sum, metrics) (``objectives.py``).
    * ``init_model(cfg, rt, model, optimizer)``: a fresh run's starting point, after the engine's wrap
      (never called on resume); returns what to say in the first log line ("" = random initialisation).
    * ``validate(model, val, rt, step)`` -> metrics with ``val_loss`` (every rank calls it).
    * ``checkpoint_state()``: more JSON for each checkpoint's state.json; ``describe()``: a log line.
    """

    name = "train"

    def build_data(self, cfg: Config, rt, cleanup: contextlib.ExitStack):
        return build_data(cfg, rt, cleanup)

    def objective(self, model: torch.nn.Module, batch: dict):
        return next_token_objective(model, batch)

    def init_model(self, cfg: Config, rt, model, optimizer) -> str:
        return ""

    def validate(self, model, val, rt, step: int) -> dict:
        return validation_metrics(model, val, rt.device, rt)  # val_loss, val_ppl, val_bpb

    def checkpoint_state(self) -> dict:
        return {}

    def describe(self) -> str:
        return ""


def train(cfg: Config, task: Task | None = None) -> TrainResult:
    """Run ``task`` (default: pretraining): its data, its objective, the one loop."""
    task = task or Task()
    stop = StopRequest()  # from here on, SIGTERM / SIGUSR1 / SIGINT only set a flag
    with contextlib.ExitStack() as cleanup:  # runs on every exit: return, error, Ctrl-C
        cleanup.callback(stop.restore)
        return _train(cfg, task, stop, cleanup)


def _train(cfg: Config, task: Task, stop: StopRequest, cleanup: contextlib.ExitStack) -> TrainResult:
    # ---- runtime and the resume decision (made once, on rank 0, and broadcast)
    if cfg.train.debug:
        cfg = debug_config(cfg)
        cleanup.enter_context(distributed.debug_checks())
    rt = distributed.setup(cfg)
    run_dir = Path(cfg.run.dir) / "debug" if cfg.train.debug else Path(cfg.run.dir)
    on_main(rt, lambda: lock_run_dir(run_dir, cfg.run.lock_stale_minutes, cleanup))  # before anything is written
    resume_path = on_main(rt, lambda: decide_resume(cfg, run_dir))

    # ---- data, model and optimizer
    T = cfg.data.seq_len
    loader, val, tokenizer_file = task.build_data(cfg, rt, cleanup)
    if cfg.train.debug:
        loader = FirstBatchOnly(loader)  # one batch, over and over: the overfit check
    model, optimizer = build_model(cfg, rt)
    step, skipped_total, start = 0, 0, "from scratch"
    if resume_path is not None:
        state = checkpoint.load(rt, resume_path, model, optimizer, verify=cfg.checkpoint.verify)
        apply_config(optimizer, cfg.optim)  # the config's betas / eps / weight decay, not the saved ones
        if state["tokenizer_fingerprint"] != loader.fingerprint:
            raise UserError(f"checkpoint {resume_path} was trained with a different tokenizer than this run's "
                            f"({tokenizer_file})")
        loader.load_state_dict(state["data"])
        step, skipped_total = state["step"], state.get("skipped_steps", 0)
        start = f"resumed from {resume_path} at step {step}"
    else:
        start = task.init_model(cfg, rt, model, optimizer) or start  # e.g. SFT's sft.init_from weights

    # ---- logs and checkpoints
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    resume_step = step if resume_path is not None else None  # records after it are dropped from the logs
    log = MetricsLogger(run_dir, enabled=rt.is_main, logging=cfg.logging, config=cfg.to_dict(),
                        progress=cfg.logging.progress, total_steps=cfg.train.max_steps, start_step=step,
                        resume_step=resume_step, resumed_from=resume_path)  # console, jsonl, trackers
    cleanup.callback(log.close)
    on_main(rt, log.check_trackers)  # a required tracker that could not start stops every rank, before training
    trace = SampleTrace(run_dir, rt.rank, resume_step) if cfg.logging.trace_samples else None
    if trace is not None:
        cleanup.callback(trace.close)
    uploader = None  # checkpoint.upload_to: rank 0 copies each committed checkpoint in the background
    if rt.is_main and cfg.checkpoint.upload_to:
        uploader = upload.Uploader(cfg.checkpoint.upload_to, cfg.checkpoint.storage_options)
        cleanup.callback(uploader.close)  # the last checkpoint is uploaded before train returns
    saver = checkpoint.Checkpointer(rt, run_dir, cfg.checkpoint.keep_last, tokenizer_file=tokenizer_file,
                                    async_save=checkpoint.async_default(cfg.checkpoint.async_save, rt.device.type),
                                    report=log.print,  # "saved checkpoint ..." once committed
                                    on_commit=uploader.submit if uploader is not None else None)
    tokens_per_step = cfg.train.global_batch_size * T
    peak = cfg.logging.peak_flops or peak_flops(rt.device, rt.compute_dtype)  # None: an unknown GPU
    speed = Throughput(tokens_per_step, flops_per_token(cfg.model, T), peak and peak * rt.world_size)
    losses = LossLog(rt, log, cfg.train.spike_factor)
    log.print(
        f"model {count_params(cfg.model) / 1e6:.2f}M params | {rt.world_size} process(es) on {rt.device.type}, "
        f"{rt.describe(model)} | {rt.plan.describe()} | seq {T} | {start}"
    )
    if line := task.describe():
        log.print(line)
    if resume_path is not None:
        log.log({"step": step, "event": "resume", "checkpoint": str(resume_path)})

    def save(at_step: int) -> Path:
        state = {"data": loader.state_dict(), "tokenizer_fingerprint": loader.fingerprint,
                 "config": redacted_dict(cfg), "trackers": log.tracker_state(),  # tracker run ids, for resuming
                 "tokens_seen": at_step * tokens_per_step, "skipped_steps": skipped_total, **task.checkpoint_state()}
        return saver.save(at_step, model, optimizer, state)  # committed now, or at a later boundary if async

    tasks = load_tasks(cfg.train.eval_tasks) if cfg.train.eval_tasks else []  # a bad line is an error now
    tokenizer = load_tokenizer(tokenizer_file) if tasks else None

    def evaluate(at_step: int) -> float:
        metrics = task.validate(model, val, rt, at_step)  # val_loss, val_ppl, ...
        log.log({"step": at_step, **metrics})
        if tasks:  # every rank scores its share of the items; eval/<task>/acc, acc_norm and their stderr
            log.log({"step": at_step, **score_tasks(model, tasks, tokenizer, rt, rt.device)})
        return metrics["val_loss"]

    # ---- the loop
    model.train()
    deadline = time.monotonic() + parse_duration(cfg.train.time_limit) if cfg.train.time_limit else None
    if step == 0 and cfg.train.eval_every:
        evaluate(0)  # the untrained model's validation loss, as a baseline in metrics.jsonl
    val_loss, ckpt_path, boundary, skipped_in_a_row = float("nan"), None, Boundary(), 0
    speed.start()
    while step < cfg.train.max_steps:
        # one optimizer step over the plan's micro-batches
        lr = lr_at(step, cfg.optim, cfg.train.max_steps)
        set_lr(optimizer, lr)
        batches, indices = [], []
        for _ in range(rt.accum):
            batches.append({k: v.to(rt.device, non_blocking=True) for k, v in loader.next_batch().items()})
            indices.append(loader.last_indices)
        step_tokens = rt.sum(sum(counted_tokens(b) for b in batches))  # the step's counted tokens, every rank
        step_loss, step_parts = torch.zeros((), device=rt.device), {}
        for batch in batches:
            with rt.accumulate(model):
                loss_sum, parts = task.objective(model, batch)  # parts: the objective's own sums, logged like the loss
                if faults.trigger("loss", rank=rt.rank, step=step + 1):
                    loss_sum = loss_sum * float("inf")
                rt.backward(loss_sum, step_tokens)
            step_loss += loss_sum.detach()
            for name, value in parts.items():
                step_parts[name] = step_parts.get(name, 0.0) + value.detach().float()
        grad_norm, applied = rt.optimizer_step(model, optimizer, cfg.optim.grad_clip)
        step_samples = np.concatenate(indices)  # this rank's global sample indices of the step
        step += 1
        speed.step()
        log.advance()

        # what the step left: a skipped step, or one more loss to log
        if applied:
            skipped_in_a_row = 0
            losses.add(step, lr, step_loss, step_tokens, grad_norm, step_samples, step_parts)
        else:  # a non-finite gradient on some rank: every rank skipped this step
            skipped_total, skipped_in_a_row = skipped_total + 1, skipped_in_a_row + 1
            check_nonfinite(rt, log, cfg, step, step_loss / step_tokens, grad_norm, skipped_in_a_row, run_dir)
        if trace is not None:
            trace.write(step, step_samples)
        faults.trigger("step", rank=rt.rank, step=step)
        if losses.pending and (step % cfg.logging.log_every == 0 or step == cfg.train.max_steps):
            losses.flush(speed)

        # ---- step boundary: every rank agrees on what happens next
        saver.poll()
        boundary = decide(rt, cfg, step, stop, speed, saver, deadline)
        with speed.paused():  # evaluation and saving do not count against throughput
            if boundary.evaluate:
                val_loss = evaluate(step)
            if boundary.save:
                ckpt_path = save(step)
        if boundary.stop:
            ckpt_path = saver.wait() or ckpt_path
            log.print(f"stopping at step {step} for {boundary.stop}: saved {ckpt_path}; run the same command to resume")
            break

    # ---- the end
    ckpt_path = saver.wait() or ckpt_path
    if cfg.train.debug:
        overfit_check(log, first_loss=losses.first, last_loss=losses.last, steps=step)
    elif ckpt_path is None and step >= cfg.train.max_steps:  # resumed at (or past) max_steps: nothing to train
        ckpt_path = resume_path
        log.print(f"already at step {step} >= train.max_steps; nothing to train")
    rt.barrier()
    return TrainResult(step=step, loss=losses.last, val_loss=val_loss, checkpoint=ckpt_path, is_main=rt.is_main,
                       stopped=boundary.stop, exit_code=boundary.exit_code)


# ---------------------------------------------------------------------------- building


def build_data(cfg: Config, rt, cleanup: contextlib.ExitStack):
    """(this rank's training batches, the validation set, the local tokenizer file): one global sample
    order for any number of processes, this rank's slice of every global batch."""
    loader = build_train_loader(cfg.data, rt.plan, seed=cfg.train.seed, rank=rt.rank,
                                vocab_limit=cfg.model.vocab_size,  # data of a larger vocabulary is refused
                                pin_memory=rt.device.type == "cuda")
    cleanup.callback(loader.close)
    val_split = TokenShards(cfg.data.dir, "val", storage=storage_kwargs(cfg.data))
    cleanup.callback(val_split.close)
    val = ValidationSet(val_split, cfg.data.seq_len,
                        validation_micro_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size),
                        cfg.train.eval_batches, rt.rank, rt.world_size, cfg.data.document_mask)
    return loader, val, val_split.tokenizer_path  # the tokenizer: copied into every checkpoint


def build_model(cfg: Config, rt):
    """The model and its optimizer: the same initialisation on every rank, then the engine's wrap."""
    torch.manual_seed(cfg.train.seed)
    with rt.init_context():  # ZeRO-3: parameters are partitioned as they are created
        model = Transformer(cfg.model)
    if rt.zero_stage != 3:
        model = model.to(rt.device)
    seed_everything(cfg.train.seed + rt.rank)  # rank-dependent streams only from here on
    optimizer = build_optimizer(model, cfg.optim, rt.device.type)
    return rt.parallelize(model, optimizer, cfg.train)


# ---------------------------------------------------------------------------- the step boundary


@dataclass
class Boundary:
    """What happens after a step, the same on every rank."""

    evaluate: bool = False
    save: bool = False
    stop: str = ""  # why the run stops now ("" = it goes on)
    exit_code: int = 0


def decide(rt, cfg: Config, step: int, stop: StopRequest, speed: "Throughput", saver, deadline: float | None) -> Boundary:
    """Evaluate? save? stop (a signal, the time limit, ``exit_at_step``, the last step)? One small
    all-reduce makes every rank take the same decision, whatever it alone saw."""
    now = time.monotonic()
    time_up = deadline is not None and now + 2 * speed.slowest + saver.exit_seconds + 5 >= deadline
    periodic = cfg.checkpoint.every_minutes > 0 and now - saver.last_time >= 60 * cfg.checkpoint.every_minutes
    sigint, signalled, time_up, periodic = rt.any(stop.signum == signal.SIGINT, stop.requested, time_up and rt.is_main,
                                                  periodic and rt.is_main)
    last = step == cfg.train.max_steps
    exit_now = step == cfg.train.exit_at_step
    reason = ("interrupted (SIGINT)" if sigint else "a stop signal" if signalled
              else "train.time_limit" if time_up else "train.exit_at_step" if exit_now else "")
    every = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
    return Boundary(
        evaluate=bool(cfg.train.eval_every and step % cfg.train.eval_every == 0) or last,
        save=not cfg.train.debug and bool(last or reason or periodic or every),
        stop=reason,
        exit_code=130 if sigint else 0,
    )


class Throughput:
    """Tokens/s and MFU of the training steps alone (evaluation and saving are paused out), and the
    slowest step (the time-limit margin)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        self.slowest = 0.0

    def start(self) -> None:
        self.timer, self.steps, self.excluded = time.perf_counter(), 0, 0.0
        self.step_start = time.monotonic()

    def step(self) -> None:
        now = time.monotonic()
        self.slowest = max(self.slowest, now - self.step_start)
        self.step_start = now
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0
            self.step_start = time.monotonic()  # the next step starts now

    def report(self) -> dict:
        """Throughput since the last report, and start a new interval."""
        tokens_per_s = self.steps * self.tokens_per_step / max(time.perf_counter() - self.timer - self.excluded, 1e-9)
        self.timer, self.steps, self.excluded = time.perf_counter(), 0, 0.0
        return {"tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak)}


class LossLog:
    """Step losses (and the objective's parts, e.g. distillation's divergence and ce) kept on the device until
    a logging step (one all-reduce for many steps, no host sync per step), then logged with the spike check."""

    def __init__(self, rt, log: MetricsLogger, spike_factor: float):
        self.rt, self.log, self.spike_factor = rt, log, spike_factor
        self.pending: list[tuple[int, float, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]] = []
        self.parts: list[dict[str, torch.Tensor]] = []  # per pending step: the objective's sums by name
        self.recent: deque = deque(maxlen=50)  # recent step losses, for spike detection
        self.first: float | None = None
        self.last = float("nan")

    def add(self, step: int, lr: float, loss_sum: torch.Tensor, tokens: torch.Tensor, grad_norm: torch.Tensor,
            samples: np.ndarray, parts: dict[str, torch.Tensor] | None = None) -> None:
        self.pending.append((step, lr, loss_sum, tokens, grad_norm, samples))
        self.parts.append(parts or {})

    def flush(self, speed: Throughput) -> None:
        sums = self.rt.sum(torch.stack([p[2] for p in self.pending]))  # the logging sync, not every step
        counts = torch.stack([p[3] for p in self.pending]).to(sums)
        values = (sums / counts).tolist()
        for (s, _, _, _, _, ids), value in zip(self.pending, values):
            check_spike(self.rt, self.log, self.recent, self.spike_factor, s, value, ids)
        self.first = values[0] if self.first is None else self.first
        self.last = sum(values) / len(values)
        s, lr, _, tokens, norm, _ = self.pending[-1]
        self.log.log({"step": s, "loss": self.last, **self.part_means(counts), "lr": lr, "grad_norm": float(norm),
                      **speed.report(), "tokens": s * speed.tokens_per_step})
        self.pending.clear()
        self.parts.clear()

    def part_means(self, counts: torch.Tensor) -> dict[str, float]:
        """The objective's parts per counted token, averaged over the pending steps like the loss."""
        names = sorted(self.parts[0]) if self.parts else []
        if not names:
            return {}
        sums = self.rt.sum(torch.stack([torch.stack([p[n] for n in names]) for p in self.parts]))  # (steps, parts)
        return dict(zip(names, (sums / counts[:, None]).mean(0).tolist()))


def check_nonfinite(rt, log: MetricsLogger, cfg: Config, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
                    skipped_in_a_row: int, run_dir: Path) -> None:
    """A skipped step is logged; ``train.on_nonfinite: halt`` (or too many skips in a row) stops the run."""
    loss_value = rt.sum(loss.reshape(1)).item()
    log.log({"step": step, "skipped": True, "loss": loss_value, "grad_norm": float(grad_norm)})
    if cfg.train.on_nonfinite == "halt" or skipped_in_a_row > cfg.train.max_skipped_steps:
        why = ("train.on_nonfinite is 'halt'" if cfg.train.on_nonfinite == "halt"
               else f"{skipped_in_a_row} consecutive steps were skipped")
        what = "loss" if not math.isfinite(loss_value) else "gradient (the loss was finite)"
        raise NonFiniteLossError(
            f"non-finite {what} at step {step}; the optimizer step was skipped and {why}. "
            f"Last good checkpoint: {checkpoint.latest(run_dir)}. Lower optim.lr or raise optim.warmup_steps"
        )


def check_spike(rt, log, recent: deque, factor: float, step: int, loss: float, ids: np.ndarray) -> None:
    """Log a loss spike (above ``factor`` x the mean of the recent steps, from the second step on) with the
    global sample indices of its batch (gathered from every rank)."""
    if factor and recent and math.isfinite(loss):
        mean = sum(recent) / len(recent)
        if loss > factor * mean:  # the same decision on every rank: the losses are all-reduced
            samples = sorted(int(i) for part in rt.gather_object(ids.tolist()) for i in part)
            log.log({"step": step, "loss_spike": loss, "recent_mean": mean, "samples": samples})
    recent.append(loss)


# ---------------------------------------------------------------------------- resume


SHAPE_KEYS = ("model", "data.seq_len")


def lock_run_dir(run_dir: Path, stale_minutes: float, cleanup: contextlib.ExitStack) -> None:
    """Rank 0: hold ``run_dir/run.lock`` until ``train`` exits; a second run into ``run_dir`` is refused
    (RunDirLocked, a user error every rank raises through ``on_main``). See distllm/run_lock.py."""
    lock = cleanup.enter_context(RunLock(run_dir, stale_minutes))
    if lock.took_over:
        logger.warning(lock.took_over)


def decide_resume(cfg: Config, run_dir: Path) -> Path | None:
    """Rank 0, holding the run directory's lock: which committed checkpoint to continue from (None = a fresh
    run); clean up crashed saves and set aside checkpoints that do not verify (one line each).
    A debug run (``run_dir`` = RUN_DIR/debug) always starts over in its own directory."""
    if cfg.train.debug:
        for p in run_dir.iterdir():  # all but the lock this run holds
            if p.name != RunLock.NAME:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return None
    checkpoint.remove_leftovers(run_dir)
    for old, new, why in checkpoint.set_aside_unverified(run_dir):
        logger.warning(f"skipped checkpoint {old}: {why}; renamed to {new.name} for inspection (not loaded, not "
                       "counted by checkpoint.keep_last; delete it to free the space)")
    spec = cfg.checkpoint.resume_from
    path = (upload.resume_source(spec, run_dir, cfg.checkpoint.storage_options) if upload.is_url(spec)
            else checkpoint.resolve(spec, run_dir))
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
    newer = [p for p in checkpoint.complete_checkpoints(run_dir) if p != path and step_after(p, path)]
    if newer:  # its saves would meet them: never report a save that a checkpoint of the old line holds
        raise CheckpointError(
            f"checkpoint.resume_from={cfg.checkpoint.resume_from} goes back to {path.name}, but {run_dir} has newer "
            f"checkpoints ({', '.join(p.name for p in newer)}) that this run's saves would collide with; move them "
            f"away, or continue in a new --run.dir with --checkpoint.resume_from={path.resolve()}"
        )
    saved = checkpoint.read_state(path).get("config", {})
    differ = config_differences(saved, cfg.to_dict(), SHAPE_KEYS)
    if differ:
        raise ConfigError(
            f"checkpoint {path} was trained with a different model or data shape: "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in differ[:6])
            + "; use the same settings or a new --run.dir"
        )
    return path


def step_after(a: Path, b: Path) -> bool:
    """Is checkpoint ``a`` of a later step than checkpoint ``b`` (by their manifests' or names' step)?"""
    def step(p):
        return checkpoint.read_marker(p).get("step", checkpoint.step_of(p))

    return (step(a) or 0) > (step(b) or 0)


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
    """Run ``fn`` on rank 0 only and hand its result (or its user error, of the same class) to every rank."""
    result, error = None, None
    if rt.is_main:
        try:
            result = fn()
        except UserError as e:
            error = (type(e).__name__, str(e))
    result, error = rt.broadcast_object((result, error))
    if error is not None:
        kind = getattr(errors, error[0], None)
        raise (kind if isinstance(kind, type) and issubclass(kind, UserError) else UserError)(error[1])
    return result


# ---------------------------------------------------------------------------- debug mode


DEBUG_STEPS = 40


def debug_config(cfg: Config) -> Config:
    """``train.debug``: the same loop on one small batch, trained on again and again (a model that cannot
    overfit one batch has a bug), nothing compiled, nothing saved, nothing resumed; logs go to
    RUN_DIR/debug, which each debug run starts afresh."""
    cfg = copy.deepcopy(cfg)
    t = cfg.train
    t.micro_batch_size = t.global_batch_size = min(t.micro_batch_size or 4, t.global_batch_size, 4)
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
        self.fingerprint = loader.fingerprint

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.batch is None:
            self.batch = self.loader.next_batch()
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


# ---------------------------------------------------------------------------- audit trail


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
