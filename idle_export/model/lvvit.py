"""LV-ViT (Token Labeling) with IdleViT idle layers, written for export.

The authors' IdleLVViT (Ackesnal/IdleViT lvvit.py, eval `test=True` path; configs in infer.py):
  stem (PatchEmbed4_2): conv7×7/2 p3 → BN → ReLU, conv3×3/1 p1 → BN → ReLU, conv3×3/1 p1 → BN → ReLU
        (64 channels, convs without bias), proj conv kernel = stride = 8 with bias → (img/16)² tokens
  x = [cls, tokens] + pos_embed
  block (skip_lam = 2, qkv without bias, GELU MLP of ratio 3):
        x = x + attn(LN1(x)) / 2;  x = x + mlp(LN2(x)) / 2
  idle block: the same on the top-K tokens plus CLS, ranked by selection.select_tokens (mean over
        heads of the unscaled q_cls·k_j), scattered back out of place; the rest pass through unchanged
  logits = head(LN(x)[:, 0]) + 0.5 · max over patch tokens of aux_head(LN(x)[:, 1:])
LayerNorm eps is 1e-5 (nn.LayerNorm's default, unlike timm DeiT's 1e-6); BatchNorm eps 1e-5.
Parameter names equal the official checkpoint keys, so its state dict loads with strict=True.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from idle_export.model.checkpoint import load_weights
from idle_export.model.config import SCORE_MODES, ModelSpec, schedule_k
from idle_export.model.families import LVVIT
from idle_export.model.selection import gather_rows, row_index, scatter_rows, select_tokens

PATCH_SIZE = 16  # the stem's total stride: 2 (conv1) × 8 (proj)
SKIP_LAM = 2.0  # residual branches are divided by this (Token Labeling's skip_lam)
LN_EPS = 1e-5


def _arch(arch: str) -> dict:
    """The arch's entry in the family's table (families.LVVIT.archs: dims, idle layers, exponents)."""
    if arch not in LVVIT.archs:
        raise ValueError(f"unknown LV-ViT architecture {arch!r}: use one of {', '.join(LVVIT.archs)}")
    return LVVIT.archs[arch]


def lvvit_num_patches(img_size: int = 224) -> int:
    """Patch tokens of a square image (196 at 224)."""
    return (img_size // PATCH_SIZE) ** 2


def lvvit_keep_k(arch: str, keep_rate: float, img_size: int = 224) -> tuple[int, ...]:
    """K per idle layer of `arch`: int(N * keep_rate**p) in Python floats, as the official
    `int(init_n * keep_ratios[i])` with keep_ratios[i] = base_rate**(i // G + 1)."""
    return schedule_k(lvvit_num_patches(img_size), keep_rate, _arch(arch)["exponents"])


def lvvit_k_by_layer(arch: str, keep_rate: float, img_size: int = 224) -> dict[int, int]:
    """{idle layer: K} for `arch` at `keep_rate` (the `keep_k` argument of LVViT)."""
    return dict(zip(_arch(arch)["idle_layers"], lvvit_keep_k(arch, keep_rate, img_size)))


class PatchEmbed4_2(nn.Module):
    """The official `4_2` stem; after fold_batchnorm the bn* are Identity and the convs have bias."""

    def __init__(self, embed_dim: int, width: int = 64, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.proj = nn.Conv2d(width, embed_dim, kernel_size=PATCH_SIZE // 2, stride=PATCH_SIZE // 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, C], patches in row-major order


class Attention(nn.Module):
    """Parameter holder (qkv without bias, proj); the math lives in LVBlock."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf), as nn.GELU() in the official Mlp
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LVBlock(nn.Module):
    """One LV-ViT block. `keep` None: dense; otherwise an idle layer that computes only its
    `keep` highest-scoring patch tokens plus CLS (the structure of vit.IdleBlock)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, keep: int | None = None,
                 score_mode: str = "official"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.keep = None if keep is None else int(keep)
        self.score_mode = score_mode
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.record_scores = False  # eager only: keep the last scores for tie analysis
        self.last_scores: torch.Tensor | None = None

    def _attend(self, xn: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        """proj(softmax(q kᵀ · scale) v) among the rows of xn (keys given: already projected)."""
        b, s, c = xn.shape
        weight = self.attn.qkv.weight
        h, d = self.num_heads, self.head_dim
        q = F.linear(xn, weight[:c]).reshape(b, s, h, d).transpose(1, 2)
        k = (F.linear(xn, weight[c : 2 * c]) if keys is None else keys).reshape(b, s, h, d).transpose(1, 2)
        v = F.linear(xn, weight[2 * c :]).reshape(b, s, h, d).transpose(1, 2)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.attn.proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, s, c))

    def select(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices [B, K+1] of the kept tokens (CLS first) and, in the official mode, all keys
        (selection.select_tokens; qkv has no bias)."""
        idx, keys, scores = select_tokens(xn, self.attn.qkv.weight, None, self.num_heads, self.keep,
                                          self.score_mode)
        if self.record_scores:
            self.last_scores = scores.detach()
        return idx, keys

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(new x, kept indices [B, K+1] or None for a dense block)."""
        xn = self.norm1(x)
        if self.keep is None:
            x = x + self._attend(xn, None) / SKIP_LAM
            return x + self.mlp(self.norm2(x)) / SKIP_LAM, None
        b, _, c = x.shape
        idx, keys = self.select(xn)
        gather_idx = row_index(idx, b, c)
        xn_sel = gather_rows(xn, gather_idx)
        keys = None if keys is None else gather_rows(keys, gather_idx)
        res = gather_rows(x, gather_idx) + self._attend(xn_sel, keys) / SKIP_LAM
        res = res + self.mlp(self.norm2(res)) / SKIP_LAM
        return scatter_rows(x, gather_idx, res), idx


class LVViT(nn.Module):
    """LV-ViT with idle layers `keep_k` ({layer: K}; None or empty: the dense model). The
    keyword dims override the arch's for small test models (img_size: a multiple of 16).
    forward(images) → logits [B, classes], or (logits, *selections) with emit_selection:
    int64 [B, K+1] per idle layer in layer order, CLS (0) first (a dense model: logits only)."""

    def __init__(self, arch: str = "lvvit_s", num_classes: int = 1000, *,
                 keep_k: Mapping[int, int] | None = None, score_mode: str = "official",
                 emit_selection: bool = False, img_size: int = 224, embed_dim: int | None = None,
                 depth: int | None = None, num_heads: int | None = None, stem_width: int | None = None):
        super().__init__()
        info = dict(_arch(arch))
        for key, value in dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                               stem_width=stem_width).items():
            if value is not None:
                info[key] = value
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}")
        if img_size % PATCH_SIZE or img_size <= 0:
            raise ValueError(f"img_size {img_size} is not a positive multiple of {PATCH_SIZE}")
        c, depth, n = info["embed_dim"], info["depth"], lvvit_num_patches(img_size)
        keep_k = {int(layer): int(k) for layer, k in (keep_k or {}).items()}
        for layer, k in keep_k.items():
            if not 0 <= layer < depth or not 1 <= k <= n:
                raise ValueError(f"idle layer {layer} keeping {k} tokens: need layer in 0..{depth - 1} "
                                 f"and K in 1..{n}")
        self.arch, self.num_classes, self.img_size = arch, num_classes, img_size
        self.spec: ModelSpec | None = None  # set by from_spec: what the export and runners read
        self.keep_k = dict(sorted(keep_k.items()))
        self.score_mode = score_mode
        self.emit_selection = emit_selection and bool(keep_k)
        self.patch_embed = PatchEmbed4_2(c, info["stem_width"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, c))
        self.blocks = nn.ModuleList(
            LVBlock(c, info["num_heads"], info["mlp_ratio"], keep_k.get(i), score_mode) for i in range(depth)
        )
        self.norm = nn.LayerNorm(c, eps=LN_EPS)
        self.head = nn.Linear(c, num_classes)
        self.aux_head = nn.Linear(c, num_classes)

    @classmethod
    def from_spec(cls, spec: ModelSpec, *, dense: bool = False, emit_selection: bool = False,
                  score_mode: str = "official") -> LVViT:
        """The model of a ModelSpec (its arch, dims and K per idle layer; none with dense),
        random weights. `.spec` is set, as on vit.IdleViT."""
        model = cls(spec.arch, spec.num_classes, keep_k=None if dense else spec.k_by_layer,
                    score_mode=score_mode, emit_selection=emit_selection, img_size=spec.img_size,
                    embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
                    stem_width=spec.stem_width)
        model.spec = spec
        return model

    @property
    def dense(self) -> bool:
        return not self.keep_k

    @property
    def idle_blocks(self) -> list[LVBlock]:
        """The idle layers' blocks, in layer order (as vit.IdleViT.idle_blocks)."""
        return [b for b in self.blocks if b.keep is not None]

    def forward(self, images: torch.Tensor):
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        selections = []
        for blk in self.blocks:
            x, idx = blk(x)
            if idx is not None:
                selections.append(idx)
        x = self.norm(x)
        aux = self.aux_head(x[:, 1:])  # [B, N, classes]
        # the max over patch tokens as one pooling window (exact): ONNX MaxPool, whose shapes ONNX
        # Runtime's quantization tools infer (an opset-18 ReduceMax with its axes input they cannot)
        aux_max = F.max_pool2d(aux.unsqueeze(1), kernel_size=(aux.shape[1], 1)).flatten(1)
        logits = self.head(x[:, 0]) + 0.5 * aux_max
        return (logits, *selections) if self.emit_selection else logits


def fold_batchnorm(model: LVViT) -> LVViT:
    """A copy (eval mode) whose stem BatchNorms are folded into the convs before them, with the
    running statistics: w' = w·s, b' = β + (b − μ)·s, s = γ/√(σ² + ε), computed in float64.
    Equal to `model` in eval mode; the export uses it (no BatchNormalization in the graph)."""
    folded = copy.deepcopy(model).eval()
    pe = folded.patch_embed
    for i in (1, 2, 3):
        conv, bn = getattr(pe, f"conv{i}"), getattr(pe, f"bn{i}")
        if not isinstance(bn, nn.BatchNorm2d):
            continue  # folded already
        w = conv.weight.detach()
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                        conv.padding, bias=True).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            b = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
            new.weight.copy_(w.double() * s.reshape(-1, 1, 1, 1))
            new.bias.copy_(bn.bias.double() + (b - bn.running_mean.double()) * s)
        setattr(pe, f"conv{i}", new)
        setattr(pe, f"bn{i}", nn.Identity())
    return folded


def build_model(spec: ModelSpec, state_dict: dict | None = None, *, dense: bool = False,
                emit_selection: bool = False, score_mode: str = "official", fold_bn: bool = True) -> LVViT:
    """The eval-mode LVViT of `spec` with official-keyed weights (random ones if None); `fold_bn`:
    the stem's BatchNorms folded into its convs (fold_batchnorm), as exported and benchmarked."""
    model = LVViT.from_spec(spec, dense=dense, emit_selection=emit_selection, score_mode=score_mode)
    if state_dict is not None:
        load_weights(model, state_dict, spec)
    model.eval()
    if fold_bn:
        model = fold_batchnorm(model)  # a deep copy: give it the spec itself back
        model.spec = spec
    return model


def seeded_state_dict(spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """seeded_lvvit_state_dict for the spec's arch and dims."""
    return seeded_lvvit_state_dict(spec.arch, spec.num_classes, seed, img_size=spec.img_size,
                                   embed_dim=spec.embed_dim, depth=spec.depth,
                                   num_heads=spec.num_heads, stem_width=spec.stem_width)


def seeded_lvvit_state_dict(arch: str = "lvvit_s", num_classes: int = 1000, seed: int = 0,
                            **dims) -> dict[str, torch.Tensor]:
    """Official-keyed random weights with a real spread (default inits make the token scores
    nearly flat, so a wrong selection would go unnoticed): matrices randn·gain/√fan_in, norm
    scales 1 + 0.3·randn, biases 0.1·randn, BN running mean 0.2·randn and var in [0.5, 1.5).
    `dims`: LVViT's keyword overrides (img_size, embed_dim, depth, num_heads, stem_width)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # shapes only, nothing allocated
        template = LVViT(arch, num_classes, **dims).state_dict()
    out = {}
    for key, v in template.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros(v.shape, dtype=v.dtype)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(v.shape, generator=g)
        elif key.endswith("running_mean"):
            out[key] = 0.2 * torch.randn(v.shape, generator=g)
        elif v.dim() == 1:  # biases; weights of LayerNorm and BatchNorm
            scale = key.endswith(".weight")
            out[key] = float(scale) + (0.3 if scale else 0.1) * torch.randn(v.shape, generator=g)
        elif key in ("cls_token", "pos_embed"):
            out[key] = 0.5 * torch.randn(v.shape, generator=g)
        else:  # Linear / Conv2d weights; ReLU follows conv1..3 (He gain), the qkv gain spreads scores
            gain = math.sqrt(2.0) if key.startswith("patch_embed.conv") else 1.0 if "head" in key else 1.5
            out[key] = gain / math.sqrt(v[0].numel()) * torch.randn(v.shape, generator=g)
    return out


def _k_by_layer(arch: str, keep_k: Mapping[int, int] | Sequence[int] | None) -> dict[int, int]:
    if keep_k is None:
        return {}
    if isinstance(keep_k, Mapping):
        return dict(keep_k)
    layers = _arch(arch)["idle_layers"]
    if len(keep_k) != len(layers):
        raise ValueError(f"{len(keep_k)} K values for the {len(layers)} idle layers of {arch}")
    return dict(zip(layers, keep_k))


def _spec(arch: str, keep_k: Mapping[int, int] | Sequence[int] | None = None, num_classes: int = 1000,
          img_size: int = 224) -> ModelSpec:
    _arch(arch)  # ValueError for an unknown arch
    k_by_layer = _k_by_layer(arch, keep_k)
    return ModelSpec(arch=arch, keep_rate=None, idle_layers=tuple(k_by_layer),
                     keep_k=tuple(k_by_layer.values()), num_classes=num_classes, img_size=img_size)


def lvvit_stem_macs(arch: str, img_size: int = 224) -> int:
    """Multiply-accumulates of the conv stem for one image (BN folded, so not counted):
    ModelSpec.embed_macs."""
    return _spec(arch, img_size=img_size).embed_macs()


def lvvit_macs(arch: str, keep_k: Mapping[int, int] | Sequence[int] | None, dense: bool = False,
               num_classes: int = 1000, img_size: int = 224, score_mode: str = "official") -> int:
    """Multiply-accumulates of one image (ModelSpec.macs, the FLOP model bench uses): the stem
    (which idle layers do not shrink), every block's linears and attention matmuls over its
    tokens, the selection score per mode, the CLS head and the aux head over all patch tokens.
    keep_k: {layer: K} or one K per idle layer."""
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}")
    spec = _spec(arch, None if dense else keep_k, num_classes, img_size)
    return spec.macs(dense=dense, folded_scores=score_mode == "folded")
