"""ONNX graph passes for TensorRT, one function per pass (onnx protos in, onnx protos out).

The main one, `convert_fp16`, makes the graph for a *strongly typed* build (TensorRT 11,
TensorRT-RTX): there the precision of every layer is the type of its tensors, so FP16 has to be
written into the ONNX. What it keeps in FP32, and why:

- the token scores and TopK (`score_path_nodes`): a score that rounds differently in FP16 picks
  different tokens, and a wrong token is a different computation, not a small error. The walk
  starts at each TopK's data input and goes back through the score arithmetic (the q_cls·k
  MatMul, head mean, Squeeze/Transpose/Slice) up to — not including — the projections
  (MatMul with a weight, the bias Add, LayerNormalization); those run in FP16 and are cast up.
- the index path is integer (TopK indices, Concat with the CLS index, the GatherElements /
  ScatterElements indices): the pass touches FLOAT tensors only, so it stays INT64.
- LayerNormalization stays one op (opset ≥ 17, FP16 in and out, `stash_type=1` statistics in
  FP32) instead of a ReduceMean/Pow/Sqrt chain that overflows in FP16.
- graph inputs and outputs stay FP32 (`keep_io_types`), with one Cast each.

Every Cast sits on a tensor boundary, so each node sees inputs of one float type (TensorRT's
parser rejects a Half/Float Div; `mixed_float_inputs` checks for it).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from idle_export.errors import BadInputError
from idle_export.fileio import atomic_write_bytes, check_output_path
from idle_export.onnx.graph import (
    FLOAT,
    FLOAT16,
    _node_key,
    _type_name,
    constant_tensors,
    copy_model,
    mixed_float_inputs,
    producers,
    tensor_types,
)
from idle_export.onnx.io import load_onnx
from idle_export.onnx.metadata import OnnxMetadata

FP16_MAX = 65504.0

# Ops the score walk may pass through (arithmetic on the scores themselves).
SCORE_OPS = {"Div", "Mul", "Sub", "Neg", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Slice",
             "MatMul", "ReduceMean", "ReduceSum", "Flatten", "Identity", "Expand", "Gather"}
# Weight-carrying ops: a score walk stops before them (they are projections, run in FP16).
PROJECTION_OPS = {"MatMul", "Gemm", "Conv"}
# Ops always kept in FP32: Q/DQ scales are FLOAT in opset < 19, Resize scales must be FLOAT.
ALWAYS_FP32_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Resize",
                   "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike"}


# ----------------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------------- passes
def score_path_nodes(model) -> set[str]:
    """Names of the nodes that compute the token scores and rank them (TopK included).

    The projections feeding the scores stay FP16: keeping them FP32 as well was measured not to
    change selection agreement (the flips come from FP16 upstream, not from the projection)."""
    const = constant_tensors(model)
    made_by = producers(model)
    keys = {id(n): _node_key(n, i) for i, n in enumerate(model.graph.node)}
    keep: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "TopK":
            continue
        keep.add(keys[id(node)])
        stack = [node.input[0]]
        while stack:
            name = stack.pop()
            p = made_by.get(name)
            if p is None or name in const or keys[id(p)] in keep:
                continue
            if p.op_type not in SCORE_OPS:
                continue
            if p.op_type in PROJECTION_OPS and any(i in const for i in p.input):
                continue
            keep.add(keys[id(p)])
            stack.extend(i for i in p.input if i and i not in const)
    return keep


def convert_fp16(model, *, keep_fp32_ops: tuple[str, ...] = (), keep_fp32_nodes: tuple[str, ...] = (),
                 keep_scores_fp32: bool = True, keep_io_types: bool = True):
    """FP16 copy of `model` for a strongly typed build; returns (model, report).

    FLOAT tensors of every node become FLOAT16 except for the nodes kept in FP32 (the score
    path, `keep_fp32_ops`, `keep_fp32_nodes`); Casts are inserted on the boundaries, integer
    tensors are not touched.
    """
    import onnx
    from onnx import helper, numpy_helper

    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise BadInputError(f"node {node.name or node.op_type} has a control-flow subgraph",
                                "the FP16 pass handles flat graphs (export without If/Loop)")
    model = copy_model(model)
    graph = model.graph
    types = tensor_types(model)
    fp32_nodes = set(keep_fp32_nodes)
    if keep_scores_fp32:
        fp32_nodes |= score_path_nodes(model)
    keep_ops = set(keep_fp32_ops) | ALWAYS_FP32_OPS
    nodes = list(graph.node)
    keys = [_node_key(n, i) for i, n in enumerate(nodes)]
    is_float = lambda name: bool(name) and types.get(name) == FLOAT  # noqa: E731
    half, kept = [], []  # per node: runs in FP16? / float nodes kept in FP32
    for node, key in zip(nodes, keys, strict=True):
        touches = any(is_float(t) for t in [*node.input, *node.output])
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            touches = touches or to == FLOAT
        half.append(touches and key not in fp32_nodes and node.op_type not in keep_ops)
        if touches and not half[-1]:
            kept.append(key)

    # Graph outputs produced in FP16: the producer writes NAME__fp16, a Cast writes NAME.
    made_by = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    out_renames = {}
    for out in graph.output:
        i = made_by.get(out.name)
        if i is not None and half[i] and is_float(out.name):
            out_renames[out.name] = out.name + "__fp16"
    for node in nodes:
        for j, name in enumerate(node.input):
            if name in out_renames:
                node.input[j] = out_renames[name]
        for j, name in enumerate(node.output):
            if name in out_renames:
                node.output[j] = out_renames[name]
    for new in out_renames.values():
        types[new] = FLOAT

    # Which float tensors live in FP16 after the pass.
    inits = {i.name: i for i in graph.initializer}
    half_tensors = {o for node, h in zip(nodes, half, strict=True) if h for o in node.output if is_float(o)}
    graph_inputs = {i.name for i in graph.input if is_float(i.name)}
    if not keep_io_types:
        half_tensors |= graph_inputs

    new_nodes, emitted, init_fp16, casts, clipped = [], {}, {}, 0, 0

    def cast(name: str, to: int) -> str:
        nonlocal casts
        key = (name, to)
        if key not in emitted:
            out = f"{name}__to_{'fp16' if to == FLOAT16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}_cast"))
            emitted[key] = out
            casts += 1
        return emitted[key]

    def fp16_initializer(name: str) -> str:
        nonlocal clipped
        if name not in init_fp16:
            arr = numpy_helper.to_array(inits[name])
            big = np.abs(arr) > FP16_MAX
            clipped += int(big.sum())
            arr16 = np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)
            t = numpy_helper.from_array(arr16, name=f"{name}__fp16")
            graph.initializer.append(t)
            init_fp16[name] = t.name
        return init_fp16[name]

    for node, h in zip(nodes, half, strict=True):
        for j, name in enumerate(node.input):
            if not is_float(name):
                continue
            if h:
                if name in inits:
                    node.input[j] = fp16_initializer(name)
                elif name not in half_tensors:
                    node.input[j] = cast(name, FLOAT16)
            elif name in half_tensors:
                node.input[j] = cast(name, FLOAT)
        if h:
            _retype_attributes(node)
        new_nodes.append(node)
    for old, new in out_renames.items():
        new_nodes.append(helper.make_node("Cast", [new], [old], to=FLOAT, name=f"{old}_cast"))
        casts += 1
    if not keep_io_types:
        for inp in graph.input:
            if inp.name in graph_inputs:
                inp.type.tensor_type.elem_type = FLOAT16
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    kept_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    report = {"nodes": len(nodes), "fp16_nodes": int(sum(half)), "fp32_nodes": kept,
              "casts": casts, "clipped_weights": clipped,
              "fp16_initializers": len(init_fp16)}
    return model, report


def _retype_attributes(node) -> None:
    """Attributes that name a float type or hold a float tensor follow the node to FP16."""
    from onnx import numpy_helper

    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = FLOAT16
        elif node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" \
                and attr.t.data_type == FLOAT:
            arr = np.clip(numpy_helper.to_array(attr.t), -FP16_MAX, FP16_MAX).astype(np.float16)
            attr.t.CopyFrom(numpy_helper.from_array(arr, name=attr.t.name))


# ----------------------------------------------------------------------------- checks


def precision_summary(model) -> dict:
    """What a strongly typed build will run in which precision (for tests and reports)."""
    types = tensor_types(model)
    made_by = producers(model)
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    index_ops = [n for n in model.graph.node if n.op_type in ("GatherElements", "ScatterElements")]
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        outs = {_type_name(types.get(o)) for o in node.output if o and types.get(o) in (FLOAT, FLOAT16)}
        for kind in outs:
            counts[kind] += 1
    return {
        "float_nodes": dict(counts),
        "topk_inputs": [_type_name(types.get(n.input[0])) for n in topk],
        "topk_indices": [_type_name(types.get(n.output[1])) for n in topk],
        "score_producers": [made_by[n.input[0]].op_type if n.input[0] in made_by else "input"
                            for n in topk],
        "index_inputs": [_type_name(types.get(n.input[1])) for n in index_ops],
        "layernorm": [_type_name(types.get(n.input[0])) for n in model.graph.node
                      if n.op_type == "LayerNormalization"],
        "inputs": {i.name: _type_name(i.type.tensor_type.elem_type) for i in model.graph.input},
        "outputs": {o.name: _type_name(o.type.tensor_type.elem_type) for o in model.graph.output},
    }


# ----------------------------------------------------------------------------- file level
def fp16_onnx(src, dst: str | Path, **kwargs) -> dict:
    """`convert_fp16` to a file (atomic), with the metadata updated; returns the report. `src`: the
    FP32 ONNX file, or its ModelProto when the caller has loaded it already (it is not changed)."""
    import onnx

    dst = check_output_path(Path(dst))
    is_proto = isinstance(src, onnx.ModelProto)
    model = src if is_proto else load_onnx(src)
    if any(i.data_type == FLOAT16 for i in model.graph.initializer):
        raise BadInputError(f"{'the model' if is_proto else Path(src).name} already has FP16 weights",
                            "pass the FP32 export of `idle-export onnx`")
    model, report = convert_fp16(model, **kwargs)
    OnnxMetadata.of(model).updated(precision="fp16", fp32_nodes=report["fp32_nodes"]).write(model)
    onnx.checker.check_model(model, full_check=False)
    mixed = mixed_float_inputs(model)
    if mixed:  # a bug in this pass, not the user's input
        raise RuntimeError(f"FP16 pass left mixed-type nodes: {mixed[:3]}")
    atomic_write_bytes(dst, model.SerializeToString())
    report["path"] = str(dst)
    return report
