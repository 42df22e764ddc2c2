"""Host memory on CPU runs: hand memory the process frees back to the system.

glibc serves an allocation from its heap unless it is at least the mmap threshold, and that
threshold is dynamic: it grows to the size of the largest block freed so far (up to 32 MiB). After a
few steps every per-layer tensor (a gathered ZeRO-3 parameter, its gradient, an activation) comes
from the heap, and fragmentation keeps the freed pages resident. On CPU those pages are the
training memory: ZeRO-3's peak RSS on 2 processes was 0.87x DDP's with glibc's default and 0.68x with
a fixed 4 MiB threshold, at the same step time (benchmarks/bench_memory.py, bench_train_step.py).

``DISTLLM_MMAP_THRESHOLD`` (bytes; 0 leaves glibc's default) overrides the threshold, and one set in
glibc's own environment (``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``) is left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 4 << 20  # tensors of 4 MiB and more get their own mapping, unmapped when freed
M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def set_mmap_threshold() -> int | None:
    """Fix glibc's mmap threshold for this process; returns the threshold set, or None if left alone."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
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
