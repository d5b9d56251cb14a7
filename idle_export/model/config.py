"""ModelSpec: the one source of truth for architecture, idle layers and K per layer.

Light module (no torch): the CLI, the FLOP model and the ONNX metadata all read it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

from idle_export.errors import BadInputError
from idle_export.model.families import (  # noqa: F401 - SCORE_MODES and schedule_k are read from here
    SCHEDULE_NAMES,
    SCORE_MODES,
    SPEC_DIMS,
    SPEC_EXTRAS,
    canonical_arch,
    family_of,
    schedule_k,
)

# timm's eval preprocessing for DeiT (resize 224/0.875 bicubic, centre crop, ImageNet mean/std)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_keep_rate(rate: float) -> float:
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise BadInputError(f"keep rate {rate!r} is not a number", "pass a fraction such as 0.7") from None
    if math.isnan(rate) or not 0.0 < rate <= 1.0:
        raise BadInputError(
            f"keep rate {rate} is outside (0, 1]", "pass a fraction such as 0.7"
        )
    return rate


def schedule_exponents(arch: str, num_idle: int) -> tuple[int, ...]:
    """The exponent p of keep_rate**p of each of `num_idle` idle layers: the i-th keeps
    r**(i//G + 1) as in the official scripts (groups of G: three for DeiT, four for LV-ViT-S, five
    for LV-ViT-M: Family.group). Every preset schedule (Family.schedule) follows this rule."""
    group = family_of(arch).group(arch)
    return tuple(i // group + 1 for i in range(num_idle))


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the deployed graph (and its FLOP count) from weights."""

    arch: str
    keep_rate: float | None  # None: K per layer given explicitly
    idle_layers: tuple[int, ...]
    keep_k: tuple[int, ...]  # patch tokens kept in each idle layer (CLS always kept in addition)
    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = field(default=0)
    depth: int = field(default=0)
    num_heads: int = field(default=0)
    stem_width: int = field(default=0)  # LV-ViT's conv stem (0 for DeiT, which has none)
    fuse_token: bool = False  # EViT: the dropped tokens summed into one extra token
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        info = family_of(self.arch).archs[self.arch]
        for key in family_of(self.arch).dim_keys:
            if not getattr(self, key):
                object.__setattr__(self, key, info[key])
        if self.embed_dim % self.num_heads:
            raise BadInputError(f"width {self.embed_dim} does not split into {self.num_heads} heads",
                                "check the checkpoint's architecture")
        n = self.num_patches
        if len(self.idle_layers) != len(self.keep_k):
            raise BadInputError(
                f"{len(self.idle_layers)} idle layers but {len(self.keep_k)} K values",
                "give one K per idle layer",
            )
        if len(set(self.idle_layers)) != len(self.idle_layers):
            raise BadInputError(f"idle layers {list(self.idle_layers)} repeat a layer",
                                "list each layer once")
        for layer, k in zip(self.idle_layers, self.keep_k):
            if not 0 <= layer < self.depth:
                raise BadInputError(
                    f"idle layer {layer} is out of range for {self.arch} (layers 0..{self.depth - 1})",
                    f"choose idle layers between 0 and {self.depth - 1}",
                )
            if not 1 <= k <= n:
                raise BadInputError(
                    f"idle layer {layer} would keep {k} of {n} patch tokens",
                    "K must be between 1 and the number of patch tokens; raise the keep rate",
                )

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        arch: str,
        keep_rate: float | None = None,
        *,
        schedule: str = "eval",
        idle_layers: list[int] | None = None,
        keep_k: list[int] | None = None,
        num_classes: int = 1000,
        img_size: int = 224,
        dims: dict[str, int] | None = None,
        fuse_token: bool = False,
    ) -> ModelSpec:
        """The official K rule, K = int(N * keep_rate ** p) in Python floats, or explicit K.
        LV-ViT has one schedule per arch (the official eval and training scripts agree), so
        `schedule` only chooses for DeiT; `dims` (embed_dim, depth, num_heads, stem_width)
        describes a narrower LV-ViT than the arch's, as read from its weights. The family's K
        rule (Family.keep_k; EViT's leaves out drop layers that would keep every token)."""
        arch = canonical_arch(arch)
        family = family_of(arch)
        n = (img_size // 16) ** 2
        if schedule not in SCHEDULE_NAMES:
            raise BadInputError(f"unknown schedule {schedule!r}", f"use one of {', '.join(SCHEDULE_NAMES)}")
        preset_layers, preset_pows = family.schedule(arch, schedule)
        layers = tuple(preset_layers if idle_layers is None else idle_layers)
        if keep_k is not None:
            if keep_rate is not None:
                keep_rate = check_keep_rate(keep_rate)
            ks = tuple(int(k) for k in keep_k)
        else:
            if keep_rate is None:
                raise BadInputError(
                    "no keep rate: the checkpoint has no args.base_rate",
                    "pass keep=0.7 (the rate the model was trained with) or keep_k=",
                )
            keep_rate = check_keep_rate(keep_rate)
            pows = preset_pows if idle_layers is None else schedule_exponents(arch, len(layers))
            layers, ks = family.keep_k(n, keep_rate, layers, pows, fuse_token)
        extras = {"fuse_token": bool(fuse_token)} if "fuse_token" in family.extra_fields else {}
        return cls(arch=arch, keep_rate=keep_rate, idle_layers=layers, keep_k=ks,
                   num_classes=num_classes, img_size=img_size, **(dims or {}), **extras)

    # ------------------------------------------------------------------ derived
    @property
    def family(self) -> str:
        """The name of the arch's model family (families.FAMILIES: "deit", "lvvit")."""
        return family_of(self.arch).name

    @property
    def method(self) -> str:
        """The token reduction (families.METHODS): idlevit, evit, dynamicvit."""
        return family_of(self.arch).method

    @property
    def drops_tokens(self) -> bool:
        """Unselected tokens are dropped (EViT, DynamicViT): the selections are positions in an
        already reduced, reordered sequence (parity.compare maps them to patch numbers)."""
        return family_of(self.arch).drops_tokens

    @property
    def mlp_ratio(self) -> float:
        return family_of(self.arch).mlp_ratio(self.arch)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def exponents(self) -> tuple[int, ...]:
        """The exponent p of keep_rate**p of each idle layer (schedule_exponents)."""
        return schedule_exponents(self.arch, len(self.idle_layers))

    @property
    def follows_schedule(self) -> bool:
        """Whether K per layer is the schedule's at keep_rate (not explicit --keep-k)."""
        return (self.keep_rate is not None and (self.idle_layers, self.keep_k) == family_of(self.arch).keep_k(
            self.num_patches, self.keep_rate, self.idle_layers, self.exponents, self.fuse_token))

    def at_rate(self, keep_rate: float) -> ModelSpec:
        """The same model at another keep rate: K per idle layer recomputed by the schedule."""
        rate = check_keep_rate(keep_rate)
        layers, ks = family_of(self.arch).keep_k(self.num_patches, rate, self.idle_layers, self.exponents,
                                                 self.fuse_token)
        return replace(self, keep_rate=rate, idle_layers=layers, keep_k=ks)

    @property
    def k_by_layer(self) -> dict[int, int]:
        return dict(zip(self.idle_layers, self.keep_k))

    def embed_macs(self) -> int:
        """MACs of the patch embedding of one image, which idle layers do not shrink: DeiT's
        linear patch projection, or LV-ViT's conv stem (the family's Family.embed_macs)."""
        return family_of(self.arch).embed_macs(self)

    def macs(self, dense: bool = False, folded_scores: bool = False) -> int:
        """Multiply-accumulates of one image: the FLOP model bench uses (LayerNorm, softmax,
        GELU, ReLU and adds are not counted; they are O(N·C)), the family's (Family.macs): the
        patch embedding (LV-ViT: the conv stem), every block's linears and attention matmuls over
        its tokens, the selection score per mode, the CLS head and LV-ViT's aux head over every
        patch token; EViT and DynamicViT count their shrinking sequence."""
        return family_of(self.arch).macs(self, dense=dense, folded_scores=folded_scores)

    # ------------------------------------------------------------------ metadata
    def to_metadata(self) -> dict[str, str]:
        family = family_of(self.arch)
        d = asdict(self)
        for key in (set(SPEC_DIMS) - set(family.dim_keys)) | (set(SPEC_EXTRAS) - set(family.extra_fields)):
            del d[key]  # DeiT files keep the metadata they had (no stem_width), plus the family
        return {f"idle_export.{k}": json.dumps(v) for k, v in {"family": family.name, **d}.items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> ModelSpec:
        prefix = "idle_export."
        args = {}
        for name in cls.__dataclass_fields__:
            if prefix + name in props:
                value = json.loads(props[prefix + name])
                args[name] = tuple(value) if isinstance(value, list) else value
        if "arch" not in args:
            raise BadInputError(
                "the ONNX file has no idle-export metadata",
                "export it with `idle-export onnx`, or pass the checkpoint",
            )
        family = json.loads(props.get(prefix + "family", "null"))
        if family is not None and family != family_of(canonical_arch(args["arch"])).name:
            raise BadInputError(f"the ONNX metadata says family {family!r} but arch {args['arch']!r}",
                                "re-export the model with `idle-export onnx`")
        return cls(**args)

    def describe(self) -> str:
        rate = "explicit K" if self.keep_rate is None else f"keep {self.keep_rate:g}"
        fused = ", fused token" if self.fuse_token else ""
        ks = ",".join(str(k) for k in self.keep_k)
        layers = ",".join(str(i) for i in self.idle_layers)
        arch = self.arch
        info = family_of(arch).archs[arch]
        if any(getattr(self, k) != info[k] for k in ("embed_dim", "depth", "stem_width") if k in info):
            arch += f" (width {self.embed_dim}, {self.depth} blocks" + (
                f", stem {self.stem_width})" if "stem_width" in family_of(arch).dim_keys else ")")
        what = "drop layers" if self.drops_tokens else "idle layers"
        return f"{arch} {rate}, {what} {layers or '-'}, K {ks or '-'}{fused}"


@dataclass(frozen=True)
class Tolerances:
    """What `check` demands of runner A against reference B."""

    max_abs: float = 1e-4  # on logits
    min_top1: float = 1.0  # fraction of images whose top-1 class agrees
    min_selection: float = 1.0  # fraction of (image, layer) pairs with the same kept set, ties aside
    tie_atol: float = 1e-6  # a differing token is a tie if its reference score is this close to
    tie_rtol: float = 1e-5  # the K-th largest score (absolute + relative to the largest |score|)
    # after an image's first differing kept set that is a tie, its later idle layers see other
    # tokens (a token kept in one run and idle in the other leaves the layer with another value)
    # and are counted as agreeing: only where divergence starts is judged
    after_tie: bool = False
    # a top-1 disagreement where the reference's logits of the two classes are this close counts
    # as agreeing (reported apart: top1_raw, top1_ties)
    top1_margin: float = 0.0


TOLERANCES = {
    "fp32": Tolerances(),
    # FP16: scores are computed in FP32 from FP16 activations, which moves them by up to ~3% of
    # their range in the last idle layers (measured on the trained photos10 model)
    "fp16": Tolerances(max_abs=5e-2, min_top1=0.99, min_selection=0.95, tie_atol=1e-3, tie_rtol=3e-2),
    # OpenVINO at bf16 (check --precision bf16): the GEMMs in bf16 move the residual stream, so
    # scores move by ~0.1-0.5 % of their range even where the score path is f32, and one flipped
    # near-tie changes every later layer of that image. Each image's first differing kept set
    # must be a near-tie (≤ 1 % of the largest |score|; all were ≤ 0.5 % on photos10), later
    # layers are not held (after_tie). docs/export.md#bf16-on-openvino
    # Logits move by ≤ 0.04 there; a top-1 flip is a tie when the two logits are ≤ 0.05 apart
    # (seeded noise flipped one of 32 images whose top two logits were 0.009 apart).
    "bf16": Tolerances(max_abs=0.1, min_top1=0.99, min_selection=1.0, tie_atol=1e-3, tie_rtol=1e-2,
                       after_tie=True, top1_margin=0.05),
    "int8": Tolerances(max_abs=float("inf"), min_top1=0.99, min_selection=0.0, tie_atol=1e-3,
                       tie_rtol=5e-2),
}
