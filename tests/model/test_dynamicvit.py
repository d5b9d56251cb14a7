"""DynamicViT (model/dynamicvit.py): the torch module equals an independent float64 reference
of the paper, the authors' own models/dyvit.py on the same weights, and its ONNX export;
checkpoint format."""

from __future__ import annotations

import argparse

import pytest
import torch

from idle_export.errors import BadInputError
from idle_export.model.config import ModelSpec
from idle_export.model.dynamicvit import (
    DynamicViTSpec,
    build_dynamicvit,
    dynamicvit_spec_from_checkpoint,
    is_dynamicvit_state_dict,
    macs,
    original_ids,
    predictor_macs,
    write_dynamicvit_demo_checkpoint,
)
from idle_export.model.evit import is_evit_checkpoint
from idle_export.model.pruning_common import seeded_spread
from tests.authors_code import Unavailable, import_dyvit
from tests.dynamicvit_reference import dynamicvit_reference
from tests.evit_reference import as_float64

NUM_CLASSES = 100
SPEC = DynamicViTSpec("deit_tiny", 0.7, num_classes=NUM_CLASSES)


@pytest.fixture(autouse=True)
def one_thread():
    """The per-image reference is many small float64 ops: threads only contend on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights() -> dict:
    torch.manual_seed(0)
    return seeded_spread(build_dynamicvit(SPEC).authors_state_dict(), 0)


def _images(batch: int, seed: int = 200) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed + batch))


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_matches_reference_fp32(weights, batch):
    model = build_dynamicvit(SPEC, weights, emit_selection=True)
    images = _images(batch)
    with torch.no_grad():
        logits, *selections = model(images)
    ids = original_ids(selections, SPEC)
    sd64 = as_float64(weights)
    for b in range(batch):
        ref, kept = dynamicvit_reference(sd64, images[b], depth=12, num_heads=3, keep_rate=0.7,
                                         pruning_loc=SPEC.pruning_loc)
        assert (logits[b].double() - ref).abs().max().item() <= 1e-5
        for layer, got in zip(SPEC.pruning_loc, ids):
            assert sorted(got[b].tolist()) == sorted(kept[layer]), f"layer {layer} image {b}"


def test_selection_changes_the_logits(weights):
    images = _images(2)
    with torch.no_grad():
        dense = build_dynamicvit(SPEC, weights, dense=True)(images)
        pruned = build_dynamicvit(SPEC, weights)(images)
    assert (dense - pruned).abs().max() > 1e-2


def test_keep_counts_follow_the_authors_formula():
    # int(196 * r**s) of the initial count, Python float powers
    assert SPEC.keep_k == (137, 96, 67)
    assert DynamicViTSpec("deit_small", 0.5).keep_k == (98, 49, 24)
    assert DynamicViTSpec("deit_small", 0.9).keep_k == (176, 158, 142)
    assert SPEC.token_ratio == (0.7, 0.7 ** 2, 0.7 ** 3)
    with pytest.raises(BadInputError):
        DynamicViTSpec("deit_tiny", 0.1)  # int(196 * 0.001) == 0 tokens


def test_macs():
    dense = ModelSpec.create("deit_tiny", 1.0, idle_layers=[], keep_k=[], num_classes=NUM_CLASSES)
    assert macs(SPEC, dense=True) == dense.macs(dense=True)
    assert macs(SPEC) < macs(SPEC, dense=True)
    c = 192
    assert predictor_macs(196, c) == 196 * (c * c + c * 96 + 96 * 48 + 48 * 2)


def test_matches_authors_code(weights, tmp_path, monkeypatch):
    try:
        authors = import_dyvit(tmp_path, monkeypatch)
    except Unavailable as exc:
        pytest.skip(f"the authors' models/dyvit.py cannot run here: {exc}")
    theirs = authors.VisionTransformerDiffPruning(
        patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, qkv_bias=True,
        num_classes=NUM_CLASSES, pruning_loc=list(SPEC.pruning_loc),
        token_ratio=list(SPEC.token_ratio)).eval()
    theirs.load_state_dict(weights, strict=True)
    ours = build_dynamicvit(SPEC, weights, emit_selection=True)
    images = _images(4)
    with torch.no_grad():
        their_logits = theirs(images)
        logits, *selections = ours(images)
    assert (logits - their_logits).abs().max().item() <= 1e-5
    # their gathers: [0, keep + 1] per stage, positions among the current tokens
    their_sel = [g[:, 1:] - 1 for g in authors.gathers]
    assert len(their_sel) == 3
    for a, b in zip(original_ids(their_sel, SPEC), original_ids(selections, SPEC)):
        assert a.sort(dim=1).values.equal(b.sort(dim=1).values)


def test_onnx_matches_torch(weights, tmp_path):
    import onnx
    import onnxruntime as ort

    from idle_export.onnx.export import export_onnx

    model = build_dynamicvit(SPEC, weights, emit_selection=True)
    path = export_onnx(model, tmp_path / "dynamicvit.onnx", metadata=SPEC.to_metadata())
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "TopK" in ops and not ops & {"NonZero", "Loop", "If", "Unique"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert len(session.get_outputs()) == 4
    for batch in (1, 7):
        images = _images(batch, seed=9)
        outs = session.run(None, {session.get_inputs()[0].name: images.numpy()})
        with torch.no_grad():
            logits, *selections = model(images)
        assert abs(outs[0] - logits.numpy()).max() <= 1e-5
        for got, want in zip(outs[1:], selections):
            assert (got == want.numpy()).all()


# ---------------------------------------------------------------------- checkpoint format
def test_demo_checkpoint_round_trip(tmp_path):
    from idle_export.model.checkpoint import load_checkpoint

    spec = DynamicViTSpec("deit_tiny", 0.8, num_classes=10)
    path = write_dynamicvit_demo_checkpoint(tmp_path / "dyvit.pth", spec, seed=1)
    ckpt = load_checkpoint(path)
    assert is_dynamicvit_state_dict(ckpt.state_dict)
    assert not is_evit_checkpoint(ckpt.state_dict, ckpt.args)
    assert ckpt.args["model"] == "deit-t" and ckpt.args["base_rate"] == 0.8
    assert dynamicvit_spec_from_checkpoint(ckpt.state_dict, ckpt.args) == spec
    build_dynamicvit(spec, ckpt.state_dict)
    raw = torch.load(path, map_location="cpu", weights_only=False)
    assert isinstance(raw["args"], argparse.Namespace)
    assert {"model", "optimizer", "epoch", "scaler", "args", "best", "best_ema"} <= set(raw)


def test_spec_from_checkpoint_needs_a_rate(weights):
    with pytest.raises(BadInputError, match="base_rate"):
        dynamicvit_spec_from_checkpoint(weights, {"model": "deit-t"})
    assert dynamicvit_spec_from_checkpoint(weights, None, keep_rate=0.7) == SPEC
    with pytest.raises(BadInputError):  # a deit-s name on deit_tiny weights
        dynamicvit_spec_from_checkpoint(weights, {"model": "deit-s", "base_rate": 0.7})
    plain = {k: v for k, v in weights.items() if not k.startswith("score_predictor.")}
    assert not is_dynamicvit_state_dict(plain)
