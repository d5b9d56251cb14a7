"""The family registry (model/families.py) is the one place that knows the model families: every
arch has exactly one family, seeded weights of each family are detected as it, each family's
torch module builds its models, and no other module branches on a family or arch name."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from idle_export.model.config import ModelSpec
from idle_export.model.families import (
    ALIASES,
    ARCH_NAMES,
    FAMILIES,
    canonical_arch,
    detect_family,
    family_of,
    infer_arch,
)

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = ROOT / "idle_export" / "model" / "families.py"
NAMES = set(FAMILIES) | set(ARCH_NAMES) | set(ALIASES)


def test_every_arch_has_exactly_one_family():
    owners = {arch: [f.name for f in FAMILIES.values() if arch in f.archs] for arch in ARCH_NAMES}
    assert all(len(o) == 1 for o in owners.values()), owners
    assert sorted(ARCH_NAMES) == sorted(a for f in FAMILIES.values() for a in f.archs)
    for name, family in FAMILIES.items():
        assert family.name == name and family.archs
        for arch in family.archs:
            assert family_of(arch) is family and ModelSpec.create(arch, 0.7).family == name
    for alias, arch in ALIASES.items():
        assert canonical_arch(alias) == arch and family_of(arch).aliases[alias] == arch
    # exactly one family detects weights and args that carry no family's markers
    assert sum(f.is_default for f in FAMILIES.values()) == 1


def _seeded(arch: str, *, meta: bool = False, **dims) -> dict:
    """build.seeded_state_dict of the arch (narrowed by dims); meta: shapes only, for the big ones."""
    import torch

    from idle_export.model.build import seeded_state_dict

    spec = ModelSpec.create(arch, 0.7, dims=dims or None, img_size=64 if dims else 224)
    with torch.device("meta" if meta else "cpu"):
        return seeded_state_dict(spec)


NARROW = dict(embed_dim=128, depth=16, num_heads=2, stem_width=8)  # a narrow LV-ViT-S test model


@pytest.mark.parametrize("arch, meta, dims", [
    ("deit_tiny", False, {}), ("lvvit_s", False, NARROW),  # seeded weights, as the demo writes
    *[(arch, True, {}) for arch in ARCH_NAMES],  # every arch at full size, shapes only
])
def test_detection_on_seeded_weights(arch, meta, dims):
    """The weights of each family are its own: detect_family and infer_arch read the family and
    arch back from the keys and shapes alone, or, for a family without weights of its own
    (EViT: DeiT's keys), from its training args too."""
    sd = _seeded(arch, meta=meta, **dims)
    family = family_of(arch)
    args = {family.marker_args[0]: 0.7} if family.marker_args else None
    assert detect_family(sd, args) is family
    assert infer_arch(sd, args) == arch
    if args:  # without them: the default family (the weights are DeiT's)
        assert detect_family(sd).is_default
    assert [f.name for f in FAMILIES.values() if f.owns(sd)] in ([], [family_of(arch).name])
    assert infer_arch({k: v for k, v in sd.items() if k != "cls_token"}) is None


def test_each_family_module_builds_its_models():
    """The lazily named torch module of each family offers build_model and seeded_state_dict,
    and build.build_model reaches it (a narrow model for speed where the family allows)."""
    from idle_export.model.build import build_model

    for family in FAMILIES.values():
        module = family.torch_module()
        assert module is importlib.import_module(family.module)
        assert callable(module.build_model) and callable(module.seeded_state_dict)
    spec = ModelSpec.create("lvvit_s", 0.7, img_size=64, dims=NARROW)
    model = build_model(spec, _seeded("lvvit_s", **NARROW))
    assert type(model).__module__ == family_of("lvvit_s").module and model.spec is spec


# --------------------------------------------------------------- no family branches elsewhere
def _named(node: ast.AST) -> bool:
    """A string constant naming a family or an arch (or starting with a family's name)."""
    return (isinstance(node, ast.Constant) and isinstance(node.value, str)
            and (node.value in NAMES or node.value.startswith(tuple(FAMILIES))))


def family_branches(source: str) -> list[int]:
    """Lines that compare with a family or arch name: `x == "lvvit"`, `arch in ("deit_tiny", …)`,
    `name.startswith("lvvit")`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            elements = [e for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set))
                        for e in o.elts]
            if any(_named(o) for o in operands + elements):
                lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith") and any(_named(a) for a in node.args)):
            lines.append(node.lineno)
    return lines


def test_no_module_but_the_registry_branches_on_a_family():
    found = [f"{p.relative_to(ROOT)}:{line}"
             for base in (ROOT / "idle_export", ROOT / "plugins") for p in sorted(base.rglob("*.py"))
             if p != REGISTRY for line in family_branches(p.read_text())]
    assert not found, "family branches outside model/families.py (ask the family object):\n" + \
        "\n".join(found)


def test_the_branch_checker_sees_planted_branches():
    planted = ('if spec.family == "lvvit":\n    pass\n'
               'x = arch in ("deit_tiny", "deit_small")\n'
               'y = name.startswith("lvvit")\n'
               'z = "deit" != fam\n'
               'ok = spec.family == family.name\n')
    assert family_branches(planted) == [1, 3, 4, 5]
