"""OpenVinoRunner against ONNX Runtime on the trained photos10 export with selection outputs:
FP32 logits and the same kept tokens. Skipped (with the reason) where OpenVINO is not installed."""

from __future__ import annotations

import numpy as np
import pytest

from idle_export.data.inputs import builtin_photos
from idle_export.model.config import Tolerances
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.parity.compare import compare_outputs
from idle_export.runtime.onnxruntime import OrtRunner

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")

from idle_export.runtime.openvino import OpenVinoRunner  # noqa: E402


@pytest.fixture(scope="module")
def selection_onnx(photos10_ckpt, tmp_path_factory):
    from idle_export.model.checkpoint import load_checkpoint
    from idle_export.onnx.export import export_checkpoint

    ckpt = load_checkpoint(photos10_ckpt)
    return export_checkpoint(ckpt, ckpt.spec(), tmp_path_factory.mktemp("ov") / "sel.onnx",
                             emit_selection=True)


def test_openvino_matches_onnxruntime(selection_onnx):
    spec = OnnxMetadata.read(selection_onnx).spec
    images = builtin_photos(12, spec)
    with OpenVinoRunner(selection_onnx, selection=True, threads=2) as ov, \
            OrtRunner(selection_onnx, selection=True) as ref:
        for bs in (1, 5, 12):
            feed = {"images": images[:bs]}
            case = compare_outputs(ov.infer(feed), ref.infer(feed), None, Tolerances())
            assert case["passed"], case["failures"]
            assert case["selection"] == 1.0 and len(case["selection_per_layer"]) == len(spec.idle_layers)
        out = ov.infer({"images": images[:2]})
        first = np.array(out["logits"])
        ov.infer({"images": images[2:4]})  # results are copies, not the request's reused buffers
        assert np.array_equal(first, out["logits"])


def test_static_batch_compiles_one_model_per_batch_size(selection_onnx):
    """static_batch (what bench sets): each batch size gets its own model with that batch fixed,
    compiled on first use and kept; its answers and kept tokens are ONNX Runtime's."""
    spec = OnnxMetadata.read(selection_onnx).spec
    images = builtin_photos(5, spec)
    runner = OpenVinoRunner(selection_onnx, selection=True, threads=2)
    runner.static_batch = True
    with runner as ov, OrtRunner(selection_onnx, selection=True) as ref:
        assert ov.compiled is None  # nothing compiled before the first call
        for bs in (1, 5, 1):
            feed = {"images": images[:bs]}
            case = compare_outputs(ov.infer(feed), ref.infer(feed), None, Tolerances())
            assert case["passed"] and case["selection"] == 1.0, case["failures"]
            shape = list(ov.compiled.inputs[0].get_partial_shape().to_shape())
            assert shape == [bs, 3, spec.img_size, spec.img_size]
        assert sorted(ov._by_batch) == [1, 5]
