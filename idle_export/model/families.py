"""Model families: the one place that knows which architectures exist and how they differ.

One Family per model family (DeiT on timm, LV-ViT): its archs and their dims, the checkpoint
keys that say "this is one of mine", the arch its weights look like, its K schedule, the parts
of the MAC count that differ, and the name of its torch module (imported only when a model is
built). Light module (no torch): the CLI and ModelSpec read it. The token selection all
families share is model/selection.py. Adding a family: docs/design.md, "Adding a model family".

A family's torch module offers build_model(spec, state_dict=None, *, dense, emit_selection,
score_mode, fold_bn) and seeded_state_dict(spec, seed) (model/build.py calls them).
"""

from __future__ import annotations

import importlib

from idle_export.errors import BadInputError, CheckpointError

# What a preset schedule is called; DeiT has one of each, LV-ViT one per arch for both names.
SCHEDULE_NAMES = ("eval", "train")
SPEC_DIMS = ("embed_dim", "depth", "num_heads", "stem_width")  # ModelSpec fields read from weights


def block_count(state_dict: dict) -> int:
    """Transformer blocks in the weights (1 + the largest N of `blocks.N.` keys, 0 if none)."""
    found = [int(k.split(".")[1]) for k in state_dict
             if k.startswith("blocks.") and k.split(".")[1].isdigit()]
    return max(found, default=-1) + 1


class Family:
    """What one model family is; subclasses fill in the tables and override what differs."""

    name = ""  # ModelSpec.family
    module = ""  # its torch module (build_model, seeded_state_dict), imported lazily
    archs: dict[str, dict] = {}  # official short name → embed_dim, depth, num_heads, …
    aliases: dict[str, str] = {}  # other accepted names → short name
    hint_aliases = False  # list the aliases in the unknown-arch hint (the timm names)
    marker_keys: tuple[str, ...] = ()  # checkpoint keys only this family has (none: the default)
    dim_keys: tuple[str, ...] = ("embed_dim", "depth", "num_heads")  # the ModelSpec dims it uses
    official_code = False  # the authors' code runs it (bench's torch-official backend)
    weights_hint = ""  # what to pass when the keys do not fit

    def torch_module(self):
        """The family's torch module (imports torch)."""
        return importlib.import_module(self.module)

    def owns(self, state_dict: dict) -> bool:
        """The weights carry this family's marker keys."""
        return bool(self.marker_keys) and all(k in state_dict for k in self.marker_keys)

    def infer_arch(self, state_dict: dict, width: int) -> str | None:
        """The arch of this family that weights with a `width`-wide cls_token look like."""
        return next((a for a, i in self.archs.items() if i["embed_dim"] == width), None)

    def dims_from_weights(self, state_dict: dict, arch: str, name: str) -> dict[str, int] | None:
        """ModelSpec dims read from the weights (a narrower model than the arch's), or None: the
        arch's own. `name`: the checkpoint's file name, for messages."""
        return None

    def schedule(self, arch: str, schedule: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The preset `schedule` (SCHEDULE_NAMES): (idle layers, exponent p of keep_rate**p per
        idle layer)."""
        raise NotImplementedError

    def group(self, arch: str) -> int:
        """Idle layers per power of r (config.schedule_exponents): the official groups."""
        return 3

    def mlp_ratio(self, arch: str) -> float:
        return float(self.archs[arch].get("mlp_ratio", 4.0))

    def embed_macs(self, spec) -> int:
        """MACs of the patch embedding of one image: a linear patch projection."""
        return spec.num_patches * 3 * spec.patch_size**2 * spec.embed_dim

    def head_tokens(self, spec) -> int:
        """Tokens that go through a classifier head (the CLS token)."""
        return 1


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
                f"the weights look like {guess}: pass --arch {guess}" if guess else
                "pass an LV-ViT checkpoint with the official keys (patch_embed.conv1 …, aux_head)")
        width, depth = int(cls.shape[-1]), block_count(sd)
        if depth != self.archs[arch]["depth"]:  # the depth sets the idle layers: it must fit
            guess = infer_arch(sd)
            raise CheckpointError(
                f"weights do not fit {arch}: {name} has {depth} blocks, {arch} "
                f"{self.archs[arch]['depth']}", f"pass --arch {guess}" if guess else
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


# The registry: a new family is one entry here (and its torch module).
DEIT, LVVIT = DeiTFamily(), LVViTFamily()
FAMILIES: dict[str, Family] = {f.name: f for f in (DEIT, LVVIT)}
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


def detect_family(state_dict: dict) -> Family:
    """The family whose marker keys the weights carry, else the one without markers (DeiT)."""
    marked = [f for f in FAMILIES.values() if f.owns(state_dict)]
    return marked[0] if marked else next(f for f in FAMILIES.values() if not f.marker_keys)


def infer_arch(state_dict: dict) -> str | None:
    """The arch the weights look like: their family (detect_family) and, within it, the arch
    of their width (and depth); None without a cls_token."""
    cls = state_dict.get("cls_token")
    if cls is None or cls.ndim != 3:
        return None
    return detect_family(state_dict).infer_arch(state_dict, int(cls.shape[-1]))
