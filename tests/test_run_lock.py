"""One run per run directory (distllm/run_lock.py): a second ``distllm train`` into a run.dir that a live run
holds is refused with one line and changes nothing; a lock left by a dead run is taken over; checkpoints
that do not verify are reported at resume, set aside, and not counted by retention."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distllm import checkpoint, run_lock
from distllm.config import save_config
from distllm.run_lock import RunDirLocked, RunLock
from distllm.train import train
from distributed_runs import check, command, env

BOUND = 180  # seconds: every subprocess run ends by then


def _cli(cfg, tmp_path, *overrides, nproc=1, name="run.yaml", **extra_env):
    save_config(cfg, tmp_path / name)
    return command(tmp_path / name, nproc, list(overrides)), env(**extra_env)


def _snapshot(run_dir: Path) -> dict:
    """Every file of a run directory by relative path -> bytes (the lock's own file aside)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != run_lock.LOCK_NAME}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_a_second_run_into_a_live_runs_directory_is_refused_and_changes_nothing(tiny_config, tmp_path):
    cfg = tiny_config
    # long enough that it is still training when we look (a fast machine ran 12 steps before the first poll);
    # SIGTERM ends it with a save once we are done
    cfg.train.max_steps, cfg.train.eval_every, cfg.checkpoint.every = 100_000, 0, 2
    cfg.logging.log_every = 1
    run_dir = Path(cfg.run.dir)
    cmd, e = _cli(cfg, tmp_path)
    first = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + BOUND
        while not (checkpoint.step_path(run_dir, 2) / checkpoint.MARKER).exists():  # it trains: lock, logs, a save
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # alive (it holds the lock) but writes nothing while we look
        before = _snapshot(run_dir)
        holder = json.loads((run_dir / run_lock.LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

        cmd2, e2 = _cli(cfg, tmp_path, "--optim.lr=0.01", name="other.yaml")  # another run's config
        second = subprocess.run(cmd2, env=e2, capture_output=True, text=True, timeout=BOUND)
        assert second.returncode != 0
        errors = _error_lines(second.stderr)
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
        assert errors[0].startswith(f"distllm train: error: run directory {run_dir} is in use by another distllm "
                                    f"train (host {socket.gethostname()}, pid {first.pid}, since {holder['since']}")
        assert "use another --run.dir" in errors[0]
        assert _snapshot(run_dir) == before  # config.yaml, metrics.jsonl, checkpoints: all the first run's
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            os.kill(first.pid, signal.SIGTERM)  # a preemption: it saves at the next step boundary and exits 0
    out, err = first.communicate(timeout=BOUND)
    assert first.returncode == 0, err
    assert "stopping at step" in out + err
    assert not (run_dir / run_lock.LOCK_NAME).exists()  # released at the end
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "lr" in json.loads(line)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2  # one run's log, not two interleaved
    assert "lr: 0.01" not in (run_dir / "config.yaml").read_text()


def test_the_lock_of_a_killed_run_is_taken_over_and_the_run_resumes(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.train.max_steps, cfg.train.eval_every, cfg.checkpoint.every = 6, 0, 2
    run_dir = Path(cfg.run.dir)
    cmd, e = _cli(cfg, tmp_path)
    killed = subprocess.run(cmd, env={**e, "DISTLLM_FAULT": "sigkill@step:step=3"}, capture_output=True, text=True,
                            timeout=BOUND)
    assert killed.returncode == -signal.SIGKILL
    dead = json.loads((run_dir / run_lock.LOCK_NAME).read_text())  # left behind, naming the dead process
    assert dead["host"] == socket.gethostname() and not run_lock._pid_alive(dead["pid"], dead["process_start"])

    again = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=BOUND)  # the same command
    check(again)
    assert f"took over {run_dir / run_lock.LOCK_NAME} from host {dead['host']}, pid {dead['pid']}" in again.stderr
    assert "step_000002 at step 2" in again.stdout
    assert checkpoint.latest(run_dir).name == "step_000006"
    assert not (run_dir / run_lock.LOCK_NAME).exists()


def test_a_refused_two_process_run_exits_on_both_ranks_with_one_line(dist_runs):
    run_dir = dist_runs.root / "locked"
    with RunLock(run_dir) as held:  # a live holder: this test process
        proc = subprocess.run(command(dist_runs.config, 2, [f"--run.dir={run_dir}"]), env=env(),
                              capture_output=True, text=True, timeout=BOUND)
        assert (run_dir / run_lock.LOCK_NAME).exists() and held.fd is not None
    assert proc.returncode != 0
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr  # rank 0 alone reports it; rank 1 raised the same error quietly
    assert f"pid {os.getpid()}" in errors[0] and "is in use by another distllm train" in errors[0]
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr  # no worker traceback
    assert sorted(p.name for p in run_dir.iterdir()) == []  # nothing written, and the lock released
    # a 2-process run takes the lock once (rank 0) and releases it: a second rank taking it would be refused
    check(dist_runs["ddp"].proc)
    assert not (dist_runs["ddp"].dir / run_lock.LOCK_NAME).exists()


def test_debug_mode_locks_its_own_directory(tiny_config, monkeypatch):
    cfg = tiny_config
    cfg.train.debug = True
    debug_dir = Path(cfg.run.dir) / "debug"
    with RunLock(debug_dir):
        with pytest.raises(RunDirLocked, match="/debug is in use"):
            train(cfg)

    # while a debug run trains (after its fresh start, which must keep its lock file), nobody else gets in;
    # `released` is set when the run, its last step logged, starts releasing its lock: getting in after that
    # is not counted (a release before the last step is a bug the intruder must still catch)
    got_in, refused, done, released = [], [], threading.Event(), threading.Event()
    real_release, trainer = RunLock.release, threading.current_thread()

    def release(self):
        if threading.current_thread() is trainer and any(
                '"step": 40' in line for line in (debug_dir / "metrics.jsonl").read_text().splitlines()):
            released.set()
        real_release(self)

    monkeypatch.setattr(RunLock, "release", release)

    def intruder():
        while not done.is_set():
            if (debug_dir / "metrics.jsonl").exists():
                try:
                    lock = RunLock(debug_dir).acquire()
                    if not released.is_set():  # got in while the run still held its lock
                        got_in.append(True)
                    lock.release()
                except RunDirLocked:
                    refused.append(True)
            time.sleep(0.02)

    t = threading.Thread(target=intruder)
    t.start()
    try:
        assert train(cfg).step == 40
    finally:
        done.set()
        t.join()
    assert refused and not got_in


def test_read_only_commands_do_not_need_the_lock(tiny_config, tmp_path):
    from distllm.__main__ import main

    cfg = tiny_config
    cfg.train.max_steps, cfg.train.eval_every = 3, 0
    train(cfg)
    save_config(cfg, tmp_path / "c.yaml")
    with RunLock(cfg.run.dir):  # a run is going on there
        assert main(["eval", cfg.run.dir]) == 0
        assert main(["generate", cfg.run.dir, "--max-new-tokens=2"]) == 0
        assert main(["export", cfg.run.dir, "--out", str(tmp_path / "hf")]) == 0
        assert main(["plot", cfg.run.dir, "--out", str(tmp_path / "p.png")]) == 0


def _record(tmp_path, **fields) -> Path:
    run_dir = tmp_path / "r"
    run_dir.mkdir(exist_ok=True)
    rec = {"host": "other-node", "pid": 12345, "since": "2026-12-01 10:00:00 UTC", "slurm_job_id": None, **fields}
    (run_dir / run_lock.LOCK_NAME).write_text(json.dumps(rec))
    return run_dir


def test_a_holder_on_another_host_keeps_the_lock_until_its_heartbeat_is_stale(tmp_path):
    run_dir = _record(tmp_path)  # flock is granted here: it cannot see a process on another node
    with pytest.raises(RunDirLocked, match="host other-node, pid 12345"):
        RunLock(run_dir, stale_minutes=10).acquire()
    old = time.time() - 11 * 60
    os.utime(run_dir / run_lock.LOCK_NAME, (old, old))  # a lost node: no heartbeat for 11 minutes
    with RunLock(run_dir, stale_minutes=10) as lock:
        assert "heartbeat is 11.0 minutes old" in lock.took_over
        assert json.loads((run_dir / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_the_heartbeat_keeps_a_live_lock_fresh(tmp_path):
    with RunLock(tmp_path / "r", stale_minutes=0.02) as lock:  # a beat every 1.2 s (at least 1 s)
        old = time.time() - 3600
        os.utime(lock.path, (old, old))
        time.sleep(2.0)
        assert time.time() - lock.path.stat().st_mtime < 2.0


def test_a_slurm_requeue_of_the_same_job_takes_over_at_once(tmp_path, monkeypatch):
    run_dir = _record(tmp_path, slurm_job_id="4242", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with RunLock(run_dir) as lock:
        assert "Slurm job 4242 before its requeue" in lock.took_over
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same incarnation on another node: a second step
    run_dir = _record(tmp_path, slurm_job_id="4242", slurm_restart_count=0)
    with pytest.raises(RunDirLocked):
        RunLock(run_dir).acquire()


def test_without_flock_a_live_pid_on_this_host_holds_and_a_dead_one_does_not(tmp_path):
    me = run_lock.holder_record()
    parent = {**me, "pid": os.getppid(), "process_start": run_lock._process_start(os.getppid())}
    assert run_lock.stale_reason(parent, me, 0.0, 600, os_lock=False) is None
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {**me, "pid": int(gone.stdout)}
    assert "is not running on this host" in run_lock.stale_reason(dead, me, 0.0, 600, os_lock=False)
    reused = {**parent, "process_start": parent["process_start"] - 1}  # the pid now names another process
    assert run_lock.stale_reason(reused, me, 0.0, 600, os_lock=False) is not None
