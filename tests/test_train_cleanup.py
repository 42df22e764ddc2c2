"""``train()`` cleans up on every exit path: return, a user error, a crash and Ctrl-C (KeyboardInterrupt)
all leave the signal handlers as they were and no file of the run open, so a later Ctrl-C in the same
Python process (a notebook, pytest) still interrupts it; a debug run leaves no global debug switch on."""

import os
import signal
from pathlib import Path

import pytest
import torch

from distllm import train as train_module
from distllm.errors import UserError
from distllm.preemption import SIGNALS
from distllm.train import train


def open_files_under(directory: Path) -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            out.add(target)
    return out


def fail_at_step_3(exc):
    real = train_module.lr_at

    def lr_at(step, *args):
        if step == 3:
            raise exc
        return real(step, *args)

    return lr_at


@pytest.mark.parametrize("exit_path", ["return", "user error", "crash", "ctrl-c"])
def test_every_exit_restores_signal_handlers_and_closes_files(tiny_config, monkeypatch, exit_path):
    cfg = tiny_config
    cfg.train.max_steps, cfg.train.eval_every = 5, 0
    cfg.logging.tensorboard, cfg.logging.trace_samples, cfg.logging.log_every = True, True, 1
    mine = lambda *a: None  # noqa: E731 - a handler of the caller's own
    before = {sig: signal.signal(sig, mine) for sig in SIGNALS}
    data_files = open_files_under(Path(cfg.data.dir))  # other tests of this process may hold some
    expected = {"return": None, "user error": UserError, "crash": RuntimeError, "ctrl-c": KeyboardInterrupt}[exit_path]
    if exit_path == "user error":
        cfg.optim.lr, cfg.optim.warmup_steps = 1e30, 0  # diverges: a NonFiniteLossError
    elif exit_path in ("crash", "ctrl-c"):
        monkeypatch.setattr(train_module, "lr_at", fail_at_step_3(expected("boom") if exit_path == "crash"
                                                                  else KeyboardInterrupt()))
    try:
        if expected is None:
            assert train(cfg).step == 5
        else:
            with pytest.raises(expected):
                train(cfg)
        assert {sig: signal.getsignal(sig) for sig in SIGNALS} == dict.fromkeys(SIGNALS, mine)
        run_dir = Path(cfg.run.dir)
        assert (run_dir / "metrics.jsonl").is_file() and list((run_dir / "tensorboard").iterdir())
        assert open_files_under(run_dir) == set()  # metrics.jsonl, TensorBoard events, the sample trace: closed
        assert open_files_under(Path(cfg.data.dir)) <= data_files  # the shards too
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_debug_run_leaves_no_debug_switch_on(tiny_config, monkeypatch):
    """Anomaly detection, deterministic algorithms and CUDA_LAUNCH_BLOCKING are on for a debug run only."""
    monkeypatch.delenv("CUDA_LAUNCH_BLOCKING", raising=False)
    seen = {}
    real = train_module.lr_at

    def lr_at(step, *args):
        seen[step] = (torch.is_anomaly_enabled(), torch.are_deterministic_algorithms_enabled(),
                      os.environ.get("CUDA_LAUNCH_BLOCKING"))
        return real(step, *args)

    monkeypatch.setattr(train_module, "lr_at", lr_at)
    tiny_config.train.debug = True
    train(tiny_config)
    assert seen[1] == (True, True, "1")
    assert (torch.is_anomaly_enabled(), torch.are_deterministic_algorithms_enabled()) == (False, False)
    assert "CUDA_LAUNCH_BLOCKING" not in os.environ
