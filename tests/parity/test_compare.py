import json

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


def test_fp16_near_ties_count_as_agreement_and_raw_agreement_is_reported(photos10_idle_onnx, tmp_path):
    """FP16 moves the token scores a little, so near-tied tokens swap: parity counts a swapped
    token as agreeing when its reference score is within the candidate's rounding of the K-th
    score, reports the raw agreement beside it, and passes (top-1 100%)."""
    from typer.testing import CliRunner

    from idle_export.cli import app
    from idle_export.onnx.fp16 import fp16_onnx

    half = tmp_path / "p.fp16.onnx"
    fp16_onnx(photos10_idle_onnx, half)
    report_path = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["check", str(half), "--against", str(photos10_idle_onnx),
                                      "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    cases = json.loads(report_path.read_text())["cases"]
    assert all(c["selection"] == 1.0 and c["top1"] == 1.0 for c in cases)
    assert any(c["selection_raw"] < 1.0 and c["selection_ties"] > 0 for c in cases)  # swaps happened
    assert "raw" in result.output and "…" not in result.output  # no number cut when piped


def test_a_real_selection_disagreement_is_not_a_tie():
    """A token far from the K-th score kept instead of a clear winner fails, even when the
    candidate computed the same scores (its rounding explains nothing)."""
    from idle_export.model.config import TOLERANCES
    from idle_export.parity.compare import compare_outputs

    scores = [np.arange(10.0)[None, ::-1].copy()]  # token 0 scores 9, token 9 scores 0
    ref = {"logits": np.zeros((1, 3)), "selection_layer3": np.array([[0, 1, 2]])}
    swapped_near = {"logits": np.zeros((1, 3)), "selection_layer3": np.array([[0, 1, 3]])}
    swapped_far = {"logits": np.zeros((1, 3)), "selection_layer3": np.array([[0, 1, 9]])}
    tol = TOLERANCES["fp16"]  # |s_3 - s_K| = 1 is beyond 3% of the range 9 … unless rounding says so
    rounded = scores[0].copy()
    rounded[0, 2] -= 0.6  # the candidate's scores moved by 0.6: enough to swap tokens 2 and 3
    rounded[0, 3] += 0.6
    near = compare_outputs(swapped_near, ref, scores, tol, cand_scores=[rounded])
    assert near["selection"] == 1.0 and near["selection_raw"] == 0.0 and near["passed"]
    far = compare_outputs(swapped_far, ref, scores, tol, cand_scores=[scores[0] + 0.01])
    assert far["selection"] == 0.0 and not far["passed"]
    assert "token-selection agreement" in " ".join(far["failures"])


def test_bf16_judges_where_divergence_starts_and_counts_top1_near_ties():
    """bf16 (after_tie): an image's first differing kept set must be a near-tie; its later layers
    are not held (a token kept in one run only changes everything after it). A first
    divergence that is no tie fails; raw agreement per layer is reported beside."""
    tol = TOLERANCES["bf16"]
    scores = [np.array([[5.0, 3.0, 3.0 + 1e-4, 1.0]])] * 2
    logits = {"logits": np.array([[1.0, 1.01, -3.0]])}  # classes 0 and 1 within 0.05
    ref = {"logits": np.array([[1.0, 1.02, -3.0]]), "selection_layer3": np.array([[0, 2]]),
           "selection_layer4": np.array([[0, 1]])}
    tie_then_other = {**logits, "selection_layer3": np.array([[0, 1]]),
                      "selection_layer4": np.array([[0, 3]])}
    case = compare_outputs(tie_then_other, ref, scores, tol)
    assert case["passed"] and case["selection"] == 1.0 and case["selection_ties"] == 1
    assert case["selection_raw_per_layer"] == {"3": 0.0, "4": 0.0}
    first_far = {**logits, "selection_layer3": np.array([[0, 3]]), "selection_layer4": np.array([[0, 1]])}
    case = compare_outputs(first_far, ref, scores, tol)
    assert not case["passed"] and case["selection_per_layer"]["3"] == 0.0
    flipped = {"logits": np.array([[1.0, 0.99, -3.0]]), "selection_layer3": np.array([[0, 2]]),
               "selection_layer4": np.array([[0, 1]])}
    case = compare_outputs(flipped, ref, scores, tol)  # top-1 class 0 vs 1, reference 0.02 apart
    assert case["top1"] == 1.0 and case["top1_raw"] == 0.0 and case["top1_ties"] == 1
    assert compare_outputs(flipped, ref, scores, TOLERANCES["fp16"])["top1"] == 0.0  # fp16: no such rule
