"""What INT8 must leave alone: the selection path of each idle layer (token scores, TopK, the
index arithmetic to GatherElements/ScatterElements), found by walking the graph; and the checks
that a quantized graph kept it in FP32."""

from __future__ import annotations

from idle_export.onnx.graph import consumers as consumers_of
from idle_export.onnx.graph import producers as producers_of
from idle_export.onnx.metadata import OnnxMetadata

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv", "QLinearAdd",
                 "QLinearMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QGemm",
                 "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "MatMulNBits"}


# Ops that only move or index data between TopK and GatherElements/ScatterElements
INDEX_OPS = {"Add", "Sub", "Concat", "Unsqueeze", "Squeeze", "Expand", "Reshape", "Slice", "Cast",
             "ConstantOfShape", "Shape", "Gather", "Mul", "Tile", "Transpose"}


NORM_OPS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization"}


def is_quantized(proto) -> bool:
    """True when the graph already holds Q/DQ or integer operators (or says it is INT8)."""
    if any(n.op_type in QUANTIZED_OPS for n in proto.graph.node):
        return True
    return OnnxMetadata.of(proto).precision == "int8"


def selection_path_nodes(proto) -> list[str]:
    """Names of the nodes that compute the token scores (walking back from each TopK to the
    idle layer's LayerNorm), TopK itself, and the index arithmetic from TopK to the
    GatherElements/ScatterElements index inputs."""
    producers, consumers = producers_of(proto), consumers_of(proto)
    names: list[str] = []
    seen: set[str] = set()

    def add(node) -> bool:
        if node.name in seen:
            return False
        seen.add(node.name)
        names.append(node.name)
        return True

    for topk in (n for n in proto.graph.node if n.op_type == "TopK"):
        add(topk)
        stack = [topk.input[0]]
        while stack:  # backwards: the score computation
            node = producers.get(stack.pop())
            if node is None or node.op_type in NORM_OPS:
                continue
            if add(node):
                stack.extend(node.input)
        stack = [topk.output[1]]
        while stack:  # forwards: index arithmetic until the Gather/Scatter that consume it
            for node in consumers.get(stack.pop(), []):
                if node.op_type in INDEX_OPS and add(node):
                    stack.extend(node.output)
    return names


def activation_matmuls(proto) -> list[str]:
    """MatMuls whose both inputs are activations (attention: q·kᵀ and attn·v)."""
    inits = {i.name for i in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]


def score_matmuls(proto) -> list:
    """The MatMul that produces the token scores feeding each TopK (q_cls·kᵀ), in graph order."""
    producers = producers_of(proto)
    found = []
    for topk in (n for n in proto.graph.node if n.op_type == "TopK"):
        node = producers.get(topk.input[0])
        while node is not None and node.op_type not in ("MatMul", "Gemm", "MatMulInteger",
                                                        "QLinearMatMul", "MatMulIntegerToFloat"):
            node = producers.get(node.input[0]) if node.input else None
        found.append(node)
    return found


def dequantized_score_inputs(proto) -> list[bool]:
    """Per TopK: True when the score MatMul (q_cls·kᵀ) is quantized or has an input that comes
    from a DequantizeLinear. All False = the selection path is FP32."""
    producers = producers_of(proto)
    result = []
    for mm in score_matmuls(proto):
        if mm is None or mm.op_type != "MatMul":
            result.append(True)
            continue
        result.append(any(getattr(producers.get(i), "op_type", "") == "DequantizeLinear" for i in mm.input))
    return result
