import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distllm import checkpoint
from distllm.config import save_config
from distllm.errors import ConfigError, UserError
from distllm.train import train

REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_validation_loss(tiny_config):
    cfg = tiny_config
    cfg.train.max_steps = 60
    cfg.train.eval_every = 30
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_steps = 5
    result = train(cfg)
    run_dir = Path(cfg.run.dir)
    records = _records(run_dir)
    val = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in val] == [0, 30, 60]
    assert val[0]["val_loss"] == pytest.approx(6.24, abs=0.15)  # untrained: ~ln(512), uniform over the vocabulary
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.6, val  # measured: 6.23 -> 5.38 in 60 steps
    assert result.val_loss == pytest.approx(val[-1]["val_loss"])
    assert all(REQUIRED <= r.keys() for r in steps)
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] <= 1 for r in steps)
    assert steps[-1]["step"] == 60
    assert (run_dir / "config.yaml").is_file()
    assert result.checkpoint == checkpoint.latest(run_dir)
    assert result.checkpoint.name == "step_000060"


def _short_run_in_fresh_process(cfg, tmp_path, steps=30):
    """Train ``steps`` steps in a new process (Accelerate keeps one mixed-precision setting per
    process); return the first and last validation losses."""
    cfg.train.max_steps, cfg.train.eval_every = steps, steps
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 5
    save_config(cfg, tmp_path / "short.yaml")
    r = subprocess.run([sys.executable, "-m", "distllm", "train", str(tmp_path / "short.yaml")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    val = [r["val_loss"] for r in _records(Path(cfg.run.dir)) if "val_loss" in r]
    return val[0], val[-1]


@pytest.mark.gpu
def test_bf16_training_on_one_gpu(tiny_config, tmp_path):
    tiny_config.train.device, tiny_config.train.precision, tiny_config.train.compile = "cuda", "bf16", True
    before, after = _short_run_in_fresh_process(tiny_config, tmp_path)
    assert after < before - 0.3, (before, after)


def test_tensorboard_and_progress_bar(tiny_config, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_config.logging.tensorboard = tiny_config.logging.progress = True
    tiny_config.train.max_steps, tiny_config.train.eval_every, tiny_config.logging.log_every = 4, 2, 1
    train(tiny_config)
    assert "train: 4/4 step (100%)" in capsys.readouterr().err  # the progress line (stderr is not a terminal here)
    events = EventAccumulator(str(Path(tiny_config.run.dir) / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss"} <= tags, tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_resume_is_bit_exact(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.train.max_steps = 8
    cfg.train.eval_every = 0
    cfg.checkpoint.every = 4
    cfg.checkpoint.keep_last = 5
    straight = train(cfg)

    # a second run that only has the step-4 checkpoint of the first and continues it
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight.checkpoint.parent / "step_000004", resumed_dir / "checkpoints" / "step_000004")
    cfg.run.dir = str(resumed_dir)
    cfg.checkpoint.resume_from = "latest"
    resumed = train(cfg)
    assert resumed.step == 8
    a = load_file(straight.checkpoint / "model.safetensors")
    b = load_file(resumed.checkpoint / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((resumed.checkpoint / "state.json").read_text())["data"] == \
        json.loads((straight.checkpoint / "state.json").read_text())["data"]


def test_gradient_accumulation_matches_one_big_batch(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.train.max_steps = 3
    cfg.train.eval_every = 0
    cfg.logging.log_every = 1
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 4, 4
    big = train(cfg)
    cfg.run.dir = str(tmp_path / "accum")
    cfg.train.micro_batch_size = 2  # two micro-batches per step, same global batch
    small = train(cfg)
    a = [r for r in _records(big.checkpoint.parent.parent) if "loss" in r]
    b = [r for r in _records(small.checkpoint.parent.parent) if "loss" in r]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)
    # AdamW hides a wrongly scaled gradient in the loss curve; the gradient norm does not
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-4)


def test_gradient_clipping_takes_part_in_the_step(tiny_config, tmp_path):
    """optim.grad_clip below every gradient norm changes the training (AdamW ignores one constant scale of
    the gradients, not a different one each step); the logged norm is the one before clipping."""
    cfg = tiny_config
    cfg.train.max_steps, cfg.train.eval_every, cfg.logging.log_every = 5, 0, 1
    cfg.optim.lr = 3e-3
    runs = {}
    for clip in (0.0, 0.05):
        cfg.run.dir, cfg.optim.grad_clip = str(tmp_path / f"clip{clip}"), clip
        runs[clip] = [r for r in _records(train(cfg).checkpoint.parent.parent) if "lr" in r]
    free, clipped = runs[0.0], runs[0.05]
    assert min(r["grad_norm"] for r in free) > 0.05  # every step was clipped
    assert free[0]["loss"] == clipped[0]["loss"] and free[0]["grad_norm"] == clipped[0]["grad_norm"]
    # measured: the losses of steps 3-5 differ by 1.7e-6, 1.7e-4, 6.5e-4 (relative)
    assert abs(clipped[-1]["loss"] - free[-1]["loss"]) > 2e-4 * free[-1]["loss"], (free, clipped)


def test_existing_run_is_not_overwritten(tiny_config):
    cfg = tiny_config
    cfg.train.max_steps = 3
    cfg.train.eval_every = 0
    first = train(cfg)
    before = (first.checkpoint / "model.safetensors").read_bytes()
    cfg.checkpoint.resume_from = None  # explicitly a fresh run
    with pytest.raises(UserError, match="already has checkpoints"):
        train(cfg)
    assert (first.checkpoint / "model.safetensors").read_bytes() == before


def test_vocab_smaller_than_tokenizer_is_rejected(tiny_config):
    tiny_config.model.vocab_size = 256  # the prepared tokenizer has 512 tokens
    tiny_config.tokenizer.vocab_size = 256
    with pytest.raises(ConfigError, match="model.vocab_size"):
        train(tiny_config)


def test_divergence_stops_before_a_bad_step(tiny_config):
    from distllm.train import NonFiniteLossError

    cfg = tiny_config
    cfg.train.max_steps = 6
    cfg.train.eval_every = 0
    cfg.optim.warmup_steps = 0
    cfg.optim.lr = 1e30  # weights blow up after the first step, the next gradients are not finite
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step"):
        train(cfg)
    assert checkpoint.latest(cfg.run.dir) is None  # nothing poisoned was saved


def test_debug_mode_overfits_one_batch_and_saves_nothing(tiny_config, capsys):
    cfg = tiny_config
    cfg.train.debug = True
    result = train(cfg)
    assert result.step == 40  # debug mode's fixed length, on one repeated batch
    assert "debug overfit check passed" in capsys.readouterr().out
    assert not checkpoint.checkpoint_dir(cfg.run.dir).exists()  # a later real run must not resume from a debug run
    assert not (Path(cfg.run.dir) / "metrics.jsonl").exists()  # its logs are its own: RUN_DIR/debug
    records = _records(Path(cfg.run.dir) / "debug")
    train_loss = {r["step"]: r["loss"] for r in records if "lr" in r}
    (val,) = [r for r in records if "val_loss" in r]  # evaluated once, at the end
    assert sorted(train_loss) == list(range(5, 41, 5)) and val["step"] == 40
    # it memorised one batch: measured 6.00 -> 4.05 on it (5.72 at step 40 when every step reads a new batch),
    # while the held-out loss stayed at 6.26, untrained
    assert train_loss[40] < 0.7 * train_loss[5]
    assert val["val_loss"] > train_loss[40] + 1.5
    # the loop users repeat most: a second debug run in the same run.dir starts over, and so does a real run
    assert train(cfg).step == 40
    cfg.train.debug, cfg.train.max_steps = False, 4
    assert train(cfg).checkpoint.name == "step_000004"


def test_time_limit_saves_and_exits_cleanly(tiny_config):
    cfg = tiny_config
    cfg.train.time_limit = "2s"  # the margin (slowest step, last save, 5 s) is already past: stop at once
    result = train(cfg)
    assert result.stopped == "train.time_limit" and result.exit_code == 0
    assert result.checkpoint == checkpoint.latest(cfg.run.dir) and result.step == 1


def test_sigint_saves_and_exits_130_and_the_same_command_resumes(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.train.max_steps, cfg.train.eval_every, cfg.logging.log_every = 8, 0, 1
    save_config(cfg, tmp_path / "run.yaml")
    cmd = [sys.executable, "-m", "distllm", "train", str(tmp_path / "run.yaml")]
    env = dict(os.environ, DISTLLM_FAULT="sigint@step:step=3")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 130, r.stderr
    assert "stopping at step 3 for interrupted (SIGINT)" in r.stdout
    assert checkpoint.latest(cfg.run.dir).name == "step_000003"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # auto-resume: no flag needed
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "done: step 8" in r.stdout
    steps = [x["step"] for x in _records(Path(cfg.run.dir)) if "lr" in x]
    assert steps == sorted(set(steps)) == list(range(1, 9))


def test_resume_after_a_crash_drops_the_repeated_metrics(tiny_config):
    cfg = tiny_config
    cfg.train.max_steps, cfg.train.eval_every, cfg.checkpoint.every = 8, 4, 5
    cfg.logging.log_every = 1
    first = train(cfg)
    shutil.rmtree(first.checkpoint)  # as if the job died after logging step 8 but before saving it
    assert checkpoint.latest(cfg.run.dir).name == "step_000005"
    train(cfg)
    records = _records(Path(cfg.run.dir))
    train_steps = [r["step"] for r in records if "lr" in r]
    val_steps = [r["step"] for r in records if "val_loss" in r]
    assert train_steps == list(range(1, 9)) and val_steps == [0, 4, 8]  # no step twice, none backwards


def test_loss_spikes_are_logged_with_their_samples(tiny_config):
    cfg = tiny_config
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.spike_factor = 14, 0, 0.5  # every step "spikes"
    cfg.logging.log_every, cfg.logging.trace_samples = 1, True
    train(cfg)
    run_dir = Path(cfg.run.dir)
    spikes = [r for r in _records(run_dir) if "loss_spike" in r]
    assert [r["step"] for r in spikes] == list(range(2, 15))  # from the second step: the first steps are watched too
    trace = {r["step"]: r["samples"] for r in map(json.loads, (run_dir / "samples" / "rank00000.jsonl").open())}
    assert all(r["samples"] == sorted(trace[r["step"]]) for r in spikes)


def test_a_new_run_refuses_a_directory_with_metrics_but_no_checkpoint(tiny_config):
    run_dir = Path(tiny_config.run.dir)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(UserError, match="holds metrics.jsonl of an earlier run"):
        train(tiny_config)
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'  # not truncated


def test_resume_with_another_model_shape_names_the_keys(tiny_config):
    cfg = tiny_config
    cfg.train.max_steps, cfg.train.eval_every = 3, 0
    train(cfg)
    cfg.model.n_layers, cfg.data.seq_len = 3, 16
    with pytest.raises(ConfigError, match=r"model.n_layers 2 -> 3.*data.seq_len 32 -> 16"):
        train(cfg)


def test_debug_mode_with_document_masking(tiny_config):
    """The debug loop hands the document ids of its one batch to the model (it used to crash)."""
    cfg = tiny_config
    cfg.train.debug, cfg.data.document_mask = True, True
    assert train(cfg).step == 40


def test_a_user_error_on_rank_0_reaches_every_rank_as_the_same_kind():
    from types import SimpleNamespace

    from distllm.errors import DataError
    from distllm.train import on_main

    other_rank = SimpleNamespace(is_main=False, broadcast_object=lambda _: (None, ("DataError", "shard x is corrupt")))
    with pytest.raises(DataError, match="shard x is corrupt"):
        on_main(other_rank, lambda: None)
    other_rank.broadcast_object = lambda _: (None, ("NoSuchError", "odd"))
    with pytest.raises(UserError, match="odd"):
        on_main(other_rank, lambda: None)
