"""Helpers over an onnx.ModelProto shared by the graph passes, lint and quantization: who
produces and consumes each tensor, element types, constants, copies."""

from __future__ import annotations

FLOAT = 1  # onnx.TensorProto.FLOAT


FLOAT16 = 10  # onnx.TensorProto.FLOAT16


# Ops whose inputs must all have one float type (a Cast would be needed otherwise).
SAME_TYPE_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Gemm", "Sum", "Max", "Min", "Mean",
                 "Concat", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
                 "LayerNormalization", "Conv", "PRelu", "Where", "Clip"}


def tensor_types(model) -> dict[str, int]:
    """Element type of every named tensor (inputs, initializers, inferred intermediates)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    types: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def constant_tensors(model) -> set[str]:
    """Names computed from initializers and Constants only (weights and their reshapes)."""
    const = {i.name for i in model.graph.initializer}
    for node in model.graph.node:  # ONNX nodes are in topological order
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or (ins and all(i in const for i in ins)):
            const.update(o for o in node.output if o)
    return const


def producers(model) -> dict[str, object]:
    """tensor name → the node that writes it."""
    return {o: n for n in model.graph.node for o in n.output if o}


def consumers(model) -> dict[str, list]:
    """tensor name → the nodes that read it (a node once per input that names it)."""
    out: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def copy_model(model):
    """A deep copy of an onnx.ModelProto (passes return new models, the input stays as it is)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def mixed_float_inputs(model, types: dict[str, int] | None = None) -> list[str]:
    """Nodes whose float inputs are of different types (TensorRT's parser rejects them).
    `types`: tensor_types(model) when the caller already has it (shape inference is not cheap)."""
    types = tensor_types(model) if types is None else types
    findings = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in SAME_TYPE_OPS:
            continue
        ins = node.input[1:] if node.op_type == "Where" else node.input
        kinds = {types.get(t) for t in ins if t and types.get(t) in (FLOAT, FLOAT16, 16)}
        if len(kinds) > 1:
            findings.append(f"{_node_key(node, i)} ({node.op_type}) mixes "
                            + "/".join(sorted(_type_name(k) for k in kinds)))
    return findings


def _node_key(node, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _type_name(elem_type: int | None) -> str:
    from onnx import TensorProto

    if elem_type is None:
        return "unknown"
    return TensorProto.DataType.Name(elem_type).lower()
