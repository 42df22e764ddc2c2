"""Fault injection for tests: ``DISTLLM_FAULT="ACTION@POINT:rank=R:step=S[,...]"``.

Points are places in the code that call ``trigger(point, rank=, step=)``; the action fires when the
rank and step match (either may be omitted = any):

    sigkill   the process kills itself with SIGKILL (a crash: nothing is cleaned up)
    sigterm   the process sends itself SIGTERM (a preemption notice to this rank only)
    sigusr1   the process sends itself SIGUSR1
    sigint    the process sends itself SIGINT (Ctrl-C)
    enospc    raises OSError(ENOSPC) (a full disk)
    inf       ``trigger`` returns True and the caller poisons its value (a non-finite loss)

Points: ``save`` (inside a checkpoint write, after this rank's first file), ``loss`` (each
micro-batch loss), ``step`` (after each optimizer step). Unset, every call is a dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

_ACTIONS = ("sigkill", "sigterm", "sigusr1", "sigint", "enospc", "inf")
_SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1, "sigint": signal.SIGINT}


def _parse(text: str) -> list[tuple[str, str, int | None, int | None]]:
    faults = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        head, *conds = item.split(":")
        action, _, point = head.partition("@")
        if action not in _ACTIONS or not point:
            raise ValueError(f"DISTLLM_FAULT item {item!r}: expected ACTION@POINT with ACTION in {_ACTIONS}")
        where = dict(c.split("=", 1) for c in conds)
        faults.append((action, point, _int(where.get("rank")), _int(where.get("step"))))
    return faults


def _int(x: str | None) -> int | None:
    return None if x is None else int(x)


_FAULTS = _parse(os.environ.get("DISTLLM_FAULT", ""))


def trigger(point: str, rank: int, step: int) -> bool:
    """Fire the faults configured for ``point`` at this rank and step; True if the caller should poison a value."""
    poison = False
    for action, where, r, s in _FAULTS:
        if where != point or (r is not None and r != rank) or (s is not None and s != step):
            continue
        if action in _SIGNALS:
            os.kill(os.getpid(), _SIGNALS[action])
        elif action == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        elif action == "inf":
            poison = True
    return poison
