"""The Family base class and what every family's numbers share: the K rule of the official
schedules, the MACs of a ViT block, the names of score modes and token-reduction methods. Light
module (no torch); the registry of concrete families is model/families.py."""

from __future__ import annotations

import importlib

from idle_export.errors import BadInputError

# What a preset schedule is called; DeiT has one of each, LV-ViT one per arch for both names.
SCHEDULE_NAMES = ("eval", "train")
SPEC_DIMS = ("embed_dim", "depth", "num_heads", "stem_width")  # ModelSpec fields read from weights
SPEC_EXTRAS = ("fuse_token",)  # ModelSpec fields only some families have (Family.extra_fields)
# How idle layers rank tokens (model.IdleBlock): the paper's q_cls·k, or xn·(Wkᵀq_cls) (same top-K).
SCORE_MODES = ("official", "folded")
# The token-reduction methods (`--family`): a Family's `method`.
METHODS = ("idlevit", "evit", "dynamicvit")


def schedule_k(num_patches: int, keep_rate: float, exponents) -> tuple[int, ...]:
    """The official K rule, K = int(N * keep_rate ** p) in Python floats, per exponent: the one
    place it is written (the elastic graph's threshold tables, onnx.elastic, are derived from it)."""
    return tuple(int(num_patches * keep_rate**p) for p in exponents)


def block_macs(n: int, c: int, hidden: int) -> int:
    """One ViT block over n tokens: qkv, q·kᵀ, attn·v, proj, MLP (LayerNorm, softmax, GELU and
    adds are not counted)."""
    return attention_macs(n, c) + 2 * n * c * hidden


def attention_macs(n: int, c: int) -> int:
    """The attention half of a block over n tokens (qkv, two matmuls, proj)."""
    return n * c * 3 * c + 2 * n * n * c + n * c * c


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
    marker_args: tuple[str, ...] = ()  # training args only this family's checkpoints have
    extra_fields: tuple[str, ...] = ()  # the SPEC_EXTRAS this family's ModelSpec uses
    official_code = False  # the authors' code runs it (bench's torch-official backend)
    weights_hint = ""  # what to pass when the keys do not fit
    method = "idlevit"  # the token reduction (METHODS): idle layers, or dropping tokens
    drops_tokens = False  # unselected tokens are dropped (the sequence shrinks), not idled
    title = "IdleViT"  # what the family is called in messages and the ONNX doc string
    score_modes = SCORE_MODES  # the token scores it can be exported with
    default_scores = "folded"  # the export's default (the same top-K as the paper's, fewer FLOPs)
    reads_args = False  # its torch module reads the spec from the checkpoint (spec_from_checkpoint)
    elastic = True  # it has the elastic form (onnx --elastic); sweep runs that one file at each ratio
    # What the family cannot do yet: feature → the reason (`refuse(feature)`, exit 2)
    unsupported: dict[str, str] = {}

    def torch_module(self):
        """The family's torch module (imports torch)."""
        return importlib.import_module(self.module)

    def owns(self, state_dict: dict) -> bool:
        """The weights carry this family's marker keys."""
        return bool(self.marker_keys) and all(k in state_dict for k in self.marker_keys)

    def claims(self, args: dict | None) -> bool:
        """The training args are this family's (its marker_args)."""
        return bool(args) and any(k in args for k in self.marker_args)

    @property
    def a_title(self) -> str:
        """The title with its article: "an IdleViT", "a DynamicViT"."""
        return f"{'an' if self.title[0] in 'AEIOU' else 'a'} {self.title}"

    @property
    def is_default(self) -> bool:
        """The family of weights and args that no family claims (DeiT)."""
        return not self.marker_keys and not self.marker_args

    def refuse(self, feature: str, hint: str = "use a plain fixed-K export") -> None:
        """BadInputError (exit 2) when the family cannot do `feature` (its `unsupported`)."""
        if feature in self.unsupported:
            raise BadInputError(f"{feature} is not supported for {self.title} models: "
                                f"{self.unsupported[feature]}", hint)

    def scores(self, score_mode: str | None) -> str:
        """The score mode to export with: `score_mode`, or the family's default when None."""
        if score_mode is None:
            return self.default_scores
        if score_mode not in self.score_modes:
            raise BadInputError(f"scores={score_mode} is not a way {self.title} ranks tokens",
                                f"use scores={' or scores='.join(self.score_modes)}")
        return score_mode

    def backbone(self, arch: str) -> str:
        """The timm arch the model is built on (DeiT: the arch itself)."""
        return self.archs[arch].get("backbone", arch)

    def keep_k(self, num_patches: int, keep_rate: float, layers, exponents,
               fuse_token: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(idle layers, K per idle layer) at `keep_rate`: schedule_k by default."""
        return tuple(layers), schedule_k(num_patches, keep_rate, exponents)

    def macs(self, spec, dense: bool = False, folded_scores: bool = False) -> int:
        """Multiply-accumulates of one image (ModelSpec.macs): the patch embedding, every
        block's linears and attention matmuls over its tokens, the selection score per mode, the
        CLS head (and LV-ViT's aux head over every patch token)."""
        c, n, hidden = spec.embed_dim, spec.num_patches + 1, int(spec.embed_dim * spec.mlp_ratio)
        total = self.embed_macs(spec) + self.head_tokens(spec) * c * spec.num_classes
        k_by_layer = {} if dense else spec.k_by_layer
        for layer in range(spec.depth):
            if layer not in k_by_layer:
                total += block_macs(n, c, hidden)
                continue
            s = k_by_layer[layer] + 1  # selected tokens, CLS included
            if folded_scores:  # w = xn_0 (Wqᵀ Wk) + bq Wk, score = xn·w, keys only for the kept tokens
                select = c * c + n * c
                qkv = s * c * 3 * c
            else:  # official: q_cls, keys for every token, q_cls·k
                select = c * c + n * c * c + n * c
                qkv = s * c * 2 * c
            total += select + qkv + 2 * s * s * c + s * c * c + 2 * s * c * hidden
        return total

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
