"""Numpy reference of the fused idle-layer ops (the ground truth of the kernel tests).

Scores are computed in float64 from the given values; ties are broken towards the lower token
index (a stable sort of the negated scores), as ONNX Runtime's TopK does.
"""

from __future__ import annotations

import numpy as np

from .spec import select_output_shapes, validate_scatter


def folded_scores(xn: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Folded patch scores [B, N-1]: ``score[b, j-1] = xn[b, j] · w[b]`` for j = 1..N-1."""
    xn = np.asarray(xn)
    w = np.asarray(w)
    if xn.ndim != 3 or w.shape != (xn.shape[0], xn.shape[2]):
        raise ValueError(f"xn must be [B, N, C] and w [B, C], got {xn.shape} and {w.shape}")
    return np.einsum("bnc,bc->bn", xn[:, 1:].astype(np.float64), w.astype(np.float64))


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions [B, K] of the K largest scores per row, descending, lower position on ties."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")
    return order[:, :k].astype(np.int64)


def gather_rows(t: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``t[b, idx[b]]`` for every sample: [B, S, C]."""
    return np.take_along_axis(np.asarray(t), np.asarray(idx)[:, :, None], axis=1)


def idle_select_reference(xn: np.ndarray, x: np.ndarray, w: np.ndarray, k: int
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IdleSelect: (idx int64 [B, K+1] with CLS first, xn_sel [B, K+1, C], x_sel [B, K+1, C])."""
    xn, x = np.asarray(xn), np.asarray(x)
    if xn.shape != x.shape or xn.ndim != 3:
        raise ValueError(f"xn and x must both be [B, N, C], got {xn.shape} and {x.shape}")
    b, n, c = xn.shape
    select_output_shapes(b, n, c, k)
    top = topk_indices(folded_scores(xn, w), k) + 1
    idx = np.concatenate([np.zeros((b, 1), np.int64), top], axis=1)
    return idx, gather_rows(xn, idx), gather_rows(x, idx)


def scatter_reference(x: np.ndarray, idx: np.ndarray, res: np.ndarray) -> np.ndarray:
    """IdleScatter: a copy of x with ``out[b, idx[b, p]] = res[b, p]`` (a later p wins)."""
    x, idx, res = np.asarray(x), np.asarray(idx), np.asarray(res)
    if x.ndim != 3 or idx.ndim != 2 or res.shape != (*idx.shape, x.shape[2]) \
            or idx.shape[0] != x.shape[0]:
        raise ValueError(f"expected x [B, N, C], idx [B, S], res [B, S, C]; got {x.shape}, "
                         f"{idx.shape}, {res.shape}")
    b, n, c = x.shape
    validate_scatter(b, n, c, idx.shape[1])
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"idx must lie in [0, {n - 1}]")
    out = x.copy()
    for p in range(idx.shape[1]):
        out[np.arange(b), idx[:, p]] = res[:, p]
    return out


def rank_score_gap(scores: np.ndarray, idx_a: np.ndarray, idx_b: np.ndarray) -> float:
    """Largest |score| difference between two selections (patch parts, CLS column dropped)
    compared rank by rank: 0 when equal; small when they differ only by swapping near-ties."""
    s = np.asarray(scores, dtype=np.float64)
    sa = np.take_along_axis(s, np.asarray(idx_a)[:, 1:] - 1, axis=1)
    sb = np.take_along_axis(s, np.asarray(idx_b)[:, 1:] - 1, axis=1)
    return float(np.abs(sa - sb).max()) if sa.size else 0.0
