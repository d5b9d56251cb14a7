"""An independent EViT eval forward from the paper (Liang et al., "Not All Patches are What You
Need", ICLR 2022, Sec. 3): one image at a time, float64, per-head loops and Python sorting,
sharing no code with idle_export.model.

Paper, per token-reorganization layer: the attentiveness of token j is the CLS attention
averaged over heads, a_j = (1/H) Σ_h softmax(q_cls·k_j / √d)_h; the top ⌈κ(N-1)⌉ tokens stay
(κ the keep rate), the inattentive ones are fused into x_fused = Σ_{j inattentive} a_j x_j;
this happens between the MHSA and the FFN of the layer. Kept tokens are reported as original
patch numbers; the token fused at the d-th reorganization is -(d+1)."""

from __future__ import annotations

import math

import torch


def _ln(v, w, b, eps=1e-6):
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    return (v - mu) / torch.sqrt(var + eps) * w + b


def _gelu(v):
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def embed(sd: dict, image: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """[CLS, patches in row-major order] + position embedding: each patch flattened (channel,
    row, column) times the projection, float64."""
    w, b = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
    ch, hgt, wid = image.shape
    gh, gw = hgt // patch, wid // patch
    patches = image.reshape(ch, gh, patch, gw, patch).permute(1, 3, 0, 2, 4).reshape(gh * gw, -1)
    tokens = patches @ w.reshape(w.shape[0], -1).T + b
    return torch.cat([sd["cls_token"][0], tokens]) + sd["pos_embed"][0]


def as_float64(sd: dict) -> dict:
    return {k: v.double() for k, v in sd.items()}


def attention(sd: dict, p: str, x: torch.Tensor, num_heads: int):
    """MHSA of block prefix p over all rows of x: (output before the residual, per-head maps)."""
    c = x.shape[1]
    hd = c // num_heads
    xn = _ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    w, b = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
    q, k, v = xn @ w[:c].T + b[:c], xn @ w[c:2 * c].T + b[c:2 * c], xn @ w[2 * c:].T + b[2 * c:]
    heads, maps = [], []
    for h in range(num_heads):
        sl = slice(h * hd, (h + 1) * hd)
        a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hd), dim=-1)
        maps.append(a)
        heads.append(a @ v[:, sl])
    out = torch.cat(heads, dim=1) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
    return out, maps


def mlp(sd: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    hidden = _gelu(_ln(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"]) @ sd[p + "mlp.fc1.weight"].T
                   + sd[p + "mlp.fc1.bias"])
    return hidden @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]


def evit_reference(sd: dict, image: torch.Tensor, *, depth: int, num_heads: int, keep_rate: float,
                   drop_loc, fuse: bool):
    """Logits [num_classes] and {layer: kept original ids, most attentive first}."""
    sd = as_float64(sd)  # a no-op when the caller converted once
    x = embed(sd, image.double())
    ids = list(range(x.shape[0] - 1))  # original id of each non-CLS row
    kept, d = {}, 0
    for layer in range(depth):
        p = f"blocks.{layer}."
        out, maps = attention(sd, p, x, num_heads)
        x = x + out
        n_rest = x.shape[0] - 1
        keep = math.ceil(keep_rate * n_rest)
        if layer in drop_loc and keep_rate < 1 and keep < n_rest:
            a = [sum(float(m[0, j + 1]) for m in maps) / num_heads for j in range(n_rest)]
            order = sorted(range(n_rest), key=lambda j: -a[j])
            top, rest = order[:keep], order[keep:]
            kept[layer] = [ids[j] for j in top]
            rows = [x[0]] + [x[j + 1] for j in top]
            ids = [ids[j] for j in top]
            if fuse:
                rows.append(sum(a[j] * x[j + 1] for j in rest))
                d += 1
                ids.append(-d)
            x = torch.stack(rows)
        x = x + mlp(sd, p, x)
    x = _ln(x, sd["norm.weight"], sd["norm.bias"])
    return sd["head.weight"] @ x[0] + sd["head.bias"], kept
