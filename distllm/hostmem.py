"""Host memory on CPU runs: hand memory the process frees back to the system, cheaply.

glibc serves an allocation from its heap unless it is at least the mmap threshold, and that
threshold is dynamic: it grows to the size of the largest block freed so far (up to 32 MiB). After a
few steps every per-layer tensor (a gathered ZeRO-3 parameter, its gradient, an activation) comes
from the heap, and fragmentation keeps the freed pages resident. On CPU those pages are the
training memory: over 8 steps on 2 processes (benchmarks/bench_memory.py, 100.7M parameters),
ZeRO-3's peak RSS wandered between 0.79x and 1.05x DDP's with glibc's threshold and stayed at
0.67-0.69x with a fixed 4 MiB one.

``DISTLLM_MMAP_THRESHOLD`` (bytes; 0 leaves glibc's default) overrides the threshold, and one set in
glibc's own environment (``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``) is left alone.

A mapped tensor starts with no pages, and every 4 KiB page costs a fault when first written: ZeRO-3,
which gathers every parameter twice a step, ran its steps 1.2-1.4x slower with the fixed threshold.
PyTorch can ask for transparent huge pages on its CPU tensors of 2 MiB and more
(``madvise(MADV_HUGEPAGE)``), a fault per 2 MiB: with them, step time with the fixed threshold was
1.05x of without on average (0.96-1.14x over four runs each of DDP and ZeRO-3, a noisy machine).
Torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first allocation, so the ``distllm`` command sets
it before anything imports torch (``distllm``, ``python -m distllm``, ``torchrun -m distllm``,
``accelerate launch -m distllm``); a value in the environment wins (0 turns it off). Importing
distllm as a library changes neither setting until ``distributed.setup`` runs on CPU, and then
only the threshold, for the rest of the process. Under ``LD_PRELOAD`` of another allocator
(jemalloc, tcmalloc, mimalloc) the threshold is left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

MMAP_THRESHOLD = 4 << 20  # tensors of 4 MiB and more get their own mapping, unmapped when freed
M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def set_mmap_threshold() -> int | None:
    """Fix glibc's mmap threshold for this process; returns the threshold set, or None if left alone."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return None  # malloc is not glibc's here
    raw = os.environ.get("DISTLLM_MMAP_THRESHOLD", str(MMAP_THRESHOLD))
    try:
        threshold = int(raw)
    except ValueError:
        threshold = -1
    if threshold < 0:
        from distllm.errors import ConfigError

        raise ConfigError(f"DISTLLM_MMAP_THRESHOLD must be a number of bytes (0 = glibc's default), got {raw!r}")
    if threshold == 0:
        return None
    libc = ctypes.CDLL(None)
    return threshold if libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1 else None


def enable_huge_pages() -> bool:
    """Ask torch for transparent huge pages on CPU tensors of 2 MiB and more (this process and its
    children), if torch is not imported yet."""
    if platform.system() != "Linux" or "torch" in sys.modules:
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return True
