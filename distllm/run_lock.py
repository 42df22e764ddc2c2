"""One run per run directory: ``RUN_DIR/run.lock``, held by rank 0 for the whole of ``distllm train``.

Two runs writing into one directory interleave their ``metrics.jsonl``, overwrite each other's
``config.yaml`` and race on checkpoints. The lock stops the second run before it writes anything:

- **An OS lock that dies with its process.** Rank 0 opens ``run.lock`` and takes ``fcntl.flock`` on it
  (non-blocking). ``kill -9``, an OOM kill or a crashed node releases it with the process: no manual
  cleanup. On NFS, Linux maps ``flock`` to POSIX byte-range locks that the server arbitrates across
  clients; on Lustre ``flock`` works across nodes only when mounted with ``-o flock`` (``localflock``
  makes it node-local; ``noflock`` makes it fail).
- **The holder, recorded in the file** (JSON): host, pid, the process's start time, when the lock was
  taken, and the Slurm job id and restart count if any. The refusal names it. The file's mtime is a
  heartbeat, refreshed every ``stale_after / 10`` by a background thread of the holder.
- **When the OS lock can say nothing** (it was granted, but the recorded holder is on another host,
  where a node-local ``flock`` cannot see it; or the filesystem refuses ``flock``), the record decides:
  a holder on this host is alive if its pid is alive with the same start time; the earlier incarnation
  of this same Slurm job (same ``SLURM_JOB_ID``, lower ``SLURM_RESTART_COUNT``: a requeue) is gone; any
  other holder is alive until its heartbeat is ``run.lock_stale_minutes`` old, then taken over (a lost
  node). Clocks of the nodes are assumed to agree to well within that time (NTP).
- Released on every exit of ``train`` (return, error, Ctrl-C): the file is removed, then unlocked. A
  run that took the lock checks that the file it locked is still the one at the path (a release
  between its open and its lock would leave it holding a deleted file).

Only ``train`` locks; ``eval``, ``generate``, ``export`` and ``plot`` read committed checkpoints and
logs and never need it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from distllm.errors import RunDirLocked, UserError

LOCK_NAME = "run.lock"
# errnos of a filesystem that does not do flock at all (Lustre -o noflock, some FUSE / old NFS mounts)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _process_start(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot (field 22 of /proc/PID/stat); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_alive(pid: int, start: int | None) -> bool:
    """Is ``pid`` (started at ``start``) still running on this host? A reused pid is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    now = _process_start(pid)
    return now is None or start is None or now == start


def holder_record() -> dict:
    """What this process writes into the lock."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "since": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "since_unix": time.time(),
            "slurm_job_id": job, "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")) if job else None}


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('since')}"


def stale_reason(holder: dict, me: dict, heartbeat_age: float, stale_after: float, os_lock: bool) -> str | None:
    """Why the recorded ``holder`` is gone (None: it may be alive and keeps the directory).

    ``os_lock``: this process got the OS lock, so no holder on this host is alive."""
    if not holder:
        return "no holder recorded"
    if holder.get("host") == me["host"]:
        if os_lock:
            return "its process released the OS lock (it ended)"
        if not _pid_alive(int(holder.get("pid", -1)), holder.get("process_start")):
            return f"pid {holder.get('pid')} is not running on this host"
        return None
    job = holder.get("slurm_job_id")
    if job and job == me.get("slurm_job_id") and (holder.get("slurm_restart_count") or 0) < (me["slurm_restart_count"] or 0):
        return f"it was Slurm job {job} before its requeue"
    if heartbeat_age > stale_after:
        return f"its heartbeat is {heartbeat_age / 60:.1f} minutes old (run.lock_stale_minutes is {stale_after / 60:g})"
    return None


class RunLock:
    """The lock on one run directory, held from ``acquire`` until ``release``."""

    NAME = LOCK_NAME

    def __init__(self, run_dir: str | os.PathLike, stale_minutes: float = 10.0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.stale_after = 60.0 * stale_minutes
        self.fd: int | None = None
        self.took_over: str | None = None  # why a stale lock was taken over (None: there was none)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ---- taking it

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = holder_record()
        for _ in range(10):  # retried only if a releasing holder removed the file we opened
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os_lock = self._flock(fd)
                holder, age = self._read(fd)
                if os_lock is False:
                    raise self._refusal(holder, age)
                if os_lock and not self._same_file(fd):
                    os.close(fd)
                    continue
                if holder:
                    why = stale_reason(holder, me, age, self.stale_after, bool(os_lock))
                    if why is None:
                        raise self._refusal(holder, age)
                    self.took_over = f"took over {self.path} from {describe(holder)}: {why}"
                self._write(fd, me)
            except BaseException:
                os.close(fd)
                raise
            self.fd, self.holder = fd, me
            self._start_heartbeat()
            return self
        raise UserError(f"could not lock {self.path}: it keeps being replaced; is another run starting there?")

    def _flock(self, fd: int) -> bool | None:
        """True: got the OS lock; False: another process holds it; None: the filesystem has no flock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                return None
            raise

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)

    def _read(self, fd: int) -> tuple[dict, float]:
        """(the recorded holder, or {} if none / unreadable; seconds since its last heartbeat)."""
        age = time.time() - os.fstat(fd).st_mtime
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        try:
            holder = json.loads(data) if data.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            holder = {}  # a torn write of a holder that died while taking the lock
        return (holder if isinstance(holder, dict) else {}), age

    def _write(self, fd: int, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, data)
        os.fsync(fd)

    def _refusal(self, holder: dict, age: float) -> RunDirLocked:
        who = describe(holder) if holder else "another process (no holder recorded yet)"
        return RunDirLocked(
            f"run directory {self.run_dir} is in use by another distllm train ({who}; heartbeat {age:.0f} s ago): "
            f"wait for it to end or stop it, or use another --run.dir; if that process is gone on a filesystem "
            f"without cross-node locks, {self.path} is taken over once its heartbeat is "
            f"{self.stale_after / 60:g} minutes old (run.lock_stale_minutes), or delete it"
        )

    # ---- holding it

    def _start_heartbeat(self) -> None:
        interval = max(1.0, self.stale_after / 10)

        def beat():
            while not self._stop.wait(interval):
                try:
                    os.utime(self.fd)
                except OSError:
                    pass  # a full or flaky disk must not stop the run; a missed beat only ages the lock

        self._beat = threading.Thread(target=beat, name="distllm-run-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        if self.fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            if self._same_file(self.fd):
                self.path.unlink()  # removed before unlocking: a waiting run then finds no file to inherit
        except OSError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()
