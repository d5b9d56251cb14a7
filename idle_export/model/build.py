"""The torch model of a ModelSpec, by family: DeiT → vit.IdleViT (timm), LV-ViT → lvvit.LVViT.

Both models offer what the export, TorchRunner and bench read: `.spec`, `.dense`,
`.emit_selection`, `.idle_blocks` (each with `record_scores` / `last_scores`) and
forward(images) → logits, or (logits, *selections) with emit_selection.
"""

from __future__ import annotations

import torch

from idle_export.model import lvvit, vit
from idle_export.model.checkpoint import load_weights
from idle_export.model.config import ModelSpec


def build_model(spec: ModelSpec, state_dict: dict | None = None, *, dense: bool = False,
                emit_selection: bool = False, score_mode: str = "official", fold_bn: bool = True):
    """The eval-mode model of `spec` with the checkpoint's weights (random ones if None).

    LV-ViT: the stem's BatchNorms are folded into its convs (`fold_bn`, the form that is
    exported and benchmarked); fold_bn=False keeps them as the checkpoint has them, which is
    what `check --ckpt` compares an export against."""
    if spec.family == "deit":
        return vit.build_model(spec, state_dict, dense=dense, emit_selection=emit_selection,
                               score_mode=score_mode)
    model = lvvit.LVViT.from_spec(spec, dense=dense, emit_selection=emit_selection, score_mode=score_mode)
    if state_dict is not None:
        load_weights(model, state_dict, spec)
    model.eval()
    if fold_bn:
        model = lvvit.fold_batchnorm(model)  # a deep copy: give it the spec itself back
        model.spec = spec
    return model


def seeded_state_dict(spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights in the checkpoint's key names: DeiT gets timm's own init
    after torch.manual_seed(seed); LV-ViT gets lvvit.seeded_lvvit_state_dict (spread-out
    weights and random BatchNorm statistics, so folding and selection are really exercised)."""
    if spec.family == "deit":
        torch.manual_seed(seed)
        return vit.create_vit(spec).state_dict()
    return lvvit.seeded_lvvit_state_dict(spec.arch, spec.num_classes, seed, img_size=spec.img_size,
                                         embed_dim=spec.embed_dim, depth=spec.depth,
                                         num_heads=spec.num_heads, stem_width=spec.stem_width)
