"""The computed permutation behind the global order: a bijection, keyed, O(1) memory."""

import numpy as np
import pytest

from distllm.data.order import Permutation, derive_key


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 255, 1000, 4097, 65537])
def test_is_a_permutation_of_range_n(n):
    order = np.asarray(Permutation(n, key=derive_key(3, 0)))
    assert order.dtype == np.int64 and order.shape == (n,)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))


def test_slices_and_single_positions_agree_with_the_whole():
    perm = Permutation(1000, key=11)
    whole = np.asarray(perm)
    np.testing.assert_array_equal(perm[100:228], whole[100:228])
    np.testing.assert_array_equal(perm[np.array([999, 0, 500])], whole[[999, 0, 500]])
    assert perm[17] == whole[17]
    with pytest.raises(IndexError):
        perm[np.array([1000])]


def test_deterministic_and_keyed():
    a, b = np.asarray(Permutation(5000, key=derive_key(1, 0))), np.asarray(Permutation(5000, key=derive_key(1, 0)))
    np.testing.assert_array_equal(a, b)  # the same (seed, epoch) on every process
    for other in (derive_key(2, 0), derive_key(1, 1)):  # another seed, another epoch
        c = np.asarray(Permutation(5000, key=other))
        assert (a == c).mean() < 0.01


def test_shuffles_well():
    n = 10_000
    order = np.asarray(Permutation(n, key=7))
    assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.05  # no trend
    assert (np.diff(order) == 1).mean() < 0.01  # neighbours do not stay neighbours
    firsts = [Permutation(n, key=k)[0] for k in range(400)]  # where an epoch starts, over keys
    counts = np.bincount(np.asarray(firsts) * 10 // n, minlength=10)
    assert counts.min() > 20 and counts.max() < 60  # ~40 per decile


def test_memory_does_not_grow_with_n():
    """The order of 1e12 samples costs a few integers; no stored permutation."""
    small, huge = Permutation(10, key=5), Permutation(10**12, key=5)
    ids = huge[10**12 - 3 : 10**12]
    assert ids.shape == (3,) and ids.max() < 10**12 and len(set(ids.tolist())) == 3
    for perm in (small, huge):
        assert not any(isinstance(v, np.ndarray) and v.size > 1 for v in vars(perm).values())
    assert len(vars(small)) == len(vars(huge))
