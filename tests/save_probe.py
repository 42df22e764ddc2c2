"""``distllm train`` with torch.distributed's collectives watched while a checkpoint is saved.

Run like ``python -m distllm``: ``torchrun ... tests/save_probe.py train CONFIG [overrides]``. Every
collective called while this process is inside a save (``checkpoint.begin``, ``PendingSave.write``,
``PendingSave.commit``) is recorded; at exit ``RUN_DIR/probe-rank<R>.json`` holds how many saves ran,
how many collectives they called and every floating-point tensor a collective moved (a gathered
parameter or moment is one; the commit's reports travel as pickled bytes and the flags as integers).
"""

import atexit
import functools
import json
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from distllm import checkpoint
from distllm.__main__ import main

seen = {"saves": 0, "collectives": 0, "float_tensors": []}
inside = threading.local()  # per thread: training goes on beside an asynchronous write
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_reduce", "broadcast", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "gather", "scatter",
               "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv")


def _tensors(args):
    for a in args:
        if torch.is_tensor(a):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if torch.is_tensor(t))


def watched(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(inside, "depth", 0):
            seen["collectives"] += 1
            for t in _tensors([*args, *kwargs.values()]):
                if t.is_floating_point():
                    seen["float_tensors"].append([fn.__name__, t.numel()])
        return fn(*args, **kwargs)
    return wrapper


def saving(fn, count=False):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        inside.depth = getattr(inside, "depth", 0) + 1
        seen["saves"] += count
        try:
            return fn(*args, **kwargs)
        finally:
            inside.depth -= 1
    return wrapper


for name in COLLECTIVES:
    for module in (dist, c10d):
        if hasattr(module, name):
            setattr(module, name, watched(getattr(c10d, name)))
checkpoint.begin = saving(checkpoint.begin, count=True)
checkpoint.PendingSave.write = saving(checkpoint.PendingSave.write)
checkpoint.PendingSave.commit = saving(checkpoint.PendingSave.commit)


def report():
    run_dir = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--run.dir=")), None)
    if run_dir and Path(run_dir).is_dir():
        rank = int(os.environ.get("RANK", 0))
        (Path(run_dir) / f"probe-rank{rank}.json").write_text(json.dumps(seen))


atexit.register(report)
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
