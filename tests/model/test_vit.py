"""The torch IdleViT equals an independent reference of the math, and keep=1.0 equals dense."""

from __future__ import annotations

import pytest
import torch

from idle_export.model.config import ModelSpec
from idle_export.model.vit import build_model
from tests.reference import reference_forward


def _spread_weights(spec: ModelSpec, seed: int) -> dict:
    """Seeded weights with a real spread (timm's init makes scores nearly flat), so that a
    wrong selection changes the logits and the comparison can fail."""
    g = torch.Generator().manual_seed(seed)
    sd = build_model(spec).vit.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            out[k] = 1.0 + 0.3 * torch.randn(v.shape, generator=g)
        else:
            out[k] = 0.15 * torch.randn(v.shape, generator=g)
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.7, 0.9, 1.0])
def test_idle_model_equals_reference(seed, keep):
    spec = ModelSpec.create("deit_tiny", keep)
    sd = _spread_weights(spec, seed)
    model = build_model(spec, sd, emit_selection=True).double()
    batch = 8 if seed == 0 else 1
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(100 + seed),
                         dtype=torch.float64)
    with torch.no_grad():
        logits, *selections = model(images)
    for b in range(batch):
        ref_logits, ref_kept = reference_forward(sd, depth=spec.depth, num_heads=spec.num_heads,
                                                 k_by_layer=spec.k_by_layer, image=images[b])
        torch.testing.assert_close(logits[b], ref_logits, rtol=1e-9, atol=1e-9)
        for layer, sel in zip(spec.idle_layers, selections):
            assert sel[b, 0].item() == 0  # CLS always kept, first
            got = sorted((sel[b, 1:] - 1).tolist())
            assert got == ref_kept[layer], f"layer {layer} sample {b}"


def test_reference_is_sensitive_to_selection():
    """Guard for the test above: with these weights idle and dense logits differ clearly."""
    spec = ModelSpec.create("deit_tiny", 0.5)
    sd = _spread_weights(spec, 0)
    image = torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(7))
    idle, _ = reference_forward(sd, depth=12, num_heads=3, k_by_layer=spec.k_by_layer, image=image)
    dense, _ = reference_forward(sd, depth=12, num_heads=3, k_by_layer={}, image=image)
    assert (idle - dense).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["deit_tiny", "deit_small"])
def test_keep_one_equals_dense(arch):
    spec = ModelSpec.create(arch, 1.0)
    assert spec.keep_k == (196,) * 9
    torch.manual_seed(3)
    dense = build_model(spec, dense=True)
    idle = build_model(spec, dense.vit.state_dict())
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(idle(x), dense(x), rtol=1e-5, atol=1e-5)


def test_dense_equals_timm():
    spec = ModelSpec.create("deit_tiny", 0.7)
    torch.manual_seed(4)
    dense = build_model(spec, dense=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), dense.vit(x), rtol=0, atol=0)


def test_unselected_tokens_pass_through_and_can_return():
    """An idle layer leaves unselected tokens bit-identical; a later layer may select them."""
    spec = ModelSpec.create("deit_tiny", 0.5)
    model = build_model(spec, _spread_weights(spec, 2), emit_selection=True)
    layer = model.layers[3]
    x = torch.randn(2, 197, spec.embed_dim)
    with torch.no_grad():
        out, idx = layer(x)
    mask = torch.zeros(2, 197, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    assert torch.equal(out[~mask], x[~mask])
    assert not torch.equal(out[mask], x[mask])
    with torch.no_grad():
        _, *sel = model(torch.randn(2, 3, 224, 224))
    first = set(sel[0][0].tolist())
    later = set().union(*(set(s[0].tolist()) for s in sel[1:]))
    assert later - first, "some token idle in layer 3 is selected again later"


def test_folded_scores_select_the_same_tokens():
    spec = ModelSpec.create("deit_tiny", 0.7)
    sd = _spread_weights(spec, 5)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        off, *sel_o = build_model(spec, sd, emit_selection=True).double()(x)
        fol, *sel_f = build_model(spec, sd, emit_selection=True, score_mode="folded").double()(x)
    torch.testing.assert_close(off, fol, rtol=1e-9, atol=1e-9)
    for a, b in zip(sel_o, sel_f):
        assert torch.equal(a.sort(1).values, b.sort(1).values)
