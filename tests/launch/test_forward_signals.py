"""launch/forward_signals.sh: a SIGUSR1 sent to the wrapper alone (as `docker kill --signal=USR1`
sends it to a container's PID 1) reaches every worker of torchrun and of `accelerate launch`, whose
agent survives it; other signals and the exit status pass through.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "launch" / "forward_signals.sh"

# A worker that only reports: started, then how many SIGUSR1 it got before it exits 0 (like
# distllm after a signal-triggered save).
WORKER = textwrap.dedent("""\
    import os, signal, sys, time
    from pathlib import Path

    out, rank = Path(sys.argv[1]), os.environ.get("RANK", "0")
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    (out / f"ready.{rank}").touch()
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a checkpoint being written
    (out / f"usr1.{rank}").write_text(str(len(got)))
    sys.exit(0 if got else 3)
""")


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(WRAPPER), *cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for(paths: list[Path], proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"not started (exit {proc.poll()}):\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.1)


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "accelerate": ["-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "launch" / "accelerate" / "cpu_ddp.yaml")],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_usr1_to_the_wrapper_reaches_every_worker_once(launcher, tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    proc = start([sys.executable, *LAUNCHERS[launcher], "worker.py", str(tmp_path)], tmp_path)
    wait_for([tmp_path / "ready.0", tmp_path / "ready.1"], proc)

    os.kill(proc.pid, signal.SIGUSR1)  # the wrapper only: no process group, no Slurm
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]  # the launcher survived and saw both workers succeed
    assert {p.name: p.read_text() for p in tmp_path.glob("usr1.*")} == {"usr1.0": "1", "usr1.1": "1"}, out
    assert "SIGUSR1 forwarded to 2 process(es)" in out


def test_usr1_spares_processes_that_do_not_handle_it(tmp_path):
    """A descendant with the default action (it would die of SIGUSR1) is not signalled."""
    code = ("import signal, time; signal.signal(signal.SIGUSR1, signal.SIG_DFL); "
            "open('ready', 'w').close(); time.sleep(2)")
    proc = start([sys.executable, "-c", code], tmp_path)
    wait_for([tmp_path / "ready"], proc)
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "SIGUSR1 forwarded to 0 process(es)" in out


def test_sigterm_and_exit_status_pass_through(tmp_path):
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(7)); "
            "open('ready', 'w').close(); time.sleep(30)")
    proc = start([sys.executable, "-c", code], tmp_path)
    wait_for([tmp_path / "ready"], proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 7

    proc = start(["sh", "-c", "kill -KILL $$"], tmp_path)
    assert proc.wait(timeout=30) == 128 + signal.SIGKILL


def test_signal_marker_is_written_on_usr1(tmp_path):
    marker = tmp_path / "marker"
    code = "import signal, time; signal.signal(signal.SIGUSR1, lambda *_: None); open('ready', 'w').close(); time.sleep(1)"
    proc = subprocess.Popen([str(WRAPPER), sys.executable, "-c", code], cwd=tmp_path,
                            env={**os.environ, "SIGNAL_MARKER": str(marker)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for([tmp_path / "ready"], proc)
    assert not marker.exists()
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=30) == 0
    assert marker.exists()
