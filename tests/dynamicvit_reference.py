"""An independent DynamicViT eval forward from the paper (Rao et al., "DynamicViT: Efficient
Vision Transformers with Dynamic Token Sparsification", NeurIPS 2021, Sec. 3.2 and 3.4): one
image at a time, float64, sharing no code with idle_export.model.

Paper: before stage s the prediction module sees the N current patch tokens,
  z_i^local = MLP(x_i) (its first half), z^global = Agg(MLP(x), D) = Σ_j D_j z_j / Σ_j D_j
  (second half; at inference every surviving token has D_j = 1, so a plain mean),
  π_i = Softmax(MLP([z_i^local, z^global])) ∈ R², π_i,0 the keep probability;
at inference the ρ^s·N₀ tokens of largest π_i,0 (N₀ the initial count, ρ the keep rate) are
kept and the rest discarded, before the stage's blocks run. Kept tokens are reported as
original patch numbers."""

from __future__ import annotations

import torch

from tests.evit_reference import _gelu, _ln, as_float64, attention, embed, mlp


def keep_probability(sd: dict, s: int, tokens: torch.Tensor) -> list[float]:
    """π_i,0 of predictor s for each row of tokens [N, C]."""
    p = f"score_predictor.{s}."
    z = _gelu(_ln(tokens, sd[p + "in_conv.0.weight"], sd[p + "in_conv.0.bias"], eps=1e-5)
              @ sd[p + "in_conv.1.weight"].T + sd[p + "in_conv.1.bias"])
    half = z.shape[1] // 2
    z_global = z[:, half:].sum(dim=0) / z.shape[0]
    probs = []
    for i in range(z.shape[0]):
        h = torch.cat([z[i, :half], z_global])
        for layer in (0, 2):
            h = _gelu(sd[p + f"out_conv.{layer}.weight"] @ h + sd[p + f"out_conv.{layer}.bias"])
        logits = sd[p + "out_conv.4.weight"] @ h + sd[p + "out_conv.4.bias"]
        e = torch.exp(logits - logits.max())
        probs.append(float(e[0] / e.sum()))
    return probs


def dynamicvit_reference(sd: dict, image: torch.Tensor, *, depth: int, num_heads: int,
                         keep_rate: float, pruning_loc):
    """Logits [num_classes] and {layer: kept original ids, most likely kept first}."""
    sd = as_float64(sd)
    x = embed(sd, image.double())
    n0 = x.shape[0] - 1
    ids = list(range(n0))
    kept = {}
    for layer in range(depth):
        if layer in pruning_loc:
            s = list(pruning_loc).index(layer)
            keep = int(n0 * keep_rate ** (s + 1))
            pi = keep_probability(sd, s, x[1:])
            top = sorted(range(len(ids)), key=lambda j: -pi[j])[:keep]
            ids = [ids[j] for j in top]
            kept[layer] = ids
            x = torch.stack([x[0]] + [x[j + 1] for j in top])
        p = f"blocks.{layer}."
        x = x + attention(sd, p, x, num_heads)[0]
        x = x + mlp(sd, p, x)
    x = _ln(x, sd["norm.weight"], sd["norm.bias"])
    return sd["head.weight"] @ x[0] + sd["head.bias"], kept
