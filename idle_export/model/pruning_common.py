"""What EViT (model/evit.py) and DynamicViT (model/dynamicvit.py) share: the DeiT backbone by
arch name, strict weight loading with named keys, seeded weights, the argparse.Namespace the
authors' main.py scripts save as `args`, and the ModelSpec side of both (their MAC counts and K
rules are Family.macs / Family.keep_k in model/families.py).

Torch module (torch and timm imported at the top): named lazily by others."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from idle_export.errors import BadInputError
from idle_export.model.config import ModelSpec
from idle_export.model.families import DEIT, FAMILIES, canonical_arch, family_of


def deit_dims(arch: str) -> tuple[str, dict]:
    """Canonical DeiT arch name and its timm settings (LV-ViT is not a backbone here); an EViT or
    DynamicViT arch (evit_small …) names its DeiT backbone."""
    arch = canonical_arch(arch)
    arch = family_of(arch).backbone(arch)
    if arch not in DEIT.archs:
        raise BadInputError(f"{arch} is not a DeiT", f"use one of {', '.join(DEIT.archs)}")
    return arch, DEIT.archs[arch]


class DeitDims:
    """The DeiT dims of a spec that has `arch`, `img_size` and `patch_size` (EViT, DynamicViT)."""

    @property
    def embed_dim(self) -> int:
        return deit_dims(self.arch)[1]["embed_dim"]

    @property
    def depth(self) -> int:
        return deit_dims(self.arch)[1]["depth"]

    @property
    def num_heads(self) -> int:
        return deit_dims(self.arch)[1]["num_heads"]

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


def arch_from_width(state_dict: dict) -> str | None:
    """deit_tiny/small/base from the width of cls_token, None if it is not a DeiT width."""
    cls = state_dict.get("cls_token")
    return None if cls is None else DEIT.infer_arch(state_dict, int(cls.shape[-1]))


def create_deit(arch: str, num_classes: int = 1000, img_size: int = 224) -> nn.Module:
    """timm's DeiT VisionTransformer, random weights (no hub access)."""
    import timm

    return timm.create_model(deit_dims(arch)[1]["timm_name"], pretrained=False,
                             num_classes=num_classes, img_size=img_size)


def load_strict(module: nn.Module, state_dict: dict, what: str) -> None:
    """load_state_dict(strict) with the missing, unexpected and misshapen keys named."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {list(state_dict[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:4])}{' …' if len(items) > 4 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("size mismatch", shapes)) if items]
        raise BadInputError(f"weights do not fit {what}: {'; '.join(parts)}",
                            "pass the checkpoint's own architecture and format")
    module.load_state_dict(state_dict, strict=True)


def seeded_spread(state_dict: dict, seed: int, *, qk_std: float = 0.12, std: float = 0.05) -> dict:
    """Seeded weights with a real spread (timm's init makes attention nearly uniform, so every
    token ranks alike): LayerNorm gains around 1, q/k projections wide enough for peaked
    attention, the rest small enough that FP32 logits stay within 1e-5 of float64. Both spreads
    are for deit_tiny's width 192 and scale by sqrt(192 / width) for wider models, so the
    activations (and FP32's rounding of them) stay as small: deit_small's demo then stays under
    1e-5 too (unscaled: 1.7e-5, dense included)."""
    cls = state_dict.get("cls_token")
    scale = (192 / int(cls.shape[-1])) ** 0.5 if cls is not None else 1.0
    std, qk_std = std * scale, qk_std * scale
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state_dict.items():
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm.weight") \
                or k.endswith("in_conv.0.weight"):
            out[k] = 1.0 + 0.2 * torch.randn(v.shape, generator=g)
        elif k.endswith("attn.qkv.weight"):
            w = std * torch.randn(v.shape, generator=g)
            c = v.shape[1]
            w[: 2 * c] = qk_std * torch.randn((2 * c, c), generator=g)
            out[k] = w
        elif k == "head.weight":  # logits of order 1: FP32 keeps ~1e-6 of them
            out[k] = 0.4 * std * torch.randn(v.shape, generator=g)
        else:
            out[k] = std * torch.randn(v.shape, generator=g)
    return out


def save_authors_checkpoint(path: Path, state_dict: dict, args: dict, **extra) -> Path:
    """{'model': sd, 'args': argparse.Namespace, ...} as the authors' main.py scripts save
    (idle_export.model.checkpoint.load_checkpoint allowlists Namespace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state_dict, "args": argparse.Namespace(**args), **extra}, path)
    return path


def model_spec(spec) -> ModelSpec:
    """The ModelSpec (arch `<family>_<size>`) of an EViTSpec or DynamicViTSpec: what the ONNX
    metadata, the CLI and bench read."""
    family = FAMILIES[spec.family]
    layers = spec.drop_loc if hasattr(spec, "drop_loc") else spec.pruning_loc
    return ModelSpec.create(family.arch_of(spec.arch), spec.keep_rate, idle_layers=list(layers),
                            num_classes=spec.num_classes, img_size=spec.img_size,
                            fuse_token=getattr(spec, "fuse_token", False))


def args_dict(args) -> dict:
    """An args Namespace or dict (or None) as a dict."""
    if args is None:
        return {}
    if isinstance(args, dict):
        return dict(args)
    return dict(vars(args))
