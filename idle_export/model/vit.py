"""IdleViT's evaluation graph on timm's VisionTransformer, written for export.

Each idle layer (the authors' vit.py, `test=True` path):
  xn = LN1(x); q_cls = xn[:,0] Wq + bq; k = xn Wk + bk
  score_j = mean over heads of q_cls,h · k_j,h (unscaled), j = 1..N-1
  idx = [0, topk(score, K) + 1]
  res = x[idx] + proj(attn(q(xn[idx]), k[idx], v(xn[idx])));  res += MLP(LN2(res))
  x = scatter(x, idx, res)        out of place: unselected tokens pass through unchanged
The selection (score, TopK, gather, scatter) is model/selection.py, shared with LV-ViT.
Constant K per layer, TopK + GatherElements + ScatterElements, no data-dependent Python
control flow, so the same module runs eagerly and exports to ONNX.

Ties: TopK's order among exactly equal scores is up to the runtime (ONNX Runtime prefers the
lower index); the selected *set* is what parity compares, and exactly equal float scores do not
occur in practice on real inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from idle_export.model.checkpoint import load_weights
from idle_export.model.config import SCORE_MODES, ModelSpec
from idle_export.model.families import family_of
from idle_export.model.selection import gather_rows, row_index, scatter_rows, select_tokens


class IdleBlock(nn.Module):
    """One timm Block run on its K highest-scoring tokens (plus CLS)."""

    def __init__(self, block: nn.Module, keep: int, score_mode: str = "official"):
        super().__init__()
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}")
        self.block = block
        self.keep = int(keep)
        self.score_mode = score_mode
        attn = block.attn
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = self.head_dim**-0.5
        self.record_scores = False  # eager only: keep the last scores for tie analysis
        self.last_scores: torch.Tensor | None = None

    def select(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices [B, K+1] of the kept tokens (CLS first) and, in the official mode, all keys."""
        qkv = self.block.attn.qkv
        idx, keys, scores = select_tokens(xn, qkv.weight, qkv.bias, self.num_heads, self.keep,
                                          self.score_mode)
        if self.record_scores:
            self.last_scores = scores.detach()
        return idx, keys

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blk = self.block
        b, _, c = x.shape
        s = self.keep + 1
        xn = blk.norm1(x)
        idx, keys = self.select(xn)
        gather_idx = row_index(idx, b, c)
        xn_sel = gather_rows(xn, gather_idx)
        x_sel = gather_rows(x, gather_idx)
        weight, bias = blk.attn.qkv.weight, blk.attn.qkv.bias
        h, d = self.num_heads, self.head_dim
        if keys is None:
            # one q|k|v GEMM, as timm's dense block: with bf16 GEMMs (AMX) each GEMM call has a
            # fixed cost that three [C, C] calls pay three times (docs/benchmark.md, "Where the
            # time goes at bf16")
            qkv = F.linear(xn_sel, weight, bias).reshape(b, s, 3, h, d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:  # official scores: the keys of every token exist already
            q = F.linear(xn_sel, weight[:c], bias[:c]).reshape(b, s, h, d).transpose(1, 2)
            v = F.linear(xn_sel, weight[2 * c :], bias[2 * c :]).reshape(b, s, h, d).transpose(1, 2)
            k = gather_rows(keys, gather_idx).reshape(b, s, h, d).transpose(1, 2)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, s, c)
        res = x_sel + blk.ls1(blk.attn.proj(out))
        res = res + blk.ls2(blk.mlp(blk.norm2(res)))
        return scatter_rows(x, gather_idx, res), idx


class IdleViT(nn.Module):
    """timm VisionTransformer with idle layers. `dense=True`: the same weights, every token
    computed in every layer (the baseline every comparison uses)."""

    def __init__(self, vit: nn.Module, spec: ModelSpec, *, dense: bool = False,
                 emit_selection: bool = False, score_mode: str = "official"):
        super().__init__()
        self.vit = vit
        self.spec = spec
        self.dense = dense
        self.emit_selection = emit_selection and not dense
        self.score_mode = score_mode
        k_by_layer = {} if dense else spec.k_by_layer
        # A plain list: IdleBlock wraps timm's block without parameters of its own, so the
        # state dict keeps timm's keys (under `vit.`) and nothing is registered twice.
        self.layers = [
            IdleBlock(blk, k_by_layer[i], score_mode) if i in k_by_layer else blk
            for i, blk in enumerate(vit.blocks)
        ]

    @property
    def idle_blocks(self) -> list[IdleBlock]:
        """The idle layers, in layer order (as lvvit.LVViT.idle_blocks)."""
        return [layer for layer in self.layers if isinstance(layer, IdleBlock)]

    def forward(self, images: torch.Tensor):
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.norm_pre(x)
        selections = []
        for layer in self.layers:
            if isinstance(layer, IdleBlock):
                x, idx = layer(x)
                selections.append(idx)
            else:
                x = layer(x)
        logits = vit.forward_head(vit.norm(x))
        if self.emit_selection:
            return (logits, *selections)
        return logits


def create_vit(spec: ModelSpec) -> nn.Module:
    """timm's VisionTransformer for the spec, random weights (no hub access)."""
    import timm

    timm_name = family_of(spec.arch).archs[spec.arch]["timm_name"]
    return timm.create_model(timm_name, pretrained=False, num_classes=spec.num_classes,
                             img_size=spec.img_size)


def build_model(spec: ModelSpec, state_dict: dict | None = None, *, dense: bool = False,
                emit_selection: bool = False, score_mode: str = "official",
                fold_bn: bool = True) -> IdleViT:
    """IdleViT in eval mode with the given timm-keyed weights (or seeded random ones if None).
    `fold_bn`: nothing to fold (a DeiT has no BatchNorm); build.build_model passes it to every
    family."""
    vit = create_vit(spec)
    if state_dict is not None:
        load_weights(vit, state_dict, spec)
    model = IdleViT(vit, spec, dense=dense, emit_selection=emit_selection, score_mode=score_mode)
    return model.eval()


def seeded_state_dict(spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """timm's own init after torch.manual_seed(seed), in timm's key names."""
    torch.manual_seed(seed)
    return create_vit(spec).state_dict()
