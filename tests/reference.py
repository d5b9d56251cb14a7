"""An independent, plainly written IdleViT eval forward: one image at a time, float64, explicit
per-head loops and Python sorting. Written from the paper's description and the authors' vit.py
(`test=True` path), sharing no code with idle_export.model."""

from __future__ import annotations

import math

import torch


def _ln(v, w, b, eps=1e-6):
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    return (v - mu) / torch.sqrt(var + eps) * w + b


def _gelu(v):
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def reference_forward(sd: dict, *, depth: int, num_heads: int, k_by_layer: dict[int, int],
                      image: torch.Tensor, patch: int = 16):
    """Logits [num_classes] and {layer: sorted list of kept patch indices (0-based)}."""
    sd = {k: v.double() for k, v in sd.items()}
    img = image.double()
    w_pe, b_pe = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
    c = w_pe.shape[0]
    hd = c // num_heads
    _, hgt, wid = img.shape
    tokens = []
    for r in range(0, hgt, patch):  # patches in row-major order, as Conv2d + flatten gives
        for q in range(0, wid, patch):
            piece = img[:, r:r + patch, q:q + patch]
            tokens.append((w_pe * piece).sum(dim=(1, 2, 3)) + b_pe)
    x = torch.stack([sd["cls_token"][0, 0]] + tokens) + sd["pos_embed"][0]
    n = x.shape[0]
    kept = {}
    for layer in range(depth):
        p = f"blocks.{layer}."
        xn = _ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        wqkv, bqkv = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
        wq, wk, wv = wqkv[:c], wqkv[c:2 * c], wqkv[2 * c:]
        bq, bk, bv = bqkv[:c], bqkv[c:2 * c], bqkv[2 * c:]
        if layer in k_by_layer:
            q_cls = wq @ xn[0] + bq
            keys = xn[1:] @ wk.T + bk  # [n-1, c]
            per_head = [keys[:, h * hd:(h + 1) * hd] @ q_cls[h * hd:(h + 1) * hd]
                        for h in range(num_heads)]
            scores = (sum(per_head) / num_heads).tolist()
            order = sorted(range(n - 1), key=lambda j: -scores[j])[:k_by_layer[layer]]
            kept[layer] = sorted(order)
            sel = [0] + [j + 1 for j in order]
        else:
            sel = list(range(n))
        xs = xn[sel]
        q, k, v = xs @ wq.T + bq, xs @ wk.T + bk, xs @ wv.T + bv
        heads = []
        for h in range(num_heads):
            sl = slice(h * hd, (h + 1) * hd)
            a = torch.softmax((q[:, sl] @ k[:, sl].T) * hd ** -0.5, dim=-1)
            heads.append(a @ v[:, sl])
        attn = torch.cat(heads, dim=1) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        res = x[sel] + attn
        hidden = _gelu(_ln(res, sd[p + "norm2.weight"], sd[p + "norm2.bias"]) @ sd[p + "mlp.fc1.weight"].T
                       + sd[p + "mlp.fc1.bias"])
        res = res + hidden @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = x.clone()
        x[sel] = res
    x = _ln(x, sd["norm.weight"], sd["norm.bias"])
    return sd["head.weight"] @ x[0] + sd["head.bias"], kept
