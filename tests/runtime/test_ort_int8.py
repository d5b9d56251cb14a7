"""ONNX Runtime's INT8 products are exact through this project's sessions on every x86 CPU.

ORT's u8×s8 kernels on CPUs without VNNI (SSE4.1, AVX2, AVX-512 without VNNI) add pairs of
products in 16 bits, which saturate: 255·127 + 255·127 = 64770 > 32767. A Q/DQ MatMul whose
inputs quantize to 255 and whose 8-bit weights are ±127/-128 gives half the right answer there
unless the session sets session.x64quantprecision (runtime.onnxruntime.X64_QUANT_PRECISION). On
CPUs with VNNI or AMX the products are exact either way, so this test passes on them too; on a
CPU without VNNI it fails when the session option is dropped (checked on an AMD EPYC with AVX2).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from idle_export.runtime.onnxruntime import OrtRunner, import_onnxruntime, session_options

K, N = 64, 8


def saturating_qdq_matmul(path) -> np.ndarray:
    """Write x [B, K] → QuantizeLinear (uint8, scale 1) → DQ → MatMul with 8-bit weights (DQ of
    int8 ±127/-128) → logits; return the weights as float."""
    w = np.full((K, N), 127, np.int8)
    w[:, 1::2] = -128
    nodes = [helper.make_node("QuantizeLinear", ["images", "scale", "zero_u8"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "scale", "zero_u8"], ["x"]),
             helper.make_node("DequantizeLinear", ["w", "scale", "zero_s8"], ["wf"]),
             helper.make_node("MatMul", ["x", "wf"], ["logits"])]
    graph = helper.make_graph(
        nodes, "saturating_qdq_matmul",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", N])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(1.0, np.float32), "scale"),
         numpy_helper.from_array(np.array(0, np.uint8), "zero_u8"),
         numpy_helper.from_array(np.array(0, np.int8), "zero_s8")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w.astype(np.float32)


def test_int8_products_do_not_saturate(tmp_path):
    path = tmp_path / "saturating.onnx"
    w = saturating_qdq_matmul(path)
    x = np.full((3, K), 255.0, np.float32)  # quantizes to 255, the largest uint8
    exact = x @ w  # 255·127·64 = 2072640 per column, not the saturated 32767·32 = 1048544
    runner = OrtRunner(path)
    runner.activate()
    got = runner.infer({"images": x})["logits"]
    np.testing.assert_array_equal(got, exact)
    ort = import_onnxruntime()
    assert session_options(ort).get_session_config_entry("session.x64quantprecision") == "1"


def test_a_weight_two_matmuls_share_is_copied(tmp_path):
    """ORT's u8 conversion (CPUs without VNNI) names each converted weight after it, so a weight
    DQ feeding two MatMuls failed the session after the ort passes (the trt recipe, official
    scores): OrtRunner gives each consumer its own DQ, weights and zero point, same results."""
    from idle_export.runtime.onnxruntime import unshare_int8_weights

    path = tmp_path / "shared.onnx"
    w = saturating_qdq_matmul(path)
    model = onnx.load(str(path))
    model.graph.node.append(helper.make_node("MatMul", ["x", "wf"], ["second"]))
    model.graph.node.append(helper.make_node("Add", ["logits", "second"], ["both"]))
    model.graph.output[0].name = "both"
    model.graph.node[3].output[0] = "logits"
    assert unshare_int8_weights(model) == 1
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w")]
    assert len(dqs) == 2 and len({n.input[0] for n in dqs}) == 2 and len({n.input[2] for n in dqs}) == 2
    onnx.checker.check_model(model)
    ort = import_onnxruntime()
    x = np.full((2, K), 255.0, np.float32)
    got = ort.InferenceSession(model.SerializeToString(), session_options(ort),
                               providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    np.testing.assert_array_equal(got, 2 * (x @ w))
