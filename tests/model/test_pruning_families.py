"""EViT and DynamicViT in the family registry (#27): their ModelSpec (arch evit_* / dynamicvit_*)
has the K and MACs of the modules' own specs, the checkpoint says which family it is (keys and
args) and a disagreeing --arch / --family is one line, the modules build from a ModelSpec, and
parity maps their selections (positions in a reordered sequence) to patch numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idle_export import api
from idle_export.errors import BadInputError, CheckpointError
from idle_export.model.build import build_model
from idle_export.model.checkpoint import load_checkpoint
from idle_export.model.config import TOLERANCES, ModelSpec
from idle_export.model.dynamicvit import DynamicViTSpec, build_dynamicvit, write_dynamicvit_demo_checkpoint
from idle_export.model.dynamicvit import macs as dynamicvit_macs
from idle_export.model.dynamicvit import original_ids as dynamicvit_ids
from idle_export.model.evit import EViTSpec, build_evit, write_evit_demo_checkpoint
from idle_export.model.evit import macs as evit_macs
from idle_export.model.evit import original_ids as evit_ids
from idle_export.model.families import DEIT, DYNAMICVIT, EVIT, detect_family, resolve_family
from idle_export.model.pruning_common import create_deit, model_spec, seeded_spread
from idle_export.onnx.io import SELECTION_PREFIX
from idle_export.parity.compare import compare_outputs, to_patch_ids
from idle_export.runtime.torch import TorchRunner

NUM_CLASSES = 10


@pytest.mark.parametrize("rate", [0.5, 0.7, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("fuse", [False, True])
def test_evit_model_spec_matches_its_own_spec(rate, fuse):
    ours = EViTSpec("deit_small", rate, fuse_token=fuse)
    spec = ModelSpec.create("evit_small", rate, fuse_token=fuse)
    assert (spec.family, spec.method, spec.drops_tokens) == ("evit", "evit", True)
    assert spec.k_by_layer == ours.k_by_layer and model_spec(ours) == spec
    for dense in (False, True):
        assert spec.macs(dense=dense) == evit_macs(ours, dense) == spec.macs(dense=dense, folded_scores=True)
    assert ModelSpec.from_metadata(spec.to_metadata()) == spec
    assert spec.to_metadata()["idle_export.fuse_token"] == ("true" if fuse else "false")


def test_documented_figures():
    """docs/families.md: deit_small r=0.7 K and GMACs of each family."""
    evit, fused = ModelSpec.create("evit_small", 0.7), ModelSpec.create("evit_small", 0.7, fuse_token=True)
    dyn = ModelSpec.create("dynamicvit_small", 0.7)
    assert (evit.keep_k, fused.keep_k, dyn.keep_k) == ((138, 97, 68), (138, 98, 70), (137, 96, 67))
    assert [round(s.macs() / 1e9, 2) for s in (evit, fused, dyn)] == [3.0, 3.03, 2.98]
    assert round(dyn.macs(dense=True) / 1e9, 2) == 4.6
    assert evit.at_rate(0.5).keep_k == (98, 49, 25)
    assert evit.describe().startswith("evit_small keep 0.7, drop")


@pytest.mark.parametrize("rate", [0.3, 0.7, 0.9])
def test_dynamicvit_model_spec_matches_its_own_spec(rate):
    ours = DynamicViTSpec("deit_base", rate)
    spec = ModelSpec.create("dynamicvit_base", rate)
    assert spec.idle_layers == ours.pruning_loc and spec.keep_k == ours.keep_k
    assert model_spec(ours) == spec and "idle_export.fuse_token" not in spec.to_metadata()
    for dense in (False, True):
        assert spec.macs(dense=dense) == dynamicvit_macs(ours, dense)


def test_deit_metadata_records_the_family_only():
    meta = ModelSpec.create("deit_tiny", 0.7).to_metadata()
    assert meta["idle_export.family"] == '"deit"' and "idle_export.fuse_token" not in meta
    bad = {**ModelSpec.create("evit_tiny", 0.7).to_metadata(), "idle_export.family": '"deit"'}
    with pytest.raises(BadInputError, match="metadata says family 'deit' but arch 'evit_tiny'"):
        ModelSpec.from_metadata(bad)


# ---------------------------------------------------------------------- which family
SD = {"cls_token": torch.zeros(1, 1, 192), "blocks.0.norm1.weight": torch.zeros(192)}
DYN_SD = {**SD, "score_predictor.0.in_conv.0.weight": torch.zeros(192)}


def test_detection_from_keys_and_args():
    assert detect_family(SD) is DEIT and detect_family(SD, {"arch": "deit_tiny", "base_rate": 0.7}) is DEIT
    for args in ({"model": "deit_small_patch16_shrink_base"}, {"base_keep_rate": 0.7}, {"drop_loc": "(3,)"},
                 {"model": "deit_small_patch16_224_shrink05"}):
        assert detect_family(SD, args) is EVIT, args
    assert detect_family(SD, {"model": "deit_small_patch16_224"}) is DEIT  # plain DeiT training
    assert detect_family(DYN_SD, {"model": "deit-s", "base_rate": 0.7}) is DYNAMICVIT
    with pytest.raises(CheckpointError, match="looks like evit and dynamicvit at once"):
        detect_family(DYN_SD, {"base_keep_rate": 0.7})


def test_resolve_family_never_reads_one_family_as_another():
    evit_args = {"model": "deit_tiny_patch16_shrink_base", "base_keep_rate": 0.7}
    assert resolve_family(SD, evit_args) is EVIT
    assert resolve_family(SD, evit_args, arch="evit_tiny") is EVIT
    assert resolve_family(SD, evit_args, method="idlevit") is DEIT  # explicit: its DeiT weights
    assert resolve_family(SD, evit_args, arch="deit_tiny", method="idlevit") is DEIT
    assert resolve_family(SD, None, method="evit") is EVIT  # bare DeiT weights, chosen
    assert resolve_family(SD, None, arch="evit_tiny") is EVIT  # an explicit arch is a choice too
    with pytest.raises(BadInputError, match="is an EViT checkpoint; arch=deit_tiny is an IdleViT arch"):
        resolve_family(SD, evit_args, arch="deit_tiny")
    with pytest.raises(BadInputError, match="is not a DynamicViT checkpoint: it has no score_predictor"):
        resolve_family(SD, evit_args, method="dynamicvit")
    with pytest.raises(BadInputError, match="arch=evit_tiny is an EViT arch, not family=dynamicvit"):
        resolve_family(SD, None, arch="evit_tiny", method="dynamicvit")
    with pytest.raises(BadInputError, match="family='vit' is not one of idlevit, evit, dynamicvit"):
        resolve_family(SD, None, method="vit")
    with pytest.raises(BadInputError, match="is a DynamicViT checkpoint; arch=deit_tiny"):
        resolve_family(DYN_SD, None, arch="deit_tiny")


def test_unsupported_features_are_refused_in_one_line():
    for family in (EVIT, DYNAMICVIT):
        for feature in ("elastic=True", "plugin=True"):
            with pytest.raises(BadInputError, match=f"{feature} is not supported for {family.title}"):
                family.refuse(feature)
        with pytest.raises(BadInputError, match="scores=folded is not a way"):
            family.scores("folded")
        assert family.scores(None) == "official"
        assert not family.elastic  # sweep: one fixed-K file per ratio
    DEIT.refuse("elastic=True")  # IdleViT can
    assert DEIT.elastic
    assert DEIT.scores(None) == "folded"


# ---------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def weights() -> dict:
    return seeded_spread(create_deit("deit_tiny", NUM_CLASSES).state_dict(), 0)


def test_checkpoint_specs(weights, tmp_path):
    own = EViTSpec("deit_tiny", 0.6, drop_loc=(2, 5, 8), fuse_token=True, num_classes=10)
    evit = write_evit_demo_checkpoint(tmp_path / "e.pth", own, 0, weights)
    ckpt = load_checkpoint(evit)
    spec = ckpt.spec()
    assert (spec.arch, spec.keep_rate, spec.idle_layers, spec.fuse_token) == (
        "evit_tiny", 0.6, (2, 5, 8), True)
    assert ckpt.spec(keep_rate=0.5).keep_k == EViTSpec("deit_tiny", 0.5, (2, 5, 8), True).keep_k
    with pytest.raises(CheckpointError, match="keep_k= set idle layers; an EViT model's drop layers"):
        ckpt.spec(keep_k=[100, 50, 20])
    with pytest.raises(BadInputError, match="is an EViT checkpoint; arch=deit_tiny is an IdleViT arch"):
        ckpt.spec(arch="deit_tiny", keep_rate=0.7)
    idle = ckpt.spec(method="idlevit", keep_rate=0.7)  # the user's explicit choice
    assert idle.arch == "deit_tiny" and len(idle.idle_layers) == 9
    with pytest.raises(BadInputError, match="no keep rate"):
        ckpt.spec(method="idlevit")  # EViT args have no base_rate
    torch.save(weights, tmp_path / "bare.pth")
    bare = load_checkpoint(tmp_path / "bare.pth")
    assert bare.spec(keep_rate=0.7).arch == "deit_tiny"  # no args: IdleViT, as always
    assert bare.spec(method="evit", keep_rate=0.7).keep_k == (138, 97, 68)
    with pytest.raises(BadInputError, match="no keep rate: bare.pth has no EViT args"):
        bare.spec(arch="evit_tiny")  # bare weights say no family: --arch chooses
    assert bare.spec(arch="evit_tiny", keep_rate=0.5).keep_k == (98, 49, 25)
    assert api.model_spec(bare, keep=0.7, family="evit") == bare.spec(method="evit", keep_rate=0.7)

    dyn = DynamicViTSpec("deit_tiny", 0.7, num_classes=10)
    torch.manual_seed(0)
    path = write_dynamicvit_demo_checkpoint(tmp_path / "d.pth", dyn)
    spec = load_checkpoint(path).spec()
    assert (spec.arch, spec.keep_k, spec.num_classes) == ("dynamicvit_tiny", (137, 96, 67), 10)
    assert load_checkpoint(path).spec(keep_rate=0.5).keep_k == (98, 49, 24)
    with pytest.raises(CheckpointError, match="unexpected keys: score_predictor"):
        ckpt = load_checkpoint(path)
        build_model(ckpt.spec(method="idlevit", keep_rate=0.7), ckpt.state_dict)


# ---------------------------------------------------------------------- models and parity
def _images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("fuse", [False, True])
def test_evit_builds_from_a_model_spec(weights, fuse):
    own = EViTSpec("deit_tiny", 0.7, fuse_token=fuse, num_classes=NUM_CLASSES)
    spec = model_spec(own)
    images = _images(3)
    with torch.no_grad():
        want, *selections = build_evit(own, weights, emit_selection=True)(images)
        got = build_model(spec, weights, emit_selection=True)(images)
    assert torch.equal(want, got[0]) and all(torch.equal(a, b) for a, b in zip(selections, got[1:]))
    _check_runner_and_ids(build_model(spec, weights), spec, images, evit_ids(selections, own))


def test_dynamicvit_builds_from_a_model_spec():
    own = DynamicViTSpec("deit_tiny", 0.7, num_classes=NUM_CLASSES)
    torch.manual_seed(0)
    sd = seeded_spread(build_dynamicvit(own).authors_state_dict(), 0)
    spec = model_spec(own)
    images = _images(3)
    with torch.no_grad():
        want, *selections = build_dynamicvit(own, sd, emit_selection=True)(images)
        got = build_model(spec, sd, emit_selection=True)(images)
    assert torch.equal(want, got[0]) and all(torch.equal(a, b) for a, b in zip(selections, got[1:]))
    _check_runner_and_ids(build_model(spec, sd), spec, images, dynamicvit_ids(selections, own))


def _check_runner_and_ids(model, spec, images, want_ids):
    """TorchRunner gives the TopK positions and the ranked scores; to_patch_ids maps them to the
    modules' original_ids (fused token d: P+d, not -(d+1)), and a run compared with a copy whose
    first layer kept the same set in another order still agrees in every layer."""
    with TorchRunner(model, selection=True) as runner:
        out = runner.infer({"images": images.numpy()})
        scores = runner.last_scores
    assert [s.shape for s in scores] == [(3, 196)] + [(3, k + spec.fuse_token) for k in spec.keep_k[:-1]]
    mapped, placed = to_patch_ids(out, scores, spec)
    for layer, want in zip(spec.idle_layers, want_ids):
        got = mapped[f"{SELECTION_PREFIX}{layer}"]
        assert np.array_equal(np.where(got >= 196, 195 - got, got), want.numpy())
    assert all(np.isnan(p).sum(1).min() > 0 for p in placed[1:])  # dropped tokens have no score
    # the same run with the first layer's kept tokens in reverse order (as a runtime may order
    # exact ties): the second layer's positions move, the tokens do not
    first, second = (f"{SELECTION_PREFIX}{layer}" for layer in spec.idle_layers[:2])
    k1 = spec.keep_k[0]
    swapped = {**out, first: out[first][:, ::-1].copy(),
               second: np.where(out[second] < k1, k1 - 1 - out[second], out[second])}
    raw = compare_outputs(swapped, out, None, TOLERANCES["fp32"])
    assert raw["selection_per_layer"][str(spec.idle_layers[1])] < 1.0
    case = compare_outputs(to_patch_ids(swapped, None, spec)[0], mapped, None, TOLERANCES["fp32"])
    assert case["selection"] == 1.0 and case["passed"]
