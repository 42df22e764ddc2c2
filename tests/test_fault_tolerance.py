"""Faults injected into real 2-process runs (``DISTLLM_FAULT``, see distllm/faults.py): a rank killed
while saving, a stop signal to one rank, a non-finite loss on one rank, a full disk on one rank, a
dead process, and inconsistent settings. Every run is bounded by a subprocess timeout: a hang fails."""

import json
import re
import shutil

import pytest
import torch

from distllm import checkpoint
from distributed_runs import ENGINES, Run, check, launch, launch_two_nodes

BOUND = 120  # seconds: every faulty run must end by then (a hang would reach it)


def _run(dist_runs, name, nproc=2, extra=(), engine="ddp", fault=None, **kw):
    run_dir = dist_runs.root / name
    overrides = [f"--run.dir={run_dir}", *ENGINES[engine][1], *extra]
    env = {"DISTLLM_FAULT": fault} if fault else {}
    proc = launch(dist_runs.config, nproc, overrides, timeout=kw.pop("timeout", BOUND), **env)
    return Run(run_dir, proc, 0.0)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "distllm train: error:" in line]


@pytest.mark.parametrize("engine", ["ddp", "ddp-async"])
def test_kill_9_while_saving_never_picks_the_torn_checkpoint(dist_runs, engine):
    """Rank 1 killed in the middle of writing its files (async: in the background thread, while rank 0 trains
    on): the previous checkpoint stays the newest and the same command resumes from it, bit-exact."""
    name = f"kill9-{engine}"
    crashed = _run(dist_runs, name, engine=engine, extra=["--checkpoint.every=5"],
                   fault="sigkill@save:rank=1:step=10")
    assert crashed.proc.returncode != 0
    assert [p.name for p in checkpoint.complete_checkpoints(crashed.dir)] == ["step_000005"]
    assert (crashed.dir / "checkpoints" / ".tmp-step_000010").exists()  # the torn save, never committed

    resumed = _run(dist_runs, name, engine=engine, extra=["--checkpoint.every=5"])  # the same command again
    check(resumed.proc)
    assert "resumed from" in resumed.proc.stdout and "step_000005 at step 5" in resumed.proc.stdout
    assert not (resumed.dir / "checkpoints" / ".tmp-step_000010").exists()  # leftovers cleaned up
    assert resumed.losses() == dist_runs["ddp"].losses()  # the uninterrupted run's, bit for bit
    a, b = dist_runs["ddp"].weights(), resumed.weights()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_one_rank_saves_on_both_at_the_same_step(dist_runs):
    run = _run(dist_runs, "sigterm", fault="sigterm@step:rank=1:step=7")
    check(run.proc)  # exit 0: a requeued job resumes
    assert "stopping at step 7 for a stop signal" in run.proc.stdout
    ckpt = checkpoint.latest(run.dir)
    assert ckpt.name == "step_000007"
    files = checkpoint.read_marker(ckpt)["files"]
    assert {"rng-rank00000.json", "rng-rank00001.json"} <= files.keys()  # both ranks wrote into the commit
    assert max(run.losses()) == 7

    resumed = _run(dist_runs, "sigterm")
    check(resumed.proc)
    assert resumed.losses() == dist_runs["ddp"].losses()


@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_inf_on_one_rank_is_skipped_by_every_rank(dist_runs, engine):
    run = _run(dist_runs, f"inf-{engine}", engine=engine, fault="inf@loss:rank=1:step=5",
               extra=["--train.on_nonfinite=skip", "--checkpoint.every=1", "--train.max_steps=6",
                      "--checkpoint.keep_last=20"])
    check(run.proc)
    skipped = [r for r in run.records() if r.get("skipped")]
    assert [r["step"] for r in skipped] == [5]
    before, after = run.weights(4), run.weights(5)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step changed nothing
    m4, m5 = run.moments(4), run.moments(5)
    assert all(torch.equal(m4[k], m5[k]) for k in m4)
    assert not all(torch.equal(after[k], run.weights(6)[k]) for k in after)  # and training went on


def test_inf_with_the_halt_policy_stops_naming_the_last_good_checkpoint(dist_runs):
    run = _run(dist_runs, "inf-halt", fault="inf@loss:rank=0:step=4", extra=["--checkpoint.every=2"])
    assert run.proc.returncode != 0
    errors = _errors(run.proc.stderr)
    assert len(errors) == 1, run.proc.stderr  # rank 0 alone reports it
    assert "non-finite loss at step 4" in errors[0] and "step_000002" in errors[0]
    assert checkpoint.latest(run.dir).name == "step_000002"


@pytest.mark.parametrize("engine", ["zero2", "zero2-async"])
def test_full_disk_on_one_rank_keeps_the_previous_checkpoint(dist_runs, engine):
    """A full disk on rank 1 (async: found by the background write, reported at the next step boundary): one
    line names the checkpoint, the rank and the cause, and the previous checkpoint is intact and newest."""
    run = _run(dist_runs, f"enospc-{engine}", engine=engine, extra=["--checkpoint.every=5"],
               fault="enospc@save:rank=1:step=10")
    assert run.proc.returncode != 0
    errors = _errors(run.proc.stderr)
    assert len(errors) == 1, run.proc.stderr
    assert "step_000010 on rank 1: no space left on device" in errors[0]
    assert "step_000005 is intact" in errors[0]
    assert "Traceback" not in run.proc.stderr.split("distllm train: error:")[0]
    root = checkpoint.checkpoint_dir(run.dir)
    assert sorted(p.name for p in root.iterdir()) == ["step_000005"]  # no temp left behind
    assert checkpoint.resolve("latest", run.dir).name == "step_000005"  # what auto-resume picks


def test_a_dead_process_ends_the_other_node(dist_runs):
    """Two torchrun agents (two "nodes"): rank 1 dies mid-training; node 0 must not hang."""
    run_dir = dist_runs.root / "dead-node"
    node0, node1 = launch_two_nodes(dist_runs.config, [f"--run.dir={run_dir}"], timeout=BOUND,
                                    DISTLLM_FAULT="sigkill@step:rank=1:step=3")
    assert node0.returncode != 0 and node1.returncode != 0
    # one line says what happened, not gloo's traceback (torchrun's own report of the exit follows it)
    errors = [line for line in node0.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.fullmatch(  # gloo says "reset" or "closed", as the timing goes
        r"distllm train: error: rank 0 lost contact with another process of this job \(Connection \w+ by peer\): "
        r"did it crash or get killed\? Its own log says why; run the same command again to resume from the newest "
        r"committed checkpoint", errors[0]), node0.stderr
    assert "[rank0]" not in node0.stderr


@pytest.mark.parametrize("overrides,message", [
    (["--train.global_batch_size=6"],
     "train.global_batch_size (6) must be divisible by train.micro_batch_size x processes (4 x 2 = 8); change "
     "one, or leave train.micro_batch_size unset (null) to derive it"),
    (["--distributed.deepspeed_config={ds}"],
     "sets gradient_accumulation_steps = 3, but the distllm config gives 4"),
])
def test_inconsistent_settings_stop_before_training_with_one_message(dist_runs, tmp_path, overrides, message):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_accumulation_steps": 3, "zero_optimization": {"stage": 2}}))
    run = _run(dist_runs, f"bad-{len(overrides[0])}", extra=[o.format(ds=ds) for o in overrides])
    assert run.proc.returncode != 0
    errors = _errors(run.proc.stderr)
    assert len(errors) == 1 and message in errors[0], run.proc.stderr
    assert "[rank0]" not in run.proc.stderr and "[rank1]" not in run.proc.stderr  # no worker traceback
    assert not (run.dir / "metrics.jsonl").exists()
    shutil.rmtree(run.dir, ignore_errors=True)
