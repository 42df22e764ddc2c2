"""Which source each position of a mixed sample stream comes from, by weight, without state.

Position ``j`` of the mixed stream (counted over the whole run, across global batches and
epochs) is taken from source ``k`` when ``u_j = frac(j / phi)`` falls in the k-th interval of
the cumulative weights. ``u_j`` is the golden-ratio Weyl sequence, the most uniform sequence of
its kind (its discrepancy grows like log n), so every source's share of any stretch of the
stream is within a few samples of its weight, and sources interleave finely. It is computed
in exact 64-bit integer arithmetic: the same on every machine, process and world size, and a
function of ``j`` alone, so resuming needs nothing but the position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd


class MixSchedule:
    """Source index for positions of the mixed stream; ``weights`` are normalised (all > 0)."""

    def __init__(self, weights: Sequence[float]):
        if not weights or any(not (w > 0) for w in weights):
            raise ValueError(f"mixing weights must be positive, got {list(weights)}")
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        cumulative = np.cumsum(self.weights)[:-1]
        # u < bounds[0] -> source 0, bounds[0] <= u < bounds[1] -> source 1, ...
        self._bounds = np.array([min(int(c * 2.0**64), 2**64 - 1) for c in cumulative], dtype=np.uint64)

    def sources(self, start: int, count: int) -> np.ndarray:
        """Source of positions ``[start, start + count)``: int64 (count,)."""
        j = np.arange(start, start + count, dtype=np.uint64)
        return np.searchsorted(self._bounds, j * GOLDEN, side="right").astype(np.int64)
