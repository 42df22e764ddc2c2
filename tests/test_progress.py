"""Progress: tqdm's bar on a terminal, plain lines at a steady interval in a log file (no carriage returns)."""

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading

import pytest
import yaml

from distllm import progress
from distllm.metrics import MetricsLogger
from distllm.progress import Progress


def open_terminal() -> tuple[int, int]:
    """A pseudo-terminal of 100 x 30 (a new one has 0 columns, and tqdm would draw an empty bar)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    return master, slave


class Terminal:
    """A pseudo-terminal: ``stream`` is its slave end (``isatty()`` is true); ``output()`` what was written."""

    def __init__(self):
        self.master, self.slave = open_terminal()
        self.stream = os.fdopen(self.slave, "w", buffering=1)
        self.chunks: list[bytes] = []

    def drain(self) -> None:
        while select.select([self.master], [], [], 0.05)[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the slave end is closed and everything was read
                return
            if not data:
                return
            self.chunks.append(data)

    def output(self) -> str:
        self.stream.flush()
        self.drain()
        return b"".join(self.chunks).decode(errors="replace")

    def close(self) -> None:
        self.stream.close()
        os.close(self.master)


@pytest.fixture
def terminal():
    t = Terminal()
    yield t
    t.close()


@pytest.fixture
def clock(monkeypatch):
    """A fake ``time.monotonic`` for distllm.progress: ``clock.now`` seconds, set by the test."""

    class Clock:
        now = 1000.0

    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", lambda: c.now)
    return c


def test_plain_lines_at_a_steady_interval_in_a_log(clock):
    log = io.StringIO()  # not a terminal
    bar = Progress(120e6, "tokenize", "B", unit_scale=True, interval=30, stream=log)
    for _ in range(12):  # 10 MB every 10 s
        clock.now += 10
        bar.update(10e6)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 4  # at 30, 60, 90 s and the end (120 s)
    assert lines[0] == "tokenize: 30.0MB/120MB (25%) | 1.00MB/s | 00:30 elapsed | 01:30 left"
    assert lines[-1] == "tokenize: 120MB/120MB (100%) | 1.00MB/s | 02:00 elapsed"
    bar.close()  # closing twice prints nothing more
    assert len(log.getvalue().splitlines()) == 4


def test_resumed_count_and_rate(clock):
    log = io.StringIO()
    with Progress(300, "train", "step", initial=100, interval=30, stream=log) as bar:
        clock.now += 40
        bar.update(20)
    assert log.getvalue().splitlines() == ["train: 120/300 step (40%) | 0.5 step/s | 00:40 elapsed | 06:00 left"]


def test_a_bar_on_a_terminal(terminal):
    with Progress(5, "train", "step", stream=terminal.stream) as bar:
        for _ in range(5):
            bar.update()
    out = terminal.output()
    assert re.search(r"\rtrain: +100%\|.*\| 5/5 \[", out), out  # tqdm's bar, redrawn in place


def test_disabled_prints_nothing(terminal):
    log = io.StringIO()
    for stream in (log, terminal.stream):
        with Progress(5, "scan", "B", enabled=False, interval=0, stream=stream) as bar:
            bar.update(5)
    assert log.getvalue() == "" and terminal.output() == ""


@pytest.mark.parametrize("tty", [False, True])
def test_training_progress(tmp_path, monkeypatch, capsys, terminal, tty):
    """MetricsLogger's progress: a bar on a terminal; in a log only plain lines, and its metric lines on stdout."""
    if tty:
        monkeypatch.setattr(sys, "stderr", terminal.stream)
    log = MetricsLogger(tmp_path, enabled=True, progress=True, total_steps=3)
    for step in (1, 2, 3):
        log.advance()
        log.print(f"line {step}")
    log.close()
    out, err = capsys.readouterr()
    assert out.splitlines() == ["line 1", "line 2", "line 3"]
    if tty:
        assert re.search(r"\rtrain: +100%\|.*\| 3/3 \[", terminal.output()), terminal.output()
    else:
        assert "\r" not in err and err.splitlines()[-1].startswith("train: 3/3 step (100%) | ")


def _prepare_command(tmp_path, tiny_corpus, name):
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": str(tiny_corpus), "dir": str(tmp_path / name), "val_fraction": 0.1, "num_proc": 1},
        "tokenizer": {"vocab_size": 300}, "logging": {"progress": True},
    }))
    return [sys.executable, "-m", "distllm", "prepare", str(config)]


def test_prepare_progress_in_a_log_and_on_a_terminal(tmp_path, tiny_corpus):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    piped = subprocess.run(_prepare_command(tmp_path, tiny_corpus, "piped"), capture_output=True, text=True,
                           timeout=300, env=env)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr  # Slurm / nohup / CI logs: no carriage returns
    lines = piped.stderr.splitlines()
    assert any(line.startswith("scan: ") and "(100%)" in line for line in lines), piped.stderr
    assert any(line.startswith("tokenize: ") and "(100%)" in line for line in lines), piped.stderr

    master, slave = open_terminal()
    proc = subprocess.Popen(_prepare_command(tmp_path, tiny_corpus, "tty"), stdout=slave, stderr=slave,
                            stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks: list[bytes] = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO once the process closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    assert proc.wait(timeout=300) == 0
    reader.join(timeout=30)
    os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert re.search(r"\rtokenize: +\d+%\|", out), out  # tqdm's bar on the terminal
