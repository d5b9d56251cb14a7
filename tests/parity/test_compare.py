import numpy as np
import onnx
import pytest

from idle_export.model.config import TOLERANCES
from idle_export.parity.check import check_onnx
from idle_export.parity.compare import compare_outputs


def test_onnx_matches_torch(tiny_idle_onnx, tiny_ckpt):
    report = check_onnx(tiny_idle_onnx, ckpt_path=tiny_ckpt, batch_sizes=(1, 7, 32))
    assert report["passed"], report
    assert len(report["cases"]) == 6
    for case in report["cases"]:
        assert case["max_abs"] <= 1e-4 and case["top1"] == 1.0
        assert case["selection"] == 1.0 and len(case["selection_per_layer"]) == 9


def test_folded_export_matches_official_torch(tiny_folded_onnx, tiny_ckpt):
    """The default export ranks by xn·(Wkᵀq); check compares it with the paper's formulation."""
    report = check_onnx(tiny_folded_onnx, ckpt_path=tiny_ckpt, batch_sizes=(1, 7, 32))
    assert report["passed"], report
    assert all(c["selection"] == 1.0 for c in report["cases"])


def test_trained_model_onnx_matches_torch(photos10_idle_onnx, photos10_ckpt):
    """On the really trained model, agreement means something: confident logits and a [CLS]
    attention with preferences."""
    report = check_onnx(photos10_idle_onnx, ckpt_path=photos10_ckpt, batch_sizes=(1, 7, 32))
    assert report["passed"], report
    assert all(c["selection"] == 1.0 and c["selection_ties"] == 0 for c in report["cases"])


def test_dense_onnx_matches_torch(tiny_dense_onnx, tiny_ckpt):
    report = check_onnx(tiny_dense_onnx, ckpt_path=tiny_ckpt, batch_sizes=(1, 7),
                        input_sets=("noise",))
    assert report["passed"] and "selection" not in report["cases"][0]


def test_onnx_vs_onnx(tiny_idle_onnx):
    report = check_onnx(tiny_idle_onnx, against=tiny_idle_onnx, batch_sizes=(2,))
    assert report["passed"] and report["cases"][0]["max_abs"] == 0.0


def test_tampered_onnx_fails(tiny_idle_onnx, tiny_ckpt, tmp_path):
    proto = onnx.load(str(tiny_idle_onnx))
    head = next(i for i in proto.graph.initializer if tuple(i.dims) == (1000, 192))
    arr = onnx.numpy_helper.to_array(head).copy()
    arr[:, :5] += 0.05
    head.CopyFrom(onnx.numpy_helper.from_array(arr, head.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    report = check_onnx(bad, ckpt_path=tiny_ckpt, batch_sizes=(1,), input_sets=("noise",))
    assert not report["passed"]
    assert "max abs error" in report["cases"][0]["failures"][0]


def test_selection_ties_are_told_apart():
    tol = TOLERANCES["fp32"]
    logits = {"logits": np.zeros((1, 4), np.float32)}
    scores = [np.array([[5.0, 3.0, 3.0 + 1e-9, 1.0]])]
    a = {**logits, "selection_layer3": np.array([[0, 1]])}
    b = {**logits, "selection_layer3": np.array([[0, 2]])}
    case = compare_outputs(a, b, scores, tol)
    assert case["selection"] == 1.0 and case["selection_ties"] == 1 and case["passed"]
    c = {**logits, "selection_layer3": np.array([[0, 3]])}  # token 3 is far below the cut
    case = compare_outputs(c, b, scores, tol)
    assert case["selection"] == 0.0 and not case["passed"]


def test_check_needs_one_reference(tiny_idle_onnx):
    from idle_export.errors import BadInputError

    with pytest.raises(BadInputError, match="exactly one reference"):
        check_onnx(tiny_idle_onnx)
