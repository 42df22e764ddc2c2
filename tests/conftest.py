"""Shared fixtures: a tiny offline corpus, a prepared data directory, and a tiny run config.

Nothing here touches the network: the Hugging Face libraries run offline, and ``datasets``
caches into a temporary directory that is removed at exit (never ~/.cache).
"""

import atexit
import importlib
import inspect
import os
import shutil
import subprocess
import tempfile
import uuid

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
_HF_CACHE = tempfile.mkdtemp(prefix="distllm-test-hf-")
os.environ["HF_DATASETS_CACHE"] = _HF_CACHE
os.environ["DISTLLM_CACHE_DIR"] = _HF_CACHE  # the measured CPU peak is cached here, not in ~/.cache
atexit.register(shutil.rmtree, _HF_CACHE, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from distllm.config import Config, from_dict  # noqa: E402
from tiny_data import TINY_VOCAB, tiny_data_config  # noqa: E402,F401  (tests import them from tiny_data)

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA GPU: skipped (and reported as such) without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

TINY_MODULES = (
    "argparse", "ast", "calendar", "collections", "copy", "csv", "difflib", "getopt", "gettext", "heapq",
    "inspect", "io", "itertools", "json", "logging", "operator", "optparse", "os", "pickle", "pprint",
    "random", "re", "sched", "secrets", "shutil", "socket", "statistics", "string", "struct", "subprocess",
    "tempfile", "timeit", "tokenize", "typing", "unittest", "uuid", "weakref", "hmac", "ipaddress",
)  # fmt: skip
UNICODE_DOC = (
    "Unicode sampler\n\nGrüße aus Köln — naïve café, façade, Ærø.\nΚαλημέρα κόσμε. Привет, мир!\n"
    "日本語のテキストと中文文本。한국어 문장.\nمرحبا بالعالم · שלום עולם\nEmoji: 🦙🚀👩‍👩‍👧 ✓ ∑ ∞ ≠\n"
    "Combining: e\u0301 a\u0308 n\u0303; zero\u200bwidth; tabs\tand   runs of    spaces.\n"
    "A document may mention <|endoftext|> literally without ending.\n"
)


def module_document(name: str, max_chars: int = 2000) -> str:
    """A deterministic, natural-ish document: a stdlib module's docstring and its members' docstrings."""
    module = importlib.import_module(name)
    parts = [f"Module {name}", inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        obj = getattr(module, attr)
        if attr.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) == name and (doc := inspect.getdoc(obj)):
            parts.append(f"{attr}: {doc}")
        if sum(map(len, parts)) >= max_chars:
            break
    return "\n\n".join(p for p in parts if p)[:max_chars].rstrip() + "\n"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A directory of 40 small .txt documents (39 stdlib docstring documents + one multilingual one)."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    for i, name in enumerate(TINY_MODULES):
        (root / f"doc_{i:02d}_{name}.txt").write_text(module_document(name), encoding="utf-8")
    (root / f"doc_{len(TINY_MODULES):02d}_unicode.txt").write_text(UNICODE_DOC, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def prepared_data(tiny_corpus, tmp_path_factory):
    """Path of a data directory prepared from ``tiny_corpus`` (vocab 512). Read-only: copy it to modify."""
    from distllm.data.prepare import prepare

    data_dir = tmp_path_factory.mktemp("prepared_data")
    prepare(tiny_data_config(tiny_corpus, data_dir))
    return data_dir


@pytest.fixture
def tiny_config(tmp_path, tiny_corpus, prepared_data) -> Config:
    """A validated Config for a tiny model training for 20 steps on ``prepared_data``."""
    return from_dict(
        {
            "run": {"dir": str(tmp_path / "run")},
            "data": {"source": str(tiny_corpus), "dir": str(prepared_data), "seq_len": 32, "val_fraction": 0.1},
            "tokenizer": {"vocab_size": TINY_VOCAB},
            "model": {"n_layers": 2, "n_heads": 2, "d_model": 64, "vocab_size": TINY_VOCAB, "max_seq_len": 64},
            "train": {
                "micro_batch_size": 4,
                "global_batch_size": 4,
                "max_steps": 20,
                "eval_every": 10,
                "eval_batches": 2,
            },
            "optim": {"warmup_steps": 2},
            "logging": {"tensorboard": False, "progress": False},
        }
    ).validate()


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs("96k")`` -> a directory on a fresh tmpfs of that size: a real full disk to
    write into. Needs root (skipped otherwise); unmounted after the test."""
    mounted = []

    def mount(size: str):
        mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        mnt.mkdir()
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("needs root to mount a small tmpfs")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount tmpfs: {r.stderr.decode().strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="session")
def dist_runs(tmp_path_factory, prepared_data):
    """Shared real multi-process runs (see tests/distributed_runs.py), made on first use."""
    from distributed_runs import Runs

    return Runs(tmp_path_factory.mktemp("dist_runs"), prepared_data)
