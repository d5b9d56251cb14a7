"""Model families: the one place that knows which architectures exist and how they differ.

One Family per model family (IdleViT on DeiT and on LV-ViT, EViT, DynamicViT): its archs and
their dims, the checkpoint keys (and training args) that say "this is one of mine", the arch its
weights look like, its K rule and schedule, its MAC count, what it cannot do yet, and the name
of its torch module (imported only when a model is built). Light module (no torch): the CLI and
ModelSpec read it. The token selection the IdleViT families share is model/selection.py.
Adding a family: docs/families.md.

A family's torch module offers build_model(spec, state_dict=None, *, dense, emit_selection,
score_mode, fold_bn) and seeded_state_dict(spec, seed) (model/build.py calls them).
"""

from __future__ import annotations

import math
import re

from idle_export.errors import BadInputError, CheckpointError
from idle_export.model.family_base import (  # noqa: F401 - read from here by config and the CLI
    METHODS,
    SCHEDULE_NAMES,
    SCORE_MODES,
    SPEC_DIMS,
    SPEC_EXTRAS,
    Family,
    attention_macs,
    block_count,
    block_macs,
    schedule_k,
)


class DeiTFamily(Family):
    name, module = "deit", "idle_export.model.vit"
    # Official short names (args.arch in the authors' scripts) → timm VisionTransformer settings.
    archs = {
        "deit_tiny": dict(timm_name="deit_tiny_patch16_224", embed_dim=192, depth=12, num_heads=3),
        "deit_small": dict(timm_name="deit_small_patch16_224", embed_dim=384, depth=12, num_heads=6),
        "deit_base": dict(timm_name="deit_base_patch16_224", embed_dim=768, depth=12, num_heads=12),
    }
    aliases = {v["timm_name"]: k for k, v in archs.items()} | {
        f"vit_{v['timm_name']}": k for k, v in archs.items()}
    hint_aliases = True
    official_code = True
    weights_hint = "pass a DeiT checkpoint with timm VisionTransformer keys"
    # Preset schedules: (idle layers, exponent p of keep_rate**p for each idle layer).
    schedules = {
        # infer.py, the official evaluation script: layers 3..11, r,r,r, r²,r²,r², r³,r³,r³
        "eval": (tuple(range(3, 12)), (1, 1, 1, 2, 2, 2, 3, 3, 3)),
        # main.py, the official training script: layers 4..11 zipped with the same ratio list
        "train": (tuple(range(4, 12)), (1, 1, 1, 2, 2, 2, 3, 3)),
    }

    def schedule(self, arch, schedule):
        return self.schedules[schedule]  # groups of three idle layers per power of r


class LVViTFamily(Family):
    """LV-ViT (Token Labeling), our own module model/lvvit.py."""

    name, module = "lvvit", "idle_export.model.lvvit"
    # Widths, the conv stem's width, and the idle layers with the exponent p of keep_rate**p for
    # each, as the official infer.py and main.py set them (they agree for LV-ViT):
    # keep_ratios = [r**(i+1) for i in range(3) for _ in range(G)].
    archs = {
        "lvvit_s": dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, stem_width=64,
                        idle_layers=tuple(range(4, 16)), exponents=(1,) * 4 + (2,) * 4 + (3,) * 4),
        "lvvit_m": dict(embed_dim=512, depth=20, num_heads=8, mlp_ratio=3.0, stem_width=64,
                        idle_layers=tuple(range(5, 20)), exponents=(1,) * 5 + (2,) * 5 + (3,) * 5),
    }
    aliases = {"lvvit_small": "lvvit_s", "lvvit_medium": "lvvit_m"}
    marker_keys = ("patch_embed.conv1.weight",)  # the conv stem
    dim_keys = ("embed_dim", "depth", "num_heads", "stem_width")
    weights_hint = "pass an LV-ViT checkpoint with the official keys"
    head_dim = 64  # both official LV-ViTs have 64-wide heads: a narrower test model keeps that

    def infer_arch(self, state_dict, width):
        """By width and depth; by depth alone for a narrower test model."""
        depth = block_count(state_dict)
        official = next((a for a, i in self.archs.items() if (i["embed_dim"], i["depth"]) == (width, depth)),
                        None)
        return official or next((a for a, i in self.archs.items() if i["depth"] == depth), None)

    def dims_from_weights(self, state_dict, arch, name):
        """Width, depth, heads (64 wide) and stem width; a depth other than `arch`'s is an error
        naming the arch that fits."""
        sd = state_dict
        conv1, cls = sd.get("patch_embed.conv1.weight"), sd.get("cls_token")
        if conv1 is None or conv1.ndim != 4 or cls is None or cls.ndim != 3:
            guess = infer_arch(sd)
            raise CheckpointError(
                f"weights do not fit {arch}: {name} has no LV-ViT conv stem "
                "(patch_embed.conv1) or cls_token",
                f"the weights look like {guess}: pass arch={guess}" if guess else
                "pass an LV-ViT checkpoint with the official keys (patch_embed.conv1 …, aux_head)")
        width, depth = int(cls.shape[-1]), block_count(sd)
        if depth != self.archs[arch]["depth"]:  # the depth sets the idle layers: it must fit
            guess = infer_arch(sd)
            raise CheckpointError(
                f"weights do not fit {arch}: {name} has {depth} blocks, {arch} "
                f"{self.archs[arch]['depth']}", f"pass arch={guess}" if guess else
                "pass LV-ViT-S (16 blocks) or LV-ViT-M (20 blocks) weights")
        if width % self.head_dim:
            raise CheckpointError(f"cannot tell the attention heads of an LV-ViT of width {width}",
                                  f"LV-ViT heads are {self.head_dim} wide: pass lvvit_s (384) or "
                                  "lvvit_m (512) weights")
        return dict(embed_dim=width, depth=depth, num_heads=width // self.head_dim,
                    stem_width=int(conv1.shape[0]))

    def schedule(self, arch, schedule):
        """One per arch (the official eval and training scripts agree), whatever the name."""
        return self.archs[arch]["idle_layers"], self.archs[arch]["exponents"]

    def group(self, arch):
        """Four (S) or five (M) idle layers per power of r."""
        return len(self.archs[arch]["idle_layers"]) // 3

    def embed_macs(self, spec):
        """The conv stem (BatchNorm folded, so not counted): conv7×7/2, conv3×3, conv3×3, and
        the proj conv of kernel 8."""
        w, half = spec.stem_width, spec.img_size // 2
        convs = half * half * w * (3 * 7 * 7 + 2 * w * 3 * 3)
        return convs + spec.num_patches * spec.embed_dim * w * (spec.patch_size // 2) ** 2

    def head_tokens(self, spec):
        """CLS through head, and every patch token through aux_head."""
        return 1 + spec.num_patches


class DroppingFamily(Family):
    """A DeiT that drops the tokens it does not keep (EViT, DynamicViT): archs `<name>_<size>`
    on the DeiT backbones, the authors' checkpoint format read by the torch module."""

    drops_tokens = reads_args = True
    score_modes = ("official",)
    default_scores = "official"
    unsupported = {
        "elastic=True": "K is computed in the graph only for idle layers (onnx.elastic)",
        "plugin=True": "the IdleSelect/IdleScatter plugin form is written for idling; dropping "
                    "needs its own variant",
    }
    elastic = False  # sweep exports one fixed-K file per ratio

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.archs = {f"{cls.name}_{a.split('_')[1]}": {**v, "backbone": a}
                     for a, v in DeiTFamily.archs.items()}
        cls.weights_hint = f"pass a DeiT {cls.name} checkpoint with timm VisionTransformer keys"

    def arch_of(self, backbone: str) -> str:
        """The arch of this family on the DeiT `backbone`."""
        return next(a for a, v in self.archs.items() if v["backbone"] == backbone)

    def schedule(self, arch, schedule):
        """The authors' default pruning layers 3, 6, 9 (whatever the name), keeping r, r², r³."""
        return (3, 6, 9), (1, 2, 3)


# The authors' EViT model names (evit.py): deit_{size}_patch16[_{res}]_shrink[_base|NN]
EVIT_MODEL_NAME = re.compile(r"^deit_(tiny|small|base)_patch16_(?:(\d+)_)?shrink(_base|\d\d)?$")


class EViTFamily(DroppingFamily):
    """EViT (model/evit.py): no weights of its own, so its args tell it from a DeiT."""

    name, module, method, title = "evit", "idle_export.model.evit", "evit", "EViT"
    marker_args = ("base_keep_rate", "drop_loc", "fuse_token")
    extra_fields = ("fuse_token",)

    def claims(self, args):
        return super().claims(args) or bool(EVIT_MODEL_NAME.match(str((args or {}).get("model", ""))))

    def group(self, arch):
        return 3

    def keep_k(self, num_patches, keep_rate, layers, exponents, fuse_token=False):
        """K = ceil(r·(N−1)) of the N−1 non-CLS tokens entering each drop layer (a fused token
        counts); a layer where that keeps all of them does nothing and is left out."""
        out_layers, out_k, n = [], [], num_patches
        for layer in layers if keep_rate < 1 else ():
            k = math.ceil(keep_rate * n)
            if k < n:
                out_layers.append(layer)
                out_k.append(k)
                n = k + int(fuse_token)
        return tuple(out_layers), tuple(out_k)

    def macs(self, spec, dense=False, folded_scores=False):
        """A drop layer attends over all its N tokens, fuses (N−1−K)·C, then runs its MLP on
        1 + K (+1 fused) tokens; later blocks run on those. The CLS ranking is not counted."""
        c, hidden, fuse = spec.embed_dim, int(spec.embed_dim * spec.mlp_ratio), int(spec.fuse_token)
        total = self.embed_macs(spec) + c * spec.num_classes
        k_by_layer = {} if dense else spec.k_by_layer
        n = spec.num_patches + 1
        for layer in range(spec.depth):
            if layer not in k_by_layer:
                total += block_macs(n, c, hidden)
                continue
            k = k_by_layer[layer]
            total += attention_macs(n, c) + (n - 1 - k) * c * fuse
            n = 1 + k + fuse
            total += 2 * n * c * hidden
        return total


class DynamicViTFamily(DroppingFamily):
    """DynamicViT (model/dynamicvit.py): its score predictors are its marker keys."""

    name, module, method, title = "dynamicvit", "idle_export.model.dynamicvit", "dynamicvit", "DynamicViT"
    marker_keys = ("score_predictor.0.in_conv.0.weight",)

    def group(self, arch):
        return 1  # stage s keeps int(P·r^s)

    def macs(self, spec, dense=False, folded_scores=False):
        """Each predictor over the patch tokens entering its stage (C→C, C→C/2, C/2→C/4, C/4→2
        per token), then every block from there on over 1 + K_s tokens."""
        c, hidden = spec.embed_dim, int(spec.embed_dim * spec.mlp_ratio)
        total = self.embed_macs(spec) + c * spec.num_classes
        k_by_layer = {} if dense else spec.k_by_layer
        n = spec.num_patches + 1
        for layer in range(spec.depth):
            if layer in k_by_layer:
                total += (n - 1) * (c * c + c * (c // 2) + (c // 2) * (c // 4) + (c // 4) * 2)
                n = 1 + k_by_layer[layer]
            total += block_macs(n, c, hidden)
        return total


# The registry: a new family is one entry here (and its torch module).
DEIT, LVVIT, EVIT, DYNAMICVIT = DeiTFamily(), LVViTFamily(), EViTFamily(), DynamicViTFamily()
FAMILIES: dict[str, Family] = {f.name: f for f in (DEIT, LVVIT, EVIT, DYNAMICVIT)}
ARCH_FAMILY: dict[str, Family] = {a: f for f in FAMILIES.values() for a in f.archs}
ARCH_NAMES: tuple[str, ...] = tuple(ARCH_FAMILY)
ALIASES: dict[str, str] = {k: v for f in FAMILIES.values() for k, v in f.aliases.items()}


def canonical_arch(name: str) -> str:
    """The official short name of an arch or one of its aliases."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in ARCH_FAMILY:
        listed = [a for f in FAMILIES.values() if f.hint_aliases for a in f.aliases]
        raise BadInputError(
            f"unknown architecture {name!r}",
            f"use one of {', '.join(ARCH_NAMES)} (or the timm names {', '.join(listed)})",
        )
    return key


def family_of(arch: str) -> Family:
    """The family of an official short arch name (canonical_arch first for others)."""
    return ARCH_FAMILY[arch]


def detect_family(state_dict: dict, args: dict | None = None) -> Family:
    """The family whose marker keys the weights carry (or whose marker args the training args
    have), else the default one (DeiT). Two families at once is a CheckpointError: a
    checkpoint is never read as the wrong one."""
    marked = [f for f in FAMILIES.values() if f.owns(state_dict) or f.claims(args)]
    if len(marked) > 1:
        raise CheckpointError(f"the checkpoint looks like {' and '.join(f.method for f in marked)} at once "
                              "(its weights' keys and its training args disagree)",
                              f"pass family={marked[0].method} or family={marked[1].method}")
    return marked[0] if marked else next(f for f in FAMILIES.values() if f.is_default)


def infer_arch(state_dict: dict, args: dict | None = None) -> str | None:
    """The arch the weights look like: their family (detect_family) and, within it, the arch
    of their width (and depth); None without a cls_token."""
    cls = state_dict.get("cls_token")
    if cls is None or cls.ndim != 3:
        return None
    return detect_family(state_dict, args).infer_arch(state_dict, int(cls.shape[-1]))


def resolve_family(state_dict: dict, args: dict | None, *, arch: str | None = None,
                   method: str | None = None, name: str = "the checkpoint") -> Family:
    """The family to read a checkpoint as: the one its keys and args say (detect_family), unless
    --arch or --family (`method`) choose. Where the user's choice and the checkpoint disagree
    the choice must be explicit: --arch of another family than the detected one needs --family
    too, so an EViT checkpoint is never exported as IdleViT by accident."""
    if method is not None and method not in METHODS:
        raise BadInputError(f"family={method!r} is not one of {', '.join(METHODS)}",
                            f"use family={' or '.join(METHODS)}")
    detected = detect_family(state_dict, args)
    chosen = family_of(canonical_arch(arch)) if arch else None
    if chosen is not None and method is not None and chosen.method != method:
        raise BadInputError(f"arch={arch} is {chosen.a_title} arch, not family={method}",
                            f"drop arch=, or pass a {method} arch")
    if chosen is None and method is not None:
        if detected.method == method:
            chosen = detected
        else:  # within the method, the family the weights' keys fit (IdleViT: DeiT or LV-ViT)
            of_method = [f for f in FAMILIES.values() if f.method == method]
            chosen = next((f for f in of_method if f.owns(state_dict)),
                          next((f for f in of_method if not f.marker_keys), of_method[0]))
    if chosen is None:
        return detected
    if chosen.marker_keys and not chosen.owns(state_dict):
        raise BadInputError(f"{name} is not {chosen.a_title} checkpoint: it has no "
                            f"{chosen.marker_keys[0].split('.')[0]}.* weights",
                            f"drop family= / arch=: it reads as {detected.method}")
    says = detected.owns(state_dict) or detected.claims(args) or bool(args)  # not just bare weights
    if chosen.method != detected.method and method is None and says:
        raise BadInputError(f"{name} is {detected.a_title} checkpoint; arch={arch} is "
                            f"{chosen.a_title} arch", f"pass family={chosen.method} to read it "
                            f"as {chosen.title} anyway, or drop arch=")
    return chosen
