"""EViT (Liang et al., ICLR 2022, github.com/youweiliang/evit) on timm's DeiT, written for export.

In each block of `drop_loc` (the authors' evit.py, eval path), with N tokens (CLS included):
  x = x + proj(attn(LN1(x)))                      attention over all N tokens, as usual
  a_j = mean over heads of softmax row 0, j = 1..N-1   the CLS attention of each other token
  K = ceil(keep_rate * (N-1))                      math.ceil in Python floats, as the authors
  idx = topk(a, K, sorted=True)                    gathered in that order (highest a first)
  x = [x_0, x_idx]  (+ Σ_{j∉idx} a_j x_j  with fuse_token: one token, weights NOT normalized)
  x = x + MLP(LN2(x))                              the MLP runs on the kept tokens only
A fused token is an ordinary token in later layers: it is ranked, kept or fused again. The token
count shrinks layer by layer; K is a constant per layer, so the graph is TopK + Gather (+ a
ScatterElements that zeroes the kept weights for the fused sum) with dynamic batch.

EViT adds no parameters: the state dict is timm DeiT's (authors' checkpoints load as they are).
The family registry's entry is families.EViTFamily (arch evit_<size>, its K rule and MACs);
build_model, seeded_state_dict, spec_from_checkpoint and write_demo_checkpoint are what the
pipeline calls, on a ModelSpec; EViTSpec is this module's own, the authors' options.
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from idle_export.errors import BadInputError
from idle_export.model.config import ModelSpec, canonical_arch, check_keep_rate
from idle_export.model.families import EVIT, EVIT_MODEL_NAME
from idle_export.model.pruning_common import (
    DeitDims,
    arch_from_width,
    args_dict,
    create_deit,
    deit_dims,
    load_strict,
    model_spec,
    save_authors_checkpoint,
    seeded_spread,
)

DEFAULT_DROP_LOC = (3, 6, 9)  # main.py --drop_loc '(3, 6, 9)'
DEFAULT_KEEP_RATE = 0.7  # main.py --base_keep_rate

# The authors' registered models: name → (keep rate, drop_loc), None where main.py's
# --base_keep_rate / --drop_loc apply. Several names ignore --base_keep_rate (hard-coded rates).
_SHRINK = EVIT_MODEL_NAME
_FIXED = {
    "deit_small_patch16_224_shrink_base": (None, DEFAULT_DROP_LOC),
    "deit_small_patch16_224_shrink": (0.7, DEFAULT_DROP_LOC),
    "deit_small_patch16_272_shrink": (0.7, DEFAULT_DROP_LOC),
    "deit_small_patch16_224_shrink05": (0.5, DEFAULT_DROP_LOC),
    "deit_small_patch16_288_shrink06": (0.6, DEFAULT_DROP_LOC),
    "deit_small_patch16_304_shrink05": (0.5, DEFAULT_DROP_LOC),
}


@dataclass(frozen=True)
class EViTSpec(DeitDims):
    """Everything that fixes an EViT graph: backbone, keep rate, drop layers, fusion."""

    family: ClassVar[str] = "evit"
    arch: str
    keep_rate: float
    drop_loc: tuple[int, ...] = DEFAULT_DROP_LOC
    fuse_token: bool = False
    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16

    def __post_init__(self):
        object.__setattr__(self, "arch", deit_dims(self.arch)[0])
        object.__setattr__(self, "keep_rate", check_keep_rate(self.keep_rate))
        locs = tuple(int(i) for i in self.drop_loc)
        if list(locs) != sorted(set(locs)) or any(not 0 <= i < self.depth for i in locs):
            raise BadInputError(f"drop_loc {list(locs)} is not increasing within 0..{self.depth - 1}",
                                "pass layers such as (3, 6, 9)")
        object.__setattr__(self, "drop_loc", locs)

    @property
    def k_by_layer(self) -> dict[int, int]:
        """Kept non-CLS tokens per pruning layer. A drop layer where ceil(r·(N-1)) == N-1 does
        nothing (the authors return no index there) and is left out; so is every layer at r = 1."""
        return dict(zip(*EVIT.keep_k(self.num_patches, self.keep_rate, self.drop_loc, (), self.fuse_token)))

    @property
    def idle_layers(self) -> tuple[int, ...]:
        """The pruning layers (named so for onnx.io.selection_output_names)."""
        return tuple(self.k_by_layer)

    @property
    def keep_k(self) -> tuple[int, ...]:
        return tuple(self.k_by_layer.values())

    def describe(self) -> str:
        ks = ",".join(map(str, self.keep_k)) or "-"
        fuse = ", fused token" if self.fuse_token else ""
        return (f"EViT {self.arch} keep {self.keep_rate:g}, drop layers "
                f"{','.join(map(str, self.idle_layers)) or '-'}, K {ks}{fuse}")

    def to_metadata(self) -> dict[str, str]:
        return {f"idle_export.{k}": json.dumps(v) for k, v in
                {"family": self.family, **asdict(self)}.items()}


class EViTBlock(nn.Module):
    """One timm Block that keeps the K tokens of highest CLS attention (and fuses the rest)."""

    def __init__(self, block: nn.Module, keep: int, fuse: bool):
        super().__init__()
        self.block = block
        self.keep = int(keep)
        self.fuse = bool(fuse)
        self.num_heads = block.attn.num_heads
        self.head_dim = block.attn.head_dim
        self.scale = self.head_dim**-0.5
        self.record_scores = False  # eager only: keep the last CLS attention for tie analysis
        self.last_scores: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blk = self.block
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, c)
        x = x + blk.ls1(blk.attn.proj(out))
        cls_attn = attn[:, :, 0, 1:].mean(dim=1)  # [B, N-1]
        if self.record_scores:
            self.last_scores = cls_attn.detach()
        idx = torch.topk(cls_attn, self.keep, dim=1, largest=True, sorted=True).indices
        non_cls = x[:, 1:]
        kept = torch.gather(non_cls, 1, idx.unsqueeze(-1).expand(b, self.keep, c))
        parts = [x[:, :1], kept]
        if self.fuse:
            # Σ over the complement of a_j x_j: the kept tokens' weights zeroed, then one sum
            weights = torch.scatter(cls_attn, 1, idx, torch.zeros_like(cls_attn[:, : self.keep]))
            parts.append(torch.sum(non_cls * weights.unsqueeze(-1), dim=1, keepdim=True))
        x = torch.cat(parts, dim=1)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return x, idx


class EViT(nn.Module):
    """timm DeiT with EViT's token dropping. dense=True: the same weights, no pruning. `spec`: an
    EViTSpec or a ModelSpec of an evit_* arch (both have k_by_layer and fuse_token). The emitted
    selections are the TopK positions themselves (no CLS column, cls_in_selection)."""

    score_mode = "official"  # the CLS attention: EViT has one way to rank
    cls_in_selection = False

    def __init__(self, vit: nn.Module, spec: EViTSpec, *, dense: bool = False,
                 emit_selection: bool = False):
        super().__init__()
        self.vit = vit
        self.spec = spec
        self.dense = dense
        self.emit_selection = emit_selection and not dense
        k_by_layer = {} if dense else spec.k_by_layer
        # a plain list: the wrappers have no parameters, the state dict stays timm's (under vit.)
        self.layers = [EViTBlock(blk, k_by_layer[i], spec.fuse_token) if i in k_by_layer else blk
                       for i, blk in enumerate(vit.blocks)]

    @property
    def idle_blocks(self) -> list[EViTBlock]:
        """The drop layers, in layer order (TorchRunner records their scores)."""
        return [layer for layer in self.layers if isinstance(layer, EViTBlock)]

    def forward(self, images: torch.Tensor):
        vit = self.vit
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        selections = []
        for layer in self.layers:
            if isinstance(layer, EViTBlock):
                x, idx = layer(x)
                selections.append(idx)
            else:
                x = layer(x)
        logits = vit.forward_head(vit.norm(x))
        return (logits, *selections) if self.emit_selection else logits


def original_ids(selections, spec: EViTSpec) -> list[torch.Tensor]:
    """The emitted selections (positions among the non-CLS tokens entering each pruning layer,
    highest CLS attention first) as original patch numbers 0..P-1; the token fused at the d-th
    pruning layer is -(d+1)."""
    b = selections[0].shape[0] if selections else 0
    ids = torch.arange(spec.num_patches).expand(b, -1)
    out = []
    for d, sel in enumerate(selections):
        kept = torch.gather(ids, 1, sel.long())
        out.append(kept)
        ids = torch.cat([kept, torch.full((b, 1), -(d + 1))], dim=1) if spec.fuse_token else kept
    return out


def macs(spec: EViTSpec, dense: bool = False) -> int:
    """MACs of one image (families.EViTFamily.macs, ModelSpec.macs' conventions). A pruning
    layer attends over all its N tokens, then its MLP runs on 1 + K (+1 fused) tokens; fusing
    costs (N-1-K)·C; the CLS ranking (a mean over heads of one softmax row) is not counted."""
    return model_spec(spec).macs(dense=dense)


def build_evit(spec: EViTSpec, state_dict: dict | None = None, *, dense: bool = False,
               emit_selection: bool = False) -> EViT:
    """EViT in eval mode with timm DeiT weights (timm's random init if None)."""
    vit = create_deit(spec.arch, spec.num_classes, spec.img_size)
    if state_dict is not None:
        load_strict(vit, state_dict, f"EViT {spec.arch}")
    return EViT(vit, spec, dense=dense, emit_selection=emit_selection).eval()


def build_model(spec: ModelSpec, state_dict: dict | None = None, *, dense: bool = False,
                emit_selection: bool = False, score_mode: str = "official", fold_bn: bool = True) -> EViT:
    """build.build_model's entry: EViT of an evit_* ModelSpec (CLS-attention scores only; no
    BatchNorm to fold)."""
    EVIT.scores(score_mode)  # its own scores only: BadInputError for another
    return build_evit(spec, state_dict, dense=dense, emit_selection=emit_selection)


def seeded_state_dict(spec: ModelSpec, seed: int = 0) -> dict:
    """Seeded timm DeiT weights with a real spread (pruning_common.seeded_spread)."""
    torch.manual_seed(seed)
    return seeded_spread(create_deit(spec.arch, spec.num_classes, spec.img_size).state_dict(), seed)


def evit_spec(spec: ModelSpec) -> EViTSpec:
    """The EViTSpec of an evit_* ModelSpec (the authors' options)."""
    return EViTSpec(deit_dims(spec.arch)[0], spec.keep_rate, drop_loc=spec.idle_layers,
                    fuse_token=spec.fuse_token, num_classes=spec.num_classes, img_size=spec.img_size)


# ---------------------------------------------------------------------- checkpoint format
def _drop_loc(value) -> tuple[int, ...]:
    """main.py keeps --drop_loc as a string and eval()s it; here literal_eval (no code runs)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise BadInputError(f"args.drop_loc {value!r} is not a tuple of layers",
                                "pass drop_loc such as '(3, 6, 9)'") from None
    if isinstance(value, int):
        value = (value,)
    return tuple(int(i) for i in value)


def is_evit_checkpoint(state_dict: dict, args=None) -> bool:
    """True for the authors' EViT training checkpoints. The weights are plain DeiT, so only the
    args tell: an EViT model name (`*_shrink*`) or EViT's own options (base_keep_rate)."""
    if any(k.startswith("score_predictor.") for k in state_dict):
        return False  # DynamicViT
    a = args_dict(args)
    return bool(_SHRINK.match(str(a.get("model", "")))) or "base_keep_rate" in a


def evit_spec_from_checkpoint(state_dict: dict, args=None, *, keep_rate: float | None = None,
                              num_classes: int | None = None) -> EViTSpec:
    """EViTSpec as the authors' main.py would build the model from these args (its defaults
    where an option is missing); `keep_rate` overrides. Names with a hard-coded rate
    (e.g. deit_small_patch16_224_shrink: 0.7) ignore --base_keep_rate as the authors do."""
    a = args_dict(args)
    name = str(a.get("model", ""))
    match = _SHRINK.match(name)
    rate, locs = _FIXED.get(name, (None, None))
    if match and name not in _FIXED and match.group(3) != "_base":
        raise BadInputError(f"unknown EViT model {name!r}",
                            "use deit_{small,base}_patch16_shrink_base or a named variant")
    arch = canonical_arch(f"deit_{match.group(1)}") if match else arch_from_width(state_dict)
    if arch is None:
        raise BadInputError("cannot tell the DeiT size of this EViT checkpoint",
                            "it needs args.model or a cls_token of width 192, 384 or 768")
    if keep_rate is None:
        keep_rate = rate if rate is not None else a.get("base_keep_rate", DEFAULT_KEEP_RATE)
    if locs is None:
        locs = _drop_loc(a.get("drop_loc", DEFAULT_DROP_LOC))
    if num_classes is None:
        head = state_dict.get("head.weight")
        num_classes = int(head.shape[0]) if head is not None else int(a.get("nb_classes", 1000))
    return EViTSpec(arch=arch, keep_rate=float(keep_rate), drop_loc=locs,
                    fuse_token=bool(a.get("fuse_token", False)), num_classes=num_classes,
                    img_size=int(a.get("input_size", 224)))


def evit_args(spec: EViTSpec) -> dict:
    """The args main.py would have had for this spec (the model name is the prototype
    `deit_{size}_patch16_shrink_base`; the authors register it for small and base only)."""
    size = spec.arch.split("_")[1]
    return {"model": f"deit_{size}_patch16_shrink_base", "base_keep_rate": spec.keep_rate,
            "drop_loc": str(tuple(spec.drop_loc)), "fuse_token": spec.fuse_token,
            "input_size": spec.img_size, "nb_classes": spec.num_classes,
            "shrink_start_epoch": 10, "shrink_epochs": 0}


def spec_from_checkpoint(ckpt, *, keep_rate: float | None = None, named: bool = True) -> ModelSpec:
    """The evit_* ModelSpec of a loaded checkpoint (model.checkpoint.Checkpoint), as the
    authors' main.py builds it from its args (evit_spec_from_checkpoint); `keep_rate` overrides.
    named=False (chosen by --family / --arch, the args are not EViT's): the rate must be given."""
    if keep_rate is None and not named:
        raise BadInputError(f"no keep rate: {ckpt.path.name} has no EViT args (base_keep_rate)",
                            "pass keep=0.7 (the rate the model was trained with)")
    args = ckpt.args if named else {"input_size": ckpt.img_size}
    return model_spec(evit_spec_from_checkpoint(ckpt.state_dict, args, keep_rate=keep_rate,
                                                num_classes=ckpt.num_classes))


def write_demo_checkpoint(path: str | Path, spec: ModelSpec, seed: int = 0) -> Path:
    """The demo's checkpoint of an evit_* spec: seeded weights in the authors' format."""
    return write_evit_demo_checkpoint(path, evit_spec(spec), seed, seeded_state_dict(spec, seed))


def write_evit_demo_checkpoint(path: str | Path, spec: EViTSpec, seed: int = 0,
                               state_dict: dict | None = None) -> Path:
    """A seeded random EViT checkpoint in the authors' format ({'model', 'args', ...} as main.py
    saves, args an argparse.Namespace)."""
    if state_dict is None:
        torch.manual_seed(seed)
        state_dict = create_deit(spec.arch, spec.num_classes, spec.img_size).state_dict()
    return save_authors_checkpoint(Path(path), state_dict, evit_args(spec), epoch=0)
