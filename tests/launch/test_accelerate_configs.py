"""The shipped ``launch/accelerate/*.yaml`` files: loaded with Accelerate's own config loader, each
sets what its name promises and nothing that belongs to the distllm config (precision, batch
sizes, clipping, accumulation), and the DeepSpeed fields reach the workers as Accelerate's
environment variables (which distllm's distributed.py reads).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "launch" / "accelerate"

DDP = DistributedType.MULTI_GPU
DS = DistributedType.DEEPSPEED
# file -> (distributed_type, use_cpu, num_machines, deepspeed_config)
EXPECTED = {
    "single_process.yaml": (DistributedType.NO, False, 1, {}),
    "single_gpu.yaml": (DistributedType.NO, False, 1, {}),
    "ddp.yaml": (DDP, False, 1, {}),
    "cpu_ddp.yaml": (DDP, True, 1, {}),
    "multi_node.yaml": (DDP, False, 2, {}),
    "zero1.yaml": (DS, False, 1, {"zero_stage": 1, "offload_optimizer_device": "none", "offload_param_device": "none"}),
    "zero2.yaml": (DS, False, 1, {"zero_stage": 2, "offload_optimizer_device": "none", "offload_param_device": "none"}),
    "zero3.yaml": (DS, False, 1, {"zero_stage": 3, "zero3_init_flag": True, "offload_optimizer_device": "none",
                                  "offload_param_device": "none"}),
    "zero3_offload.yaml": (DS, False, 1, {"zero_stage": 3, "zero3_init_flag": True, "offload_optimizer_device": "cpu",
                                          "offload_param_device": "cpu"}),
}
# What distllm hands to DeepSpeed itself; an accelerate config must not set it.
OWNED_BY_DISTLLM = {"gradient_accumulation_steps", "gradient_clipping", "deepspeed_config_file",
                    "train_micro_batch_size_per_gpu", "train_batch_size", "mixed_precision", "bf16", "fp16"}


def load(name: str) -> ClusterConfig:
    return load_config_from_file(str(CONFIG_DIR / name))


def test_every_shipped_config_is_checked():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_sets_what_its_name_promises(name):
    cfg = load(name)
    distributed_type, use_cpu, num_machines, deepspeed = EXPECTED[name]
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type == distributed_type
    assert cfg.use_cpu is use_cpu
    assert cfg.num_machines == num_machines
    assert cfg.num_processes >= num_machines  # -1 would make `accelerate launch` demand --num_processes
    assert {k: v for k, v in cfg.deepspeed_config.items() if k != "deepspeed_multinode_launcher"} == deepspeed
    if deepspeed:  # one torchrun per node across nodes (our Slurm script), never pdsh over ssh
        assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
    if name == "cpu_ddp.yaml":  # MULTI_GPU + use_cpu is what makes `accelerate launch` start 2 CPU workers
        assert cfg.num_processes == 2


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_leaves_precision_batch_clipping_and_accumulation_to_distllm(name):
    cfg = load(name)
    assert cfg.mixed_precision in (None, "no")  # "no" = not set: distllm's train.precision decides
    assert not OWNED_BY_DISTLLM & set(cfg.deepspeed_config)
    text = (CONFIG_DIR / name).read_text()
    for key in OWNED_BY_DISTLLM - {"mixed_precision"}:
        assert key not in text


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_fields_are_accelerate_launch_options(name):
    """Nested DeepSpeed fields are applied by `accelerate launch` as the options of the same name;
    a misspelt one would be silently ignored."""
    for key, value in load(name).deepspeed_config.items():
        args, unknown = launch_command_parser().parse_known_args([f"--{key}", str(value), "train.py"])
        assert not unknown and str(getattr(args, key)) == str(value), key


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_says_how_to_launch_it(name):
    header = (CONFIG_DIR / name).read_text().split("\ncompute_environment")[0]
    assert f"accelerate launch --config_file launch/accelerate/{name}" in header
    assert "-m distllm train" in header


def test_multi_node_config_marks_the_fields_to_edit():
    lines = (CONFIG_DIR / "multi_node.yaml").read_text().splitlines()
    for key in ("num_machines", "num_processes", "machine_rank", "main_process_ip", "main_process_port"):
        line = next(line for line in lines if line.startswith(f"{key}:"))
        assert "# EDIT" in line, line
    cfg = load("multi_node.yaml")
    assert cfg.rdzv_backend == "static" and cfg.same_network  # rendezvous on main_process_ip:port


def test_deepspeed_fields_reach_the_workers(tmp_path):
    """`accelerate launch` turns zero3_offload.yaml into the environment distllm reads (one CPU process)."""
    script = tmp_path / "show_env.py"
    script.write_text("import json, os\nprint('ENV', json.dumps(dict(os.environ)))\n")
    r = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / "zero3_offload.yaml"),
         "--num_processes", "1", str(script)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    env = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("ENV "))[4:])
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "cpu"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "cpu"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    for unset in ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING",
                  "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        assert unset not in env
