"""DeepSpeed outside the tested range is refused at start with one line (its internals are version-specific)."""

import deepspeed
import pytest

from distllm import deepspeed_fence
from distllm.errors import ConfigError


def test_the_installed_deepspeed_is_in_the_tested_range():
    deepspeed_fence.check_version()


@pytest.mark.parametrize("version", ["0.16.9", "0.20.0", "1.0.0", "garbage"])
def test_other_versions_are_refused_naming_both(monkeypatch, version):
    monkeypatch.setattr(deepspeed, "__version__", version)
    with pytest.raises(ConfigError, match=rf"DeepSpeed {version} is installed, but distllm supports DeepSpeed "
                                          r">=0\.19,<0\.20.*pip install 'deepspeed>=0\.19,<0\.20'"):
        deepspeed_fence.check_version()


def test_only_the_fence_touches_deepspeed_internals():
    """Private attributes of DeepSpeed objects appear in deepspeed_fence.py and nowhere else."""
    from pathlib import Path

    import distllm

    private = ("optimizer.optimizer", "fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat",
               "_lazy_init_hp_params", "ds_shape", "ds_id")
    for path in Path(distllm.__file__).parent.rglob("*.py"):
        if path.name == "deepspeed_fence.py":
            continue
        text = path.read_text()
        assert not [p for p in private if p in text], path
