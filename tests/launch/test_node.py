"""launch/slurm/node.sh without Slurm: two "nodes" on 127.0.0.1, each started the way srun starts
it (SLURM_NODEID, SLURM_NNODES, MASTER_ADDR/PORT from train.sbatch), rendezvous and train one
2-process job through `accelerate launch`: DDP with launch/accelerate/multi_node.yaml, and DeepSpeed
ZeRO-2 with launch/accelerate/zero2.yaml (one launcher per node: deepspeed_multinode_launcher
standard). The torchrun path runs under a real Slurm in test_slurm.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distllm.config import save_config

REPO = Path(__file__).resolve().parents[2]
NODE = REPO / "launch" / "slurm" / "node.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("accelerate_config, engine", [("multi_node.yaml", "DDP"), ("zero2.yaml", "DeepSpeed ZeRO-2")])
def test_two_nodes_rendezvous_and_train_through_accelerate(accelerate_config, engine, tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config, config)
    env = {
        **os.environ,
        "SLURM_NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "1",
        "LAUNCHER": "accelerate", "ACCELERATE_CONFIG": str(REPO / "launch" / "accelerate" / accelerate_config),
        "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
    }
    nodes = [
        subprocess.Popen([str(NODE), "train", str(config), "--train.micro_batch_size=2", "--train.max_steps=6"],
                         env={**env, "SLURM_NODEID": str(rank)}, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    assert "node 1/2, 1 process(es), rendezvous 127.0.0.1" in outputs[1]
    assert f"2 process(es) on cpu, {engine}" in outputs[0], outputs[0][-3000:]  # one job of 2 ranks, not 2 of 1
    assert (Path(tiny_config.run.dir) / "checkpoints" / "step_000006" / "COMPLETE").is_file()
