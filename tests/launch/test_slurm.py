"""launch/slurm/train.sbatch on a real single-node Slurm (see conftest.py): 2 training processes
through torchrun and a checkpoint at the end; SIGUSR1 reaching every rank through torchrun and the
job requeuing itself; and the whole preemption path with the real trainer (save on both ranks at
the same step, requeue, resume, finish).
"""

from __future__ import annotations

import re
import sys
import textwrap
import time
from pathlib import Path

from distllm.config import save_config

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def submit(slurm, tmp_path: Path, *args: str, env: dict | None = None, cwd: Path = REPO) -> str:
    """``sbatch launch/slurm/train.sbatch ARGS`` (from the repository root by default), 2 processes on
    the one node, with the project's venv first on PATH (the script's default ``python3``)."""
    job_env = {
        **slurm.env,
        "PATH": f"{Path(sys.executable).parent}:{slurm.env['PATH']}",
        "NPROC_PER_NODE": "2",
        "LOG_DIR": str(tmp_path / "logs"),
        **(env or {}),
    }
    r = slurm.run(
        "sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10",
        f"--output={tmp_path}/batch-%j.out", str(SBATCH), *args,
        env=job_env, cwd=cwd,
    )
    return r.stdout.strip().split(";")[0]


def logs(tmp_path: Path) -> str:
    files = sorted(tmp_path.glob("batch-*.out")) + sorted((tmp_path / "logs").glob("*.log"))
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in files)


def finished(job: dict) -> bool:
    return job["JobState"] in FINAL_STATES


def test_sbatch_trains_on_two_processes_and_writes_a_checkpoint(slurm, tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config, config)
    job_id = submit(slurm, tmp_path, str(config), "--train.micro_batch_size=2")  # 2 x 2 processes = global 4

    job = slurm.wait(job_id, finished, timeout=240)
    assert job["JobState"] == "COMPLETED", logs(tmp_path)
    assert job["Restarts"] == "0", logs(tmp_path)  # finished training is not requeued

    node_log = (tmp_path / "logs" / f"distllm-{job_id}-node0.log").read_text()
    assert "2 process(es)" in node_log, logs(tmp_path)
    checkpoints = Path(tiny_config.run.dir) / "checkpoints"
    complete = [d.name for d in checkpoints.iterdir() if (d / "COMPLETE").is_file()]
    assert f"step_{tiny_config.train.max_steps:06d}" in complete, (complete, logs(tmp_path))


# A stand-in for distllm that only does what the launch layer must deliver to it: it reports
# being started, waits for SIGUSR1, writes which rank got it, and exits 0 like distllm after a
# signal-triggered save. On the requeued run it finishes at once.
PROBE = textwrap.dedent("""\
    import os, signal, sys, time
    from pathlib import Path

    out = Path(os.environ["PROBE_DIR"])
    rank, restart = os.environ["RANK"], os.environ.get("SLURM_RESTART_COUNT", "0")
    (out / f"args.{restart}.{rank}").write_text(" ".join(sys.argv[1:]))
    if restart != "0":
        sys.exit(0)
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    (out / f"ready.{rank}").touch()
    deadline = time.monotonic() + 120
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # a checkpoint being written: the launcher must not kill us meanwhile
    (out / f"usr1.{rank}").write_text(str(len(got)))
    sys.exit(0 if got else 3)
""")


def test_usr1_reaches_every_rank_through_torchrun_and_the_job_requeues(slurm, tmp_path):
    stand_in = tmp_path / "stand_in" / "distllm"  # shadows the real package for `-m distllm`
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").touch()
    (stand_in / "__main__.py").write_text(PROBE)
    probe = tmp_path / "probe"
    probe.mkdir()
    # Submitted from elsewhere (`-m` puts the working directory first on sys.path), so the job finds
    # launch/ through DISTLLM_HOME.
    env = {"PYTHONPATH": str(stand_in.parent), "PROBE_DIR": str(probe), "DISTLLM_HOME": str(REPO)}
    job_id = submit(slurm, tmp_path, "run.yaml", "--train.max_steps=7", env=env, cwd=tmp_path)

    deadline = time.monotonic() + 120
    while not all((probe / f"ready.{r}").exists() for r in "01"):
        job = slurm.job(job_id)
        assert not finished(job) and time.monotonic() < deadline, logs(tmp_path)
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", job_id)

    # Both ranks got the signal (Slurm signals every process of the step, forward_signals.sh once
    # more), the torchrun agent survived it and waited for them, and the job saw the clean exit
    # after a signal and requeued itself.
    slurm.wait(job_id, lambda j: j["Restarts"] == "1" or finished(j), timeout=60)
    got = {p.name: int(p.read_text()) for p in probe.glob("usr1.*")}
    assert sorted(got) == ["usr1.0", "usr1.1"] and min(got.values()) >= 1, (got, logs(tmp_path))
    assert "requeueing job" in logs(tmp_path)
    args = (probe / "args.0.0").read_text()
    assert args == "train run.yaml --checkpoint.resume_from=latest --train.max_steps=7"

    slurm.release_requeued(job_id)  # instead of waiting out Slurm's 120 s hold
    job = slurm.wait(job_id, finished, timeout=120)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", logs(tmp_path)
    assert (probe / "args.1.0").read_text() == args and (probe / "args.1.1").exists()


def test_usr1_saves_on_both_ranks_requeues_and_the_job_resumes_to_the_end(slurm, tiny_config, tmp_path):
    """The preemption path with the real trainer: `scancel --signal=USR1` (what `--signal=USR1@N`
    does before the time limit) -> both ranks stop at the same step and save -> the job requeues
    itself -> the requeued run resumes from that checkpoint and finishes."""
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config, config)
    max_steps = 200
    job_id = submit(slurm, tmp_path, str(config), "--train.micro_batch_size=2", f"--train.max_steps={max_steps}",
                    "--train.eval_every=0", "--logging.log_every=1")
    run_dir = Path(tiny_config.run.dir)

    deadline = time.monotonic() + 120  # wait until it is training (a few steps logged), then signal
    while not any('"loss"' in line for line in read_lines(run_dir / "metrics.jsonl")):
        assert not finished(slurm.job(job_id)) and time.monotonic() < deadline, logs(tmp_path)
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", job_id)

    slurm.wait(job_id, lambda j: j["Restarts"] == "1" or finished(j), timeout=60)
    node_log = tmp_path / "logs" / f"distllm-{job_id}-node0.log"
    stop = re.search(r"stopping at step (\d+) for a stop signal: saved (\S+);", node_log.read_text())
    assert stop, logs(tmp_path)
    step, saved = int(stop[1]), Path(stop[2])
    assert 0 < step < max_steps and saved.name == f"step_{step:06d}"
    assert (saved / "COMPLETE").is_file()
    assert (saved / "rng-rank00000.json").is_file() and (saved / "rng-rank00001.json").is_file()  # both ranks saved
    assert "requeueing job" in logs(tmp_path)

    slurm.release_requeued(job_id)  # instead of waiting out Slurm's 120 s hold
    job = slurm.wait(job_id, finished, timeout=180)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", logs(tmp_path)
    assert f"resumed from {saved} at step {step}" in node_log.read_text(), logs(tmp_path)
    assert (run_dir / "checkpoints" / f"step_{max_steps:06d}" / "COMPLETE").is_file(), logs(tmp_path)


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
