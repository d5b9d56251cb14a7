"""The token selection of an idle layer, written once for every model family (torch).

  q_cls = xn[:,0] Wq + bq
  official: k = xn Wk + bk;  score_j = (q_cls · k_j) / H       (mean over heads of q_cls,h · k_j,h)
  folded:   score_j = xn_j · w,  w = Wkᵀ q_cls = xn_0 (Wqᵀ Wk) + bq Wk   (the same top-K, no keys)
  idx = [0, topk(score, K) + 1]                                 (CLS first, then patch tokens)
The folded score drops q_cls·bk, which is the same for every token, so both rank alike. The
selected rows are gathered, computed by the family's block and scattered back out of place:
the unselected tokens pass through unchanged. Constant K, TopK + GatherElements +
ScatterElements: the same code runs eagerly and exports to ONNX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from idle_export.model.config import SCORE_MODES


def select_tokens(xn: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                  num_heads: int, keep: int, score_mode: str = "official"
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(idx [B, K+1] int64, CLS first; keys [B, N, C] of every token in the official mode, else
    None; scores [B, N-1]) of the normed tokens `xn` [B, N, C] for a fused qkv projection
    ([3C, C] weight, [3C] bias or None)."""
    c = xn.shape[-1]
    wq, wk = qkv_weight[:c], qkv_weight[c : 2 * c]
    bq, bk = (None, None) if qkv_bias is None else (qkv_bias[:c], qkv_bias[c : 2 * c])
    if score_mode == "official":
        q_cls = F.linear(xn[:, :1], wq, bq)  # [B, 1, C]
        keys = F.linear(xn, wk, bk)  # [B, N, C]
        # mean over heads of q_h·k_h == (q·k) / H
        scores = torch.matmul(q_cls, keys[:, 1:].transpose(1, 2)).squeeze(1) / num_heads
    elif score_mode == "folded":
        # q·(Wk xn_j + bk) = (Wkᵀ q)·xn_j + q·bk: the last term is the same for every token,
        # so ranking by xn_j·(Wkᵀ q) keeps the same top-K without any keys.
        # One GEMV per sample: w = xn_0 (Wqᵀ Wk) + bq Wk, the query folded into the key weight
        # ([C, C], a constant the runtimes and the export targets' passes fold).
        keys = None
        w = F.linear(xn[:, :1], wk.t() @ wq, None if bq is None else bq @ wk)  # [B, 1, C]
        scores = torch.matmul(w, xn[:, 1:].transpose(1, 2)).squeeze(1)
    else:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}")
    top = torch.topk(scores, keep, dim=1, largest=True, sorted=True).indices
    idx = torch.cat([torch.zeros_like(top[:, :1]), top + 1], dim=1)
    return idx, keys, scores


def row_index(idx: torch.Tensor, batch, width: int) -> torch.Tensor:
    """The [B, K+1] token indices as a [B, K+1, C] index for gather_rows / scatter_rows."""
    return idx.unsqueeze(-1).expand(batch, idx.shape[1], width)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The selected tokens of x [B, N, C] (index from row_index)."""
    return torch.gather(x, 1, index)


def scatter_rows(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x with the selected tokens replaced by `rows`, out of place; the others unchanged."""
    return torch.scatter(x, 1, index, rows)
