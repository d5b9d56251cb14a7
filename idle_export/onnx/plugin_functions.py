"""The model-local functions of the plugin form: IdleSelect and IdleScatter written in standard
ONNX ops, the same computation the exporter writes for an idle layer (onnx.plugin_form puts them
in the model; ONNX Runtime, the ONNX inliner and TensorRT without the plugin run these bodies).

Body names start with the op name (``IdleSelect__…``), so they cannot meet a main-graph name:
TensorRT's parser maps a function's inputs into the caller's scope by name. Each body node is
named after its first output; the inliner makes the names unique per call.
"""

from __future__ import annotations

from idle_export.plugins.spec import DOMAIN, OP_SCATTER, OP_SELECT

INT64_MAX = 2**63 - 1


def _const(name: str, values: list[int], scalar: bool = False):
    from onnx import TensorProto, helper

    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, TensorProto.INT64, [] if scalar else [len(values)], values))


def _name(body: list) -> None:
    """Name each body node after its first output (graph passes after inlining name their new
    nodes after these)."""
    for node in body:
        node.name = node.output[0]


def select_function(opset: int):
    """IdleSelect as a FunctionProto over standard ops (the graph the exporter writes)."""
    from onnx import AttributeProto, helper

    p = "IdleSelect__"
    k_node = helper.make_node("Constant", [], [p + "k"])  # K = the calling node's attribute k
    k_node.attribute.append(AttributeProto(name="value_int", ref_attr_name="k",
                                           type=AttributeProto.INT))
    xn, x, w = p + "xn", p + "x", p + "w"
    body = [
        _const(p + "c0", [0]), _const(p + "c1", [1]), _const(p + "c2", [2]),
        _const(p + "end", [INT64_MAX]), _const(p + "zero", [0], scalar=True),
        _const(p + "one", [1], scalar=True), k_node,
        helper.make_node("Slice", [xn, p + "c1", p + "end", p + "c1"], [p + "patches"]),
        helper.make_node("Transpose", [p + "patches"], [p + "patches_t"], perm=[0, 2, 1]),
        helper.make_node("Unsqueeze", [w, p + "c1"], [p + "w3"]),
        helper.make_node("MatMul", [p + "w3", p + "patches_t"], [p + "scores3"]),
        helper.make_node("Squeeze", [p + "scores3", p + "c1"], [p + "scores"]),
        helper.make_node("Unsqueeze", [p + "k", p + "c0"], [p + "k1"]),
        helper.make_node("TopK", [p + "scores", p + "k1"], [p + "values", p + "top"], axis=1,
                         largest=1, sorted=1),
        helper.make_node("Add", [p + "top", p + "one"], [p + "top1"]),
        helper.make_node("Slice", [p + "top", p + "c0", p + "c1", p + "c1"], [p + "first"]),
        helper.make_node("Shape", [p + "first"], [p + "cls_shape"]),
        helper.make_node("Expand", [p + "zero", p + "cls_shape"], [p + "cls"]),
        helper.make_node("Concat", [p + "cls", p + "top1"], [p + "idx"], axis=1),
        helper.make_node("Unsqueeze", [p + "idx", p + "c2"], [p + "idx3"]),
        helper.make_node("Shape", [p + "idx"], [p + "rows_shape"]),
        helper.make_node("Shape", [xn], [p + "c_shape"], start=2),
        helper.make_node("Concat", [p + "rows_shape", p + "c_shape"], [p + "sel_shape"], axis=0),
        helper.make_node("Expand", [p + "idx3", p + "sel_shape"], [p + "gather_idx"]),
        helper.make_node("GatherElements", [xn, p + "gather_idx"], [p + "xn_sel"], axis=1),
        helper.make_node("GatherElements", [x, p + "gather_idx"], [p + "x_sel"], axis=1),
        helper.make_node("Identity", [p + "idx"], [p + "idx_out"]),
    ]
    _name(body)
    return helper.make_function(
        DOMAIN, OP_SELECT, [xn, x, w], [p + "idx_out", p + "xn_sel", p + "x_sel"], body,
        [helper.make_opsetid("", opset)], attributes=["k", "layer"],
        doc_string="Folded scores xn[:,1:]·w, top-k with CLS first, gathers of the kept rows")


def scatter_function(opset: int):
    """IdleScatter as a FunctionProto over standard ops."""
    from onnx import helper

    p = "IdleScatter__"
    x, idx, res = p + "x", p + "idx", p + "res"
    body = [
        _const(p + "c2", [2]),
        helper.make_node("Unsqueeze", [idx, p + "c2"], [p + "idx3"]),
        helper.make_node("Shape", [res], [p + "res_shape"]),
        helper.make_node("Expand", [p + "idx3", p + "res_shape"], [p + "scatter_idx"]),
        helper.make_node("ScatterElements", [x, p + "scatter_idx", res], [p + "out"], axis=1),
    ]
    _name(body)
    return helper.make_function(DOMAIN, OP_SCATTER, [x, idx, res], [p + "out"], body,
                                [helper.make_opsetid("", opset)], attributes=["layer"],
                                doc_string="x with the rows idx replaced by res")
