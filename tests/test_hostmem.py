"""distllm.hostmem: on CPU, tensors of 4 MiB and more get their own mappings, so freed memory leaves the RSS,
and the distllm command asks torch for huge pages.

Each case runs in a fresh process (glibc's dynamic threshold and torch's huge-page setting are
per-process state). After a 20 MB tensor is freed, glibc's default threshold has grown past 5 MB,
so a 5 MB tensor comes from the heap; with distllm's fixed threshold it is mapped on its own
(``mallinfo2().hblks`` counts the mappings).
"""

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")

PROBE = r"""
import ctypes, json, sys
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
how, result = sys.argv[1], None
if how == "function":
    from distllm import hostmem
    result = hostmem.set_mmap_threshold()
elif how == "setup":  # what `distllm train` does on CPU
    from distllm import distributed
    from distllm.config import from_dict
    distributed.setup(from_dict({"model": {"n_layers": 1, "n_heads": 2, "d_model": 32, "vocab_size": 256,
                                           "max_seq_len": 16}, "tokenizer": {"vocab_size": 256},
                                 "data": {"seq_len": 16}, "train": {"device": "cpu", "micro_batch_size": 1,
                                                                    "global_batch_size": 1}}))
big = torch.ones(5_000_000)  # 20 MB: mapped, and freeing it raises glibc's dynamic threshold
del big
before = libc.mallinfo2().hblks
t = torch.ones(1_250_000)  # 5 MB
mapped = libc.mallinfo2().hblks > before
print(json.dumps({"result": result, "mapped": mapped}))
"""


# the allocator settings of this environment, which each probe starts without
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "DISTLLM_MMAP_THRESHOLD", "THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES")


def run(script: str, arg: str, **env) -> dict:
    """Run ``script`` in a fresh process with ``env`` added; the JSON object it printed last."""
    e = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, env=e, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def probe(how: str, **env) -> dict:
    return run(PROBE, how, **env)


def test_glibc_default_serves_a_5mb_tensor_from_the_heap():
    assert probe("none") == {"result": None, "mapped": False}  # the behaviour distllm changes


def test_fixed_threshold_maps_a_5mb_tensor_on_its_own():
    assert probe("function") == {"result": 4 << 20, "mapped": True}


def test_training_setup_on_cpu_fixes_the_threshold():
    assert probe("setup")["mapped"] is True


def test_zero_or_glibc_own_setting_leaves_glibc_alone():
    assert probe("function", DISTLLM_MMAP_THRESHOLD="0") == {"result": None, "mapped": False}
    assert probe("function", MALLOC_MMAP_THRESHOLD_="33554432")["result"] is None


def test_a_bad_value_is_a_config_error(monkeypatch):
    from distllm import hostmem
    from distllm.errors import ConfigError

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("DISTLLM_MMAP_THRESHOLD", "4MB")
    with pytest.raises(ConfigError, match="DISTLLM_MMAP_THRESHOLD must be a number of bytes"):
        hostmem.set_mmap_threshold()


HUGE = r"""
import json, os, sys
if sys.argv[1] == "hostmem-first":
    from distllm import hostmem
    hostmem.enable_huge_pages()
elif sys.argv[1] == "cli-first":  # the distllm command (its config error returns 2 before torch is used)
    from distllm.__main__ import main
    assert main(["eval", "/nonexistent/run.yaml"]) == 2
elif sys.argv[1] == "library":
    import distllm.config, distllm.model  # noqa: F401
import torch

t = torch.ones(16_000_000)  # 64 MB
huge = [int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")]
print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge_kb": huge[0] if huge else 0}))
"""


def huge_probe(order: str, **env) -> dict:
    return run(HUGE, order, **env)


def thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unknown"
    return text.split("[")[1].split("]")[0] if "[" in text else "unknown"


def test_the_distllm_command_asks_torch_for_huge_pages_unless_told_otherwise():
    assert huge_probe("cli-first")["env"] == "1"
    assert huge_probe("hostmem-first", THP_MEM_ALLOC_ENABLE="0")["env"] == "0"  # the environment wins
    assert huge_probe("library")["env"] is None  # importing distllm as a library changes nothing


@pytest.mark.skipif(thp_mode() != "madvise", reason="huge pages on request only where THP is in madvise mode")
def test_large_tensors_get_huge_pages_when_asked_before_torch():
    assert huge_probe("torch-only")["huge_kb"] == 0
    assert huge_probe("hostmem-first")["huge_kb"] > 0


def test_another_allocator_is_left_alone():
    assert probe("function", LD_PRELOAD="/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")["result"] is None
