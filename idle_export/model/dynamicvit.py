"""DynamicViT (Rao et al., NeurIPS 2021, github.com/raoyongming/DynamicViT) on timm's DeiT,
written for export.

Before each block of `pruning_loc` (the authors' models/dyvit.py, eval path), with the patch
tokens x_1..x_n of the current (already pruned) sequence:
  z = GELU(Linear(LayerNorm(x)))                          score_predictor[s].in_conv
  z' = [z[:, :C/2], mean_j z_j[C/2:]]                      local half, global half (mean over the
                                                           current tokens: the policy is all ones)
  p = LogSoftmax(Linear(GELU(Linear(GELU(Linear(z'))))))   out_conv, 2 classes; p[:, 0] = keep
  K_s = int(196 * ratio_s), ratio = (r, r², r³)            of the INITIAL count, in Python floats
  keep = argsort(p[:, 0], descending)[:K_s]                here TopK(sorted), the same order
  x = [x_0, x_keep]  → the block (and all later ones) run on the kept tokens only
The rest are dropped. K is a constant per stage: TopK + Gather, dynamic batch.

State dict: timm DeiT's keys + `score_predictor.{s}.in_conv.{0,1}`, `.out_conv.{0,2,4}`.
The family registry's entry is families.DynamicViTFamily (arch dynamicvit_<size>, MACs; its K
rule is the IdleViT schedule rule with r, r², r³); build_model, seeded_state_dict,
spec_from_checkpoint and write_demo_checkpoint are what the pipeline calls, on a ModelSpec.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from idle_export.errors import BadInputError
from idle_export.model.config import ModelSpec, check_keep_rate
from idle_export.model.families import DYNAMICVIT
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

DEFAULT_PRUNING_LOC = (3, 6, 9)  # main.py and infer.py for deit-s / deit-b / deit-256
MAIN_DEFAULT_RATE = 0.9  # main.py --base_rate (infer.py's default is 0.7)
# args.model of the authors' scripts → our DeiT arch (deit-256, 4 heads, is not a timm DeiT)
AUTHOR_MODELS = {"deit-s": "deit_small", "deit-b": "deit_base", "deit-t": "deit_tiny"}
PREFIX = "score_predictor."


@dataclass(frozen=True)
class DynamicViTSpec(DeitDims):
    """Backbone, base keep rate r and pruning stages: stage s keeps int(P * r**(s+1)) tokens."""

    family: ClassVar[str] = "dynamicvit"
    arch: str
    keep_rate: float
    pruning_loc: tuple[int, ...] = DEFAULT_PRUNING_LOC
    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16

    def __post_init__(self):
        object.__setattr__(self, "arch", deit_dims(self.arch)[0])
        object.__setattr__(self, "keep_rate", check_keep_rate(self.keep_rate))
        locs = tuple(int(i) for i in self.pruning_loc)
        if list(locs) != sorted(set(locs)) or any(not 0 <= i < self.depth for i in locs):
            raise BadInputError(f"pruning_loc {list(locs)} is not increasing within 0..{self.depth - 1}",
                                "pass layers such as (3, 6, 9)")
        object.__setattr__(self, "pruning_loc", locs)
        bad = [k for k in self.keep_k if k < 1]
        if bad:
            raise BadInputError(f"keep rate {self.keep_rate} keeps no token at some stage",
                                "raise the keep rate")

    @property
    def token_ratio(self) -> tuple[float, ...]:
        """[r, r**2, r**3, ...] exactly as main.py/infer.py compute it (Python float powers)."""
        r = self.keep_rate
        return tuple(r ** (s + 1) for s in range(len(self.pruning_loc)))

    @property
    def keep_k(self) -> tuple[int, ...]:
        """int(init_n * ratio): init_n is the INITIAL patch count (the authors hard-code 14*14,
        so they run at 224 only; here the grid of img_size)."""
        return tuple(int(self.num_patches * ratio) for ratio in self.token_ratio)

    @property
    def idle_layers(self) -> tuple[int, ...]:
        """The pruning layers (named so for onnx.io.selection_output_names)."""
        return self.pruning_loc

    @property
    def k_by_layer(self) -> dict[int, int]:
        return dict(zip(self.pruning_loc, self.keep_k))

    def describe(self) -> str:
        return (f"DynamicViT {self.arch} keep {self.keep_rate:g}, pruning before layers "
                f"{','.join(map(str, self.pruning_loc))}, K {','.join(map(str, self.keep_k))}")

    def to_metadata(self) -> dict[str, str]:
        return {f"idle_export.{k}": json.dumps(v) for k, v in
                {"family": self.family, **asdict(self)}.items()}


class PredictorLG(nn.Module):
    """The authors' score predictor, same modules and key names (in_conv.{0,1}, out_conv.{0,2,4}).
    Its LayerNorm has torch's default eps 1e-5, not the backbone's 1e-6. Eval form: the global
    feature is the plain mean over the current tokens (their policy is all ones then)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1))
        self.record_scores = False  # eager only: keep the last log p(keep) for tie analysis
        self.last_scores: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local_x = x[:, :, :half]
        global_x = x[:, :, half:].mean(dim=1, keepdim=True).expand_as(local_x)
        return self.out_conv(torch.cat([local_x, global_x], dim=-1))


class DynamicViT(nn.Module):
    """timm DeiT with DynamicViT's predictors. dense=True: the same weights, no pruning (the
    predictors are kept, unused, so the state dict is the same). `spec`: a DynamicViTSpec or a
    ModelSpec of a dynamicvit_* arch (idle_layers: the pruning layers). The emitted selections
    are the TopK positions themselves (no CLS column, cls_in_selection)."""

    score_mode = "official"  # the predictor's log p(keep)
    cls_in_selection = False

    def __init__(self, vit: nn.Module, spec: DynamicViTSpec, *, dense: bool = False,
                 emit_selection: bool = False):
        super().__init__()
        self.vit = vit
        self.spec = spec
        self.dense = dense
        self.emit_selection = emit_selection and not dense
        self.score_predictor = nn.ModuleList(PredictorLG(spec.embed_dim) for _ in spec.idle_layers)
        self.stage_of = {} if dense else {layer: s for s, layer in enumerate(spec.idle_layers)}

    @property
    def idle_blocks(self) -> list[PredictorLG]:
        """The predictors in use, in layer order (TorchRunner records their scores)."""
        return [] if self.dense else list(self.score_predictor)

    def prune(self, x: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, c = x.shape
        keep = self.spec.keep_k[stage]
        predictor = self.score_predictor[stage]
        score = predictor(x[:, 1:])[:, :, 0]  # log p(keep)
        if predictor.record_scores:
            predictor.last_scores = score.detach()
        idx = torch.topk(score, keep, dim=1, largest=True, sorted=True).indices
        kept = torch.gather(x[:, 1:], 1, idx.unsqueeze(-1).expand(b, keep, c))
        return torch.cat([x[:, :1], kept], dim=1), idx

    def forward(self, images: torch.Tensor):
        vit = self.vit
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        selections = []
        for i, blk in enumerate(vit.blocks):
            if i in self.stage_of:
                x, idx = self.prune(x, self.stage_of[i])
                selections.append(idx)
            x = blk(x)
        logits = vit.forward_head(vit.norm(x))
        return (logits, *selections) if self.emit_selection else logits

    def load_authors_state_dict(self, state_dict: dict) -> None:
        """The authors' flat keys: timm DeiT's + score_predictor.*."""
        load_strict(self.vit, {k: v for k, v in state_dict.items() if not k.startswith(PREFIX)},
                    f"DynamicViT {self.spec.arch} backbone")
        load_strict(self.score_predictor, {k[len(PREFIX):]: v for k, v in state_dict.items()
                                           if k.startswith(PREFIX)}, "DynamicViT score predictors")

    def authors_state_dict(self) -> dict:
        return {**self.vit.state_dict(),
                **{PREFIX + k: v for k, v in self.score_predictor.state_dict().items()}}


def original_ids(selections, spec: DynamicViTSpec) -> list[torch.Tensor]:
    """The emitted selections (positions among the current patch tokens, highest score first)
    as original patch numbers."""
    b = selections[0].shape[0] if selections else 0
    ids = torch.arange(spec.num_patches).expand(b, -1)
    out = []
    for sel in selections:
        ids = torch.gather(ids, 1, sel.long())
        out.append(ids)
    return out


def predictor_macs(n: int, c: int) -> int:
    """One score predictor over n patch tokens: C→C, C→C/2, C/2→C/4, C/4→2 per token."""
    return n * (c * c + c * (c // 2) + (c // 2) * (c // 4) + (c // 4) * 2)


def macs(spec: DynamicViTSpec, dense: bool = False) -> int:
    """MACs of one image (families.DynamicViTFamily.macs, ModelSpec.macs' conventions): each
    predictor over the tokens entering its stage, then every block from there on over 1 + K_s
    tokens."""
    return model_spec(spec).macs(dense=dense)


def build_dynamicvit(spec: DynamicViTSpec, state_dict: dict | None = None, *, dense: bool = False,
                     emit_selection: bool = False) -> DynamicViT:
    """DynamicViT in eval mode with the authors' flat keys (random init if None)."""
    model = DynamicViT(create_deit(spec.arch, spec.num_classes, spec.img_size), spec, dense=dense,
                       emit_selection=emit_selection)
    if state_dict is not None:
        model.load_authors_state_dict(state_dict)
    return model.eval()


def build_model(spec: ModelSpec, state_dict: dict | None = None, *, dense: bool = False,
                emit_selection: bool = False, score_mode: str = "official",
                fold_bn: bool = True) -> DynamicViT:
    """build.build_model's entry: DynamicViT of a dynamicvit_* ModelSpec (the predictors'
    scores only; no BatchNorm to fold)."""
    DYNAMICVIT.scores(score_mode)  # its own scores only: BadInputError for another
    return build_dynamicvit(spec, state_dict, dense=dense, emit_selection=emit_selection)


def seeded_state_dict(spec: ModelSpec, seed: int = 0) -> dict:
    """Seeded weights in the authors' flat keys, with a real spread (seeded_spread)."""
    torch.manual_seed(seed)
    return seeded_spread(build_dynamicvit(spec).authors_state_dict(), seed)


# ---------------------------------------------------------------------- checkpoint format
def is_dynamicvit_state_dict(state_dict: dict) -> bool:
    return any(k.startswith(PREFIX) for k in state_dict)


def dynamicvit_spec_from_checkpoint(state_dict: dict, args=None, *, keep_rate: float | None = None,
                                    num_classes: int | None = None) -> DynamicViTSpec:
    """The spec from the weights (width → DeiT size, predictor count → stages) and the
    authors' args (model 'deit-s'/'deit-b', base_rate). Without args.base_rate the rate must be
    given: main.py defaults to 0.9 and infer.py to 0.7, so a default would be a guess."""
    a = args_dict(args)
    arch = arch_from_width(state_dict)
    named = AUTHOR_MODELS.get(str(a.get("model", "")))
    if arch is None or (named and named != arch):
        raise BadInputError(f"the weights are not a DeiT backbone of args.model {a.get('model')!r}",
                            "pass a DynamicViT deit-s / deit-b checkpoint")
    stages = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith(PREFIX)})
    if stages != list(range(len(DEFAULT_PRUNING_LOC))):
        raise BadInputError(f"score predictors {stages}: expected 0, 1, 2 (pruning at 3, 6, 9)",
                            "pass a DeiT DynamicViT checkpoint")
    if keep_rate is None:
        keep_rate = a.get("base_rate")
    if keep_rate is None:
        raise BadInputError("no keep rate: the checkpoint has no args.base_rate",
                            "pass the rate it was trained with (0.7 for the released deit-s/b)")
    if num_classes is None:
        num_classes = int(state_dict["head.weight"].shape[0])
    return DynamicViTSpec(arch=arch, keep_rate=float(keep_rate), num_classes=num_classes)


def spec_from_checkpoint(ckpt, *, keep_rate: float | None = None, named: bool = True) -> ModelSpec:
    """The dynamicvit_* ModelSpec of a loaded checkpoint (model.checkpoint.Checkpoint), read as
    dynamicvit_spec_from_checkpoint does; `keep_rate` overrides args.base_rate."""
    return model_spec(dynamicvit_spec_from_checkpoint(ckpt.state_dict, ckpt.args, keep_rate=keep_rate,
                                                      num_classes=ckpt.num_classes))


def write_demo_checkpoint(path: str | Path, spec: ModelSpec, seed: int = 0) -> Path:
    """The demo's checkpoint of a dynamicvit_* spec: seeded weights in the authors' format."""
    return write_dynamicvit_demo_checkpoint(path, spec, seed, seeded_state_dict(spec, seed))


def write_dynamicvit_demo_checkpoint(path: str | Path, spec: DynamicViTSpec, seed: int = 0,
                                     state_dict: dict | None = None) -> Path:
    """A seeded random DynamicViT checkpoint as the authors' utils.save_model writes it
    ({'model', 'optimizer', 'epoch', 'scaler', 'args', 'best', 'best_ema'})."""
    if state_dict is None:
        torch.manual_seed(seed)
        state_dict = build_dynamicvit(spec).authors_state_dict()
    size = spec.arch.split("_")[1][0]
    args = {"model": f"deit-{size}", "base_rate": spec.keep_rate, "nb_classes": spec.num_classes,
            "input_size": spec.img_size}
    return save_authors_checkpoint(Path(path), state_dict, args, optimizer={}, epoch=0, scaler={},
                                   best=0.0, best_ema=0.0)
