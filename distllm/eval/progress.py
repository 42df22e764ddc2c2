"""A progress bar with ETA for long scans: tqdm on a terminal, plain lines at a steady interval otherwise.

tqdm writes carriage returns, which fill log files and CI output with one line per refresh; when
stderr is not a terminal this prints ``desc: 42% (1.2 of 2.9 GB), 31.0 MB/s, ETA 0:00:55`` every
``interval`` seconds instead (and once at the end).
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

from tqdm import tqdm


def _size(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}".rstrip()
        n /= 1000
    return f"{n:.1f} P"


class Progress:
    """``update(n)`` of ``total`` units (``unit`` e.g. "B" or "tok"); ``extra`` counts a second quantity
    shown as a rate (e.g. text bytes while the total counts tokens)."""

    def __init__(self, total: int, desc: str, unit: str = "tok", enabled: bool = True, interval: float = 10.0,
                 stream=None, rate_unit: str = "B"):
        self.total, self.desc, self.unit, self.rate_unit = total, desc, unit, rate_unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.interval = enabled, interval
        self.done = 0
        self.extra = 0
        self.start = self.last = time.monotonic()
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=self.stream, leave=False,
                        dynamic_ncols=True) if enabled and tty else None

    def update(self, n: int, extra: int = 0) -> None:
        self.done += n
        self.extra += extra
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if extra:
                self.bar.set_postfix_str(f"{_size(self.rate())}{self.rate_unit}/s", refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def rate(self) -> float:
        """``extra`` per second (``done`` per second without extra)."""
        seconds = max(time.monotonic() - self.start, 1e-9)
        return (self.extra or self.done) / seconds

    def line(self) -> str:
        seconds = time.monotonic() - self.start
        frac = self.done / self.total if self.total else 1.0
        eta = timedelta(seconds=round(seconds * (1 - frac) / frac)) if frac > 0 else "?"
        return (f"{self.desc}: {100 * frac:.0f}% ({_size(self.done)} of {_size(self.total)} {self.unit}), "
                f"{_size(self.rate())}{self.rate_unit}/s, ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done:
            print(self.line(), file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
