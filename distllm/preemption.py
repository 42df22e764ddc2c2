"""Stop requests: SIGTERM (Slurm's preemption), SIGUSR1 (Slurm's ``--signal`` warning before the time
limit) and SIGINT (Ctrl-C) only set a flag; the training loop agrees on it with every rank at the
next step boundary, saves a checkpoint and exits 0 (130 for SIGINT), so a requeued job or the same
command resumes. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread (e.g. tests calling train())
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
