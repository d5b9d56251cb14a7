"""The torch model of a ModelSpec, from its family's torch module (families.FAMILIES: DeiT →
vit.IdleViT on timm, LV-ViT → lvvit.LVViT).

Every family's model offers what the export, TorchRunner and bench read: `.spec`, `.dense`,
`.emit_selection`, `.idle_blocks` (each with `record_scores` / `last_scores`) and
forward(images) → logits, or (logits, *selections) with emit_selection.
"""

from __future__ import annotations

from idle_export.model.config import ModelSpec
from idle_export.model.families import family_of


def build_model(spec: ModelSpec, state_dict: dict | None = None, *, dense: bool = False,
                emit_selection: bool = False, score_mode: str = "official", fold_bn: bool = True):
    """The eval-mode model of `spec` with the checkpoint's weights (random ones if None).

    LV-ViT: the stem's BatchNorms are folded into its convs (`fold_bn`, the form that is
    exported and benchmarked); fold_bn=False keeps them as the checkpoint has them, which is
    what `check --ckpt` compares an export against. A family without BatchNorm ignores it."""
    return family_of(spec.arch).torch_module().build_model(
        spec, state_dict, dense=dense, emit_selection=emit_selection, score_mode=score_mode,
        fold_bn=fold_bn)


def seeded_state_dict(spec: ModelSpec, seed: int = 0) -> dict:
    """Deterministic random weights in the checkpoint's key names: DeiT gets timm's own init
    after torch.manual_seed(seed); LV-ViT gets lvvit.seeded_lvvit_state_dict (spread-out
    weights and random BatchNorm statistics, so folding and selection are really exercised)."""
    return family_of(spec.arch).torch_module().seeded_state_dict(spec, seed)
