"""What can be checked of the Dockerfile without a Docker engine: the base image's torch satisfies
our floor and the GPU features the model uses, the pinned dependencies agree with pyproject.toml,
the entrypoint forwards signals, and the build context leaves out data, runs and environments.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "launch" / "docker" / "requirements.lock"
TAG = re.compile(r"^pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+\.\d+)-cudnn\d+-(?P<flavour>devel|runtime)$")
FUSED_RMS_NORM_CUDA = Version("2.9")  # torch's fused CUDA RMSNorm backward (distllm/model/kernels.py)


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and not line.startswith("#")]


def base_image() -> str:
    args = {}
    for keyword, rest in instructions():
        if keyword == "ARG" and "=" in rest:
            name, default = rest.split("=", 1)
            args[name] = default
        if keyword == "FROM":
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], rest.split()[0])
    raise AssertionError("no FROM")


def pyproject_requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, deps)}


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"{LOCK.name}: not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_base_image_torch_meets_the_floor_and_the_gpu_features():
    m = TAG.match(base_image())
    assert m, f"base image {base_image()!r} is not an official pytorch/pytorch CUDA tag"
    torch_version = Version(m["torch"])
    assert pyproject_requirements()["torch"].specifier.contains(torch_version)  # SDPA enable_gqa: >= 2.5
    assert torch_version >= FUSED_RMS_NORM_CUDA
    assert m["flavour"] == "devel"  # nvcc: DeepSpeed compiles ops such as CPU Adam (ZeRO offload) at run time


def test_lock_pins_every_dependency_within_the_pyproject_range():
    pins, requirements = lock_pins(), pyproject_requirements()
    missing = sorted(set(requirements) - set(pins))
    assert not missing, f"{missing} not in {LOCK.relative_to(REPO)}: run python launch/docker/lock.py"
    for name, req in requirements.items():
        assert req.specifier.contains(pins[name]), f"{LOCK.name} pins {name}=={pins[name]}, pyproject wants {req}"


def test_lock_keeps_the_base_images_torch_and_no_dev_tools():
    pins = lock_pins()
    assert pins["torch"] == TAG.match(base_image())["torch"]  # pip keeps the image's CUDA build
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert not {canonicalize_name(Requirement(r).name) for r in dev} & set(pins)


def test_dependencies_install_from_the_lock_before_the_source_and_are_checked():
    runs = [rest for keyword, rest in instructions() if keyword == "RUN"]
    copies = [rest for keyword, rest in instructions() if keyword == "COPY"]
    assert "launch/docker/requirements.lock" in copies[0]  # the dependency layer survives source edits
    assert any("pip install --requirement launch/docker/requirements.lock" in r for r in runs)
    install = next(r for r in runs if "pip install --no-deps ." in r)
    assert "pip check" in install


def test_entrypoint_forwards_signals_to_any_command():
    cmds = {keyword: rest for keyword, rest in instructions() if keyword in ("ENTRYPOINT", "CMD", "WORKDIR")}
    entrypoint, cmd = json.loads(cmds["ENTRYPOINT"]), json.loads(cmds["CMD"])  # exec form: PID 1 is the wrapper
    assert entrypoint == [f"{cmds['WORKDIR']}/launch/forward_signals.sh"]
    assert cmd == ["distllm", "--help"]
    assert ("COPY", "launch launch") in instructions()
    script = REPO / "launch" / "forward_signals.sh"
    if shutil.which("git") and (REPO / ".git").exists():
        mode = subprocess.run(["git", "ls-files", "-s", str(script)], cwd=REPO, capture_output=True, text=True).stdout
        assert mode.startswith("100755"), f"forward_signals.sh must be committed executable: {mode!r}"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's patterns exclude ``path`` (or a directory above it)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for p in prefixes:
            if fnmatch.fnmatch(p, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(p.split("/")[-1], pattern[3:])):
                return True
    return False


@pytest.fixture
def ignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_leaves_out_data_runs_and_environments(ignore_patterns):
    for path in ("runs", "runs/debug/checkpoints/step_000300/model.safetensors", "data/debug/train_000.bin",
                 ".venv/bin/python", ".git/HEAD", "distllm/__pycache__/config.cpython-311.pyc",
                 "slurm-logs/distllm-12-node0.log"):
        assert dockerignored(path, ignore_patterns), path


def test_everything_the_dockerfile_copies_is_in_the_build_context(ignore_patterns):
    for keyword, rest in instructions():
        if keyword == "COPY":
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), source
                assert not dockerignored(source, ignore_patterns), f"{source} is excluded by .dockerignore"
