"""An independent, plainly written IdleViT LV-ViT eval forward: one image at a time, float64,
convolutions as explicit shift-and-accumulate loops, BatchNorm with its running statistics,
per-head loops and Python sorting. Written from the authors' lvvit.py (IdleLVViT, `test=True`
path) and read straight from the official-keyed state dict, sharing no code with
idle_export.model.lvvit."""

from __future__ import annotations

import math

import torch


def _ln(v, w, b, eps=1e-5):  # nn.LayerNorm's default eps, which LV-ViT uses
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    return (v - mu) / torch.sqrt(var + eps) * w + b


def _gelu(v):
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def _conv(img, w, b, stride, pad):
    """img [Cin, H, W], w [Cout, Cin, kh, kw] → [Cout, Ho, Wo]: out += w[:, :, dy, dx] · shifted input."""
    c_in, hgt, wid = img.shape
    c_out, _, kh, kw = w.shape
    x = torch.zeros(c_in, hgt + 2 * pad, wid + 2 * pad, dtype=img.dtype)
    x[:, pad:pad + hgt, pad:pad + wid] = img
    ho = (hgt + 2 * pad - kh) // stride + 1
    wo = (wid + 2 * pad - kw) // stride + 1
    out = torch.zeros(c_out, ho, wo, dtype=img.dtype)
    for dy in range(kh):
        for dx in range(kw):
            shifted = x[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
            out += (w[:, :, dy, dx] @ shifted.reshape(c_in, -1)).reshape(c_out, ho, wo)
    if b is not None:
        out += b[:, None, None]
    return out


def _bn(v, sd, name, eps=1e-5):
    mean, var = sd[name + ".running_mean"], sd[name + ".running_var"]
    scale = sd[name + ".weight"] / torch.sqrt(var + eps)
    return (v - mean[:, None, None]) * scale[:, None, None] + sd[name + ".bias"][:, None, None]


def reference_forward(sd: dict, *, depth: int, num_heads: int, k_by_layer: dict[int, int],
                      image: torch.Tensor):
    """Logits [num_classes] and {layer: sorted list of kept patch indices (0-based)}."""
    sd = {k: v.double() for k, v in sd.items() if v.is_floating_point()}
    img = image.double()
    # stem: conv7x7/2 + BN + ReLU, conv3x3 + BN + ReLU, conv3x3 + BN + ReLU, conv k=s=8
    y = _conv(img, sd["patch_embed.conv1.weight"], None, stride=2, pad=3)
    y = _bn(y, sd, "patch_embed.bn1").clamp_min(0.0)
    y = _conv(y, sd["patch_embed.conv2.weight"], None, stride=1, pad=1)
    y = _bn(y, sd, "patch_embed.bn2").clamp_min(0.0)
    y = _conv(y, sd["patch_embed.conv3.weight"], None, stride=1, pad=1)
    y = _bn(y, sd, "patch_embed.bn3").clamp_min(0.0)
    y = _conv(y, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8, pad=0)
    c = y.shape[0]
    hd = c // num_heads
    tokens = [y[:, r, q] for r in range(y.shape[1]) for q in range(y.shape[2])]  # row-major
    x = torch.stack([sd["cls_token"][0, 0]] + tokens) + sd["pos_embed"][0]
    n = x.shape[0]
    kept = {}
    for layer in range(depth):
        p = f"blocks.{layer}."
        xn = _ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        wqkv = sd[p + "attn.qkv.weight"]  # no bias in LV-ViT
        wq, wk, wv = wqkv[:c], wqkv[c:2 * c], wqkv[2 * c:]
        if layer in k_by_layer:
            q_cls = wq @ xn[0]
            keys = xn[1:] @ wk.T  # [n-1, c]
            per_head = [keys[:, h * hd:(h + 1) * hd] @ q_cls[h * hd:(h + 1) * hd]
                        for h in range(num_heads)]
            scores = (sum(per_head) / num_heads).tolist()
            order = sorted(range(n - 1), key=lambda j: -scores[j])[:k_by_layer[layer]]
            kept[layer] = sorted(order)
            sel = [0] + [j + 1 for j in order]
        else:
            sel = list(range(n))
        xs = xn[sel]
        q, k, v = xs @ wq.T, xs @ wk.T, xs @ wv.T
        heads = []
        for h in range(num_heads):
            sl = slice(h * hd, (h + 1) * hd)
            a = torch.softmax((q[:, sl] @ k[:, sl].T) * hd ** -0.5, dim=-1)
            heads.append(a @ v[:, sl])
        attn = torch.cat(heads, dim=1) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        res = x[sel] + attn / 2.0  # skip_lam = 2
        hidden = _gelu(_ln(res, sd[p + "norm2.weight"], sd[p + "norm2.bias"]) @ sd[p + "mlp.fc1.weight"].T
                       + sd[p + "mlp.fc1.bias"])
        res = res + (hidden @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]) / 2.0
        x = x.clone()
        x[sel] = res
    x = _ln(x, sd["norm.weight"], sd["norm.bias"])
    cls_logits = sd["head.weight"] @ x[0] + sd["head.bias"]
    aux = torch.stack([sd["aux_head.weight"] @ x[j] + sd["aux_head.bias"] for j in range(1, n)])
    return cls_logits + 0.5 * aux.max(dim=0).values, kept
