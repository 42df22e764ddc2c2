"""Progress on the console: a live bar on a terminal, plain lines at a steady interval elsewhere.

A progress bar redraws itself with carriage returns; written to a file (Slurm's output, ``nohup``,
a CI log) it becomes one endless line. So ``Progress`` draws tqdm's bar only when its stream is a
terminal (or in a notebook) and otherwise prints one plain line every ``interval`` seconds, and a
last one when it closes::

    tokenize: 12.3MB/45.6MB (27%) | 3.10MB/s | 0:00:04 elapsed | 0:00:11 left

Used by ``prepare`` (scan, tokenize) and by the training loop's ``MetricsLogger``.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

INTERVAL = 30.0  # seconds between plain progress lines


class Progress:
    """``update(n)`` as work is done; ``write(line)`` prints a message (stdout) without breaking a bar."""

    def __init__(self, total: float, desc: str, unit: str = "it", *, initial: float = 0, unit_scale: bool = False,
                 enabled: bool = True, leave: bool = True, interval: float = INTERVAL, stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = self.start_n = initial
        self.interval, self.enabled = interval, enabled
        self.stream = stream or sys.stderr
        self.bar = None
        self.started = self.printed_at = time.monotonic()
        self.printed_n = initial
        if enabled and is_interactive(self.stream):
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                            dynamic_ncols=True, leave=leave, file=self.stream)

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.printed_at >= self.interval:
            self._print_line()

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.n != self.printed_n:
            self._print_line()
        self.enabled = False

    def line(self) -> str:
        """The plain progress line: done/total (percent) | rate | elapsed | time left."""
        elapsed = time.monotonic() - self.started
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        if self.unit_scale:  # 12.3MB/45.6MB | 3.10MB/s
            done = f"{tqdm.format_sizeof(self.n, self.unit)}/{tqdm.format_sizeof(self.total, self.unit)}"
            speed = f"{tqdm.format_sizeof(rate, self.unit)}/s"
        else:  # 40/300 step | 1.9 step/s
            done = f"{self.n:g}/{self.total:g} {self.unit}"
            speed = f"{rate:.3g} {self.unit}/s" if rate < 1000 else f"{rate:,.0f} {self.unit}/s"
        parts = [f"{self.desc}: {done}" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else ""), speed,
                 f"{tqdm.format_interval(elapsed)} elapsed"]
        if rate > 0 and self.total and self.n < self.total:
            parts.append(f"{tqdm.format_interval((self.total - self.n) / rate)} left")
        return " | ".join(parts)

    def _print_line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.printed_at, self.printed_n = time.monotonic(), self.n

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_interactive(stream: TextIO) -> bool:
    """A terminal, or a Jupyter kernel (whose output cell redraws tqdm's widget)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return "ipykernel" in sys.modules
