"""A real single-node Slurm cluster on localhost for the launch tests.

``slurm`` (session fixture) installs the Debian packages ``slurmctld slurmd slurm-client munge``
when they are missing (as root, once per machine), then starts ``munged``, ``slurmctld`` and
``slurmd`` in the foreground from a temporary directory: their own config, state, spool, socket,
logs and ports, so nothing of a system Slurm is touched. The node is ``hostname -s`` with 2 CPUs.
The daemons are stopped by their pids when the session ends, also after a failure.

The test is skipped only when the packages are missing and cannot be installed (not root, no
apt-get, or apt-get failed), with the reason.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "munged")
MUNGE_KEY = Path("/etc/munge/munge.key")


def install_slurm() -> None:
    """Install the Slurm and munge packages if any program is missing; ``pytest.skip`` if impossible."""
    missing = [p for p in PROGRAMS if not shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if not missing:
        return
    why = f"Slurm is not installed ({', '.join(missing)} missing)"
    if os.geteuid() != 0:
        pytest.skip(f"{why} and installing {' '.join(PACKAGES)} needs root")
    if not shutil.which("apt-get"):
        pytest.skip(f"{why} and there is no apt-get to install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"{why}: `{' '.join(cmd)}` did not finish in 600 s")
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            pytest.skip(f"{why}: `{' '.join(cmd)}` failed: {' | '.join(tail)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbin(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or name


class LocalSlurm:
    """munged + slurmctld + slurmd on localhost; ``env`` is the environment for the Slurm clients."""

    def __init__(self, root: Path):
        self.root = root
        self.node = socket.gethostname().split(".")[0]  # `hostname -s`
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        # munged runs as the munge user, which cannot enter pytest's root-only temp dirs.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="distllm-munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin:/sbin"

    def start(self) -> None:
        self._start_munge()
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(exist_ok=True)
        self.conf.write_text(self._slurm_conf())
        log = self.root / "log"
        self._spawn([sbin("slurmctld"), "-D", "-f", str(self.conf)], log / "slurmctld.out")
        self._spawn([sbin("slurmd"), "-D", "-f", str(self.conf)], log / "slurmd.out")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            if r.returncode == 0 and r.stdout.strip() == "idle":
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
            time.sleep(0.2)
        raise RuntimeError(f"the Slurm node did not become idle in 60 s:\n{self.logs()}")

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        if not MUNGE_KEY.exists():  # the package's postinst normally writes it
            MUNGE_KEY.write_bytes(os.urandom(1024))
            os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
            MUNGE_KEY.chmod(0o400)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        self.munge_dir.chmod(0o755)  # munged wants its socket directory searchable by all
        self._spawn(
            [sbin("munged"), "--foreground", f"--socket={self.munge_socket}", f"--key-file={MUNGE_KEY}",
             f"--pid-file={self.munge_dir / 'munged.pid'}", f"--log-file={self.munge_dir / 'munged.log'}",
             f"--seed-file={self.munge_dir / 'munged.seed'}"],
            self.root / "munged.out",
            user=munge.pw_uid, group=munge.pw_gid, extra_groups=[],
        )
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if time.monotonic() > deadline or self.procs[-1].poll() is not None:
                raise RuntimeError(f"munged did not start:\n{self.logs()}")
            time.sleep(0.05)

    def _slurm_conf(self) -> str:
        r = self.root
        return f"""\
ClusterName=distllm-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ReturnToService=2
KillWait=5
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, cmd: list[str], out: Path, **kw) -> None:
        with open(out, "wb") as f:
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, **kw))

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=60, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, until, timeout: float) -> dict[str, str]:
        """Poll the job until ``until(job)`` holds; fail with the job and daemon logs after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {job.get('JobState')} after {timeout} s\n{self.logs()}")
            time.sleep(0.5)

    def release_requeued(self, job_id: str) -> None:
        """Start a requeued job now instead of after Slurm's 120 s hold. The hold is there for a
        reason: slurmd refuses a job whose credential is no newer (at 1 s resolution) than the one it
        revoked at the requeue, so wait for the node to be idle and let a second pass first."""
        self.wait(job_id, lambda j: j["JobState"] == "PENDING", timeout=30)
        deadline = time.monotonic() + 30
        while self.run("sinfo", "-h", "-N", "-o", "%T").stdout.strip() != "idle" and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def logs(self) -> str:
        parts = []
        for f in sorted(self.root.rglob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        if self.conf.exists() and all(p.poll() is None for p in self.procs):
            self.run("scancel", "--user=root", check=False)  # then let the jobs' processes end
            deadline = time.monotonic() + 20
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.munge_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    install_slurm()
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
