"""K per idle layer as a function of a float32 keep rate: the elastic graph's rule (no torch).

An elastic file (`idle-export onnx --elastic`) takes the keep rate as a float32 scalar input. Its
semantics, identical in Python and in the graph:

  rate(x) = the shortest decimal that round-trips the float32 x (numpy's str, so 0.7 → 0.7)
  K_p(x)  = int(N * rate(x) ** p) in Python floats (model.config.schedule_k), clamped to [1, N]

So every rate written with up to 7 significant digits gives exactly the K that the Python schedule
gives for that decimal. rate(x) rises with x, so K_p is a step function: the graph holds, per
exponent p, the sorted float32 thresholds T_2..T_N (T_k the smallest float32 with K_p ≥ k) and
computes K = 1 + Σ_k [x ≥ T_k] with comparisons and a sum only (no float64, which TensorRT lacks).
Clamping follows: a rate ≤ 0, NaN or below the first step keeps 1 patch token per layer; a rate
≥ 1 (or +inf) keeps all N.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from idle_export.model.config import schedule_k

ONE_BITS = int(np.float32(1.0).view(np.uint32))


def decimal_rate(x: float) -> float:
    """The shortest decimal that round-trips float32(x), as a Python float."""
    return float(str(np.float32(x)))


def elastic_k(num_patches: int, x: float, exponent: int) -> int:
    """K of one idle layer at float32 rate x: the schedule's K at decimal_rate(x), clamped to
    [1, N]. NaN keeps 1."""
    x32 = np.float32(x)
    if np.isnan(x32) or x32 <= 0:
        return 1
    if x32 >= 1:
        return num_patches
    (k,) = schedule_k(num_patches, decimal_rate(x32), (exponent,))
    return min(max(k, 1), num_patches)


@lru_cache(maxsize=32)
def _thresholds(num_patches: int, exponent: int) -> tuple[float, ...]:
    def k_of_bits(bits: int) -> int:
        return elastic_k(num_patches, float(np.uint32(bits).view(np.float32)), exponent)

    out = []
    lo = 1  # smallest positive float32 (subnormal); bits of positive floats sort like the floats
    for k in range(2, num_patches + 1):
        hi = ONE_BITS  # K(1.0) = N ≥ k
        while lo < hi:  # smallest bits in [lo, hi] with K ≥ k; thresholds rise with k
            mid = (lo + hi) // 2
            if k_of_bits(mid) >= k:
                hi = mid
            else:
                lo = mid + 1
        out.append(float(np.uint32(lo).view(np.float32)))
    return tuple(out)


def thresholds(num_patches: int, exponent: int) -> np.ndarray:
    """float32 [N-1]: T_k for k = 2..N, the smallest float32 rate whose K_p is at least k, so
    K_p(x) = 1 + count(x ≥ T)."""
    return np.asarray(_thresholds(num_patches, exponent), dtype=np.float32)


def k_from_thresholds(table: np.ndarray, x: float) -> int:
    """What the graph computes: 1 + the number of thresholds ≤ x (float32 comparisons)."""
    return 1 + int(np.count_nonzero(np.float32(x) >= table))


def min_valid_rate(num_patches: int, exponents, step: float = 0.01) -> float:
    """The smallest rate on a `step` grid at which every idle layer keeps at least one token."""
    i = 1
    while min(schedule_k(num_patches, round(i * step, 10), exponents)) < 1:
        i += 1
    return round(i * step, 10)
