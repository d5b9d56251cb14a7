"""EViT (model/evit.py): the torch module equals an independent float64 reference of the
paper, the authors' own evit.py on the same weights, and its ONNX export; checkpoint format."""

from __future__ import annotations

import argparse

import pytest
import torch

from idle_export.errors import BadInputError
from idle_export.model.config import ModelSpec
from idle_export.model.evit import (
    EViTSpec,
    build_evit,
    evit_spec_from_checkpoint,
    is_evit_checkpoint,
    macs,
    original_ids,
    write_evit_demo_checkpoint,
)
from idle_export.model.pruning_common import create_deit, seeded_spread
from tests.authors_code import Unavailable, import_evit
from tests.evit_reference import as_float64, evit_reference

NUM_CLASSES = 100


@pytest.fixture(autouse=True)
def one_thread():
    """The per-image reference is many small float64 ops: threads only contend on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights() -> dict:
    return seeded_spread(create_deit("deit_tiny", NUM_CLASSES).state_dict(), 0)


def _images(batch: int, seed: int = 100) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed + batch))


def _spec(fuse: bool, rate: float = 0.7) -> EViTSpec:
    return EViTSpec("deit_tiny", rate, fuse_token=fuse, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("batch", [1, 7, 32])
def test_matches_reference_fp32(weights, fuse, batch):
    spec = _spec(fuse)
    model = build_evit(spec, weights, emit_selection=True)
    images = _images(batch)
    with torch.no_grad():
        logits, *selections = model(images)
    ids = original_ids(selections, spec)
    sd64 = as_float64(weights)
    for b in range(batch):
        ref, kept = evit_reference(sd64, images[b], depth=12, num_heads=3, keep_rate=0.7,
                                   drop_loc=spec.drop_loc, fuse=fuse)
        assert (logits[b].double() - ref).abs().max().item() <= 1e-5
        assert list(kept) == list(spec.idle_layers)
        for layer, got in zip(spec.idle_layers, ids):
            assert sorted(got[b].tolist()) == sorted(kept[layer]), f"layer {layer} image {b}"


def test_selection_changes_the_logits(weights):
    """Guard for the comparison above: pruning moves the logits clearly with these weights,
    and fusing differs from dropping."""
    images = _images(2)
    with torch.no_grad():
        dense = build_evit(_spec(False), weights, dense=True)(images)
        dropped = build_evit(_spec(False), weights)(images)
        fused = build_evit(_spec(True), weights)(images)
    assert (dense - dropped).abs().max() > 1e-2
    assert (fused - dropped).abs().max() > 1e-3


def test_keep_rate_one_is_dense(weights):
    images = _images(2)
    spec = _spec(True, 1.0)
    assert spec.idle_layers == ()
    with torch.no_grad():
        torch.testing.assert_close(build_evit(spec, weights)(images),
                                   build_evit(spec, weights, dense=True)(images))


def test_keep_counts_follow_the_authors_formula():
    # ceil(r * (N-1)), N-1 counting the fused token of an earlier layer
    assert _spec(False).keep_k == (138, 97, 68)
    assert _spec(True).keep_k == (138, 98, 70)
    assert _spec(False, 0.5).keep_k == (98, 49, 25)
    assert EViTSpec("deit_small", 0.7, drop_loc=(2, 5)).k_by_layer == {2: 138, 5: 97}
    with pytest.raises(BadInputError):
        EViTSpec("deit_tiny", 0.7, drop_loc=(9, 3))
    with pytest.raises(BadInputError):
        EViTSpec("lvvit_s", 0.7)


def test_macs():
    dense = ModelSpec.create("deit_tiny", 1.0, idle_layers=[], keep_k=[])
    for fuse in (False, True):
        spec = EViTSpec("deit_tiny", 0.7, fuse_token=fuse)
        assert macs(spec, dense=True) == dense.macs(dense=True)
        assert macs(spec) < macs(spec, dense=True)
    # one pruning layer by hand: attention over 197 tokens, MLP over 1 + 138 (+1)
    c, h = 192, 768
    one = EViTSpec("deit_tiny", 0.7, drop_loc=(11,), fuse_token=True)
    saved = 2 * 197 * c * h - 2 * 140 * c * h - (196 - 138) * c
    assert macs(one, dense=True) - macs(one) == saved


def test_matches_authors_code(weights, tmp_path, monkeypatch):
    try:
        authors = import_evit(tmp_path, monkeypatch)
    except Unavailable as exc:
        pytest.skip(f"the authors' evit.py cannot run here: {exc}")
    images = _images(4)
    for fuse in (False, True):
        spec = _spec(fuse)
        keep_rate = [spec.keep_rate if i in spec.drop_loc else 1 for i in range(12)]
        theirs = authors.EViT(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                              num_classes=NUM_CLASSES, keep_rate=keep_rate, fuse_token=fuse).eval()
        theirs.load_state_dict(weights, strict=True)
        ours = build_evit(spec, weights, emit_selection=True)
        with torch.no_grad():
            their_logits, their_idx = theirs(images, get_idx=True)
            logits, *selections = ours(images)
        assert (logits - their_logits).abs().max().item() <= 1e-5
        assert len(their_idx) == len(selections) == 3
        for a, b in zip(original_ids(their_idx, spec), original_ids(selections, spec)):
            assert a.sort(dim=1).values.equal(b.sort(dim=1).values)


@pytest.fixture(scope="module")
def fused_onnx(weights, tmp_path_factory):
    from idle_export.onnx.export import export_onnx

    spec = _spec(True)
    model = build_evit(spec, weights, emit_selection=True)
    path = tmp_path_factory.mktemp("evit") / "evit_fused.onnx"
    export_onnx(model, path, metadata=spec.to_metadata())
    return model, path


def test_onnx_matches_torch(fused_onnx):
    import onnxruntime as ort

    model, path = fused_onnx
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert len(names) == 4
    for batch in (1, 7):
        images = _images(batch, seed=7)
        outs = session.run(None, {session.get_inputs()[0].name: images.numpy()})
        with torch.no_grad():
            logits, *selections = model(images)
        assert abs(outs[0] - logits.numpy()).max() <= 1e-5
        for got, want in zip(outs[1:], selections):
            assert got.shape == tuple(want.shape)
            assert (got == want.numpy()).all()


def test_onnx_has_no_data_dependent_shapes(fused_onnx):
    import onnx

    graph = onnx.load(str(fused_onnx[1])).graph
    ops = {n.op_type for n in graph.node}
    assert "TopK" in ops and not ops & {"NonZero", "Loop", "If", "Unique"}
    assert json_meta(fused_onnx[1])["idle_export.family"] == '"evit"'


def json_meta(path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# ---------------------------------------------------------------------- checkpoint format
def test_demo_checkpoint_round_trip(tmp_path):
    from idle_export.model.checkpoint import load_checkpoint

    spec = EViTSpec("deit_tiny", 0.6, drop_loc=(2, 5, 8), fuse_token=True, num_classes=10)
    path = write_evit_demo_checkpoint(tmp_path / "evit.pth", spec, seed=3)
    ckpt = load_checkpoint(path)
    assert is_evit_checkpoint(ckpt.state_dict, ckpt.args)
    assert ckpt.args["model"] == "deit_tiny_patch16_shrink_base"
    assert evit_spec_from_checkpoint(ckpt.state_dict, ckpt.args) == spec
    build_evit(spec, ckpt.state_dict)  # timm DeiT keys, nothing more
    raw = torch.load(path, map_location="cpu", weights_only=False)
    assert isinstance(raw["args"], argparse.Namespace) and raw["args"].drop_loc == "(2, 5, 8)"


def test_authors_model_names():
    sd = create_deit("deit_small", 1000).state_dict()
    fixed = {"model": "deit_small_patch16_224_shrink", "base_keep_rate": 0.5}
    assert evit_spec_from_checkpoint(sd, fixed).keep_rate == 0.7  # hard-coded, as theirs
    spec = evit_spec_from_checkpoint(sd, {"model": "deit_small_patch16_288_shrink06",
                                          "input_size": 288})
    assert (spec.keep_rate, spec.img_size, spec.num_patches) == (0.6, 288, 324)
    spec = evit_spec_from_checkpoint(sd, {"model": "deit_small_patch16_shrink_base",
                                          "base_keep_rate": 0.5, "drop_loc": "(4, 8)"})
    assert (spec.keep_rate, spec.drop_loc, spec.fuse_token) == (0.5, (4, 8), False)
    assert evit_spec_from_checkpoint(sd, {}).keep_rate == 0.7  # main.py's defaults
    with pytest.raises(BadInputError):
        evit_spec_from_checkpoint(sd, {"model": "deit_small_patch16_shrink_base",
                                       "drop_loc": "__import__('os')"})
    # IdleViT's and DynamicViT's checkpoints are not EViT
    assert not is_evit_checkpoint(sd, {"arch": "deit_small", "base_rate": 0.7})
    assert not is_evit_checkpoint({**sd, "score_predictor.0.in_conv.0.weight": sd["norm.weight"]},
                                  {"model": "deit-s", "base_rate": 0.7})
