"""Run a benchmark's worker on N local CPU processes and collect what each rank reports.

A benchmark script calls ``run_workers(script, nproc, args, out_dir)``: ``torchrun`` (``python -m
torch.distributed.run``, gloo on 127.0.0.1) starts ``script --worker ...`` N times (or plain
``python`` for one process); each rank writes ``out_dir/<tag>-rank<R>.json`` with ``write_report``
and the driver reads them back, in rank order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(threads: int) -> dict:
    """The environment of a worker: offline, ``threads`` intra-op threads, quiet libraries."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               TORCH_CPP_LOG_LEVEL="ERROR", PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu")
    env.pop("DISTLLM_FAULT", None)
    root = str(Path(__file__).resolve().parents[1])  # the repository, so `import distllm` works anywhere
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_workers(script: str | Path, nproc: int, args: list[str], out_dir: Path, tag: str, threads: int,
                env: dict | None = None, timeout: float = 1800, torchrun: bool = False) -> list[dict]:
    """Start ``script --worker --tag TAG --out OUT_DIR *args`` on ``nproc`` processes (with ``env`` added to
    their environment); each rank's report. One process runs without ``torchrun`` unless ``torchrun``."""
    worker = [str(script), "--worker", "--tag", tag, "--out", str(out_dir), *args]
    if nproc == 1 and not torchrun:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *worker]
    r = subprocess.run(cmd, env={**worker_env(threads), **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-8000:])
        raise SystemExit(f"{tag}: worker failed with exit code {r.returncode}: {' '.join(cmd)}")
    return [json.loads((out_dir / f"{tag}-rank{rank}.json").read_text()) for rank in range(nproc)]


def write_report(out_dir: str | Path, tag: str, rank: int, report: dict) -> None:
    path = Path(out_dir) / f"{tag}-rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, path)


def finish_worker() -> None:
    """Leave the process group cleanly at the end of a worker (a gloo group left for interpreter exit to
    tear down can abort the process: "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``VmHWM``; the same figure as ru_maxrss on Linux)."""
    return _status_kib("VmHWM") * 1024


def rss_bytes() -> int:
    """Resident set size of this process now (``VmRSS``)."""
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def machine_load() -> str:
    """The 1-minute load average against the core count: how much others were running meanwhile."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
