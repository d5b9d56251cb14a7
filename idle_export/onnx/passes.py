"""Speed work on exported idle and dense graphs, one function per graph pass.

Written into the file by `idle-export onnx --target ort|openvino` (onnx.targets says which
passes each target gets), or applied in memory to a plain file by `OrtRunner(optimize=True)` /
`bench --optimize`; the portable export (the default) has none. The same passes run on the idle
and the dense graph, so the comparison stays fair.

Default passes (each returns a new ModelProto and keeps the metadata):
  fold_initializer_ops  Slice/Concat/Transpose/… whose inputs are all constants (the weight
                        slices Wq, Wk, Wv of the idle path) become initializers
  gather_rows           the idle path's GatherElements/ScatterElements, whose indices are the
                        token index expanded over C channels, become GatherND/ScatterND row
                        copies (one index per token instead of C): ~5% less CPU time for the
                        idle graph at batch 1 (DeiT-S, measured under load; dense unchanged)
  bias_gelu             fc1's bias Add + the exported Erf-GELU (5 elementwise ops) → one
                        com.microsoft.BiasGelu: DeiT-S, 1 thread, CPU time: idle -9%, folded
                        -10%, dense -6% at batch 64; -2..-5% at batch 1 (ORT_ENABLE_ALL's own
                        GeluFusion does not match the dynamo export's operand order)
Also available, not default:
  fuse_transformer_ops  bias_gelu plus residual Add + LayerNorm → SkipLayerNormalization
                        (onnxruntime.transformers): SkipLayerNormalization's CPU kernel is
                        slower than Add + LayerNormalization here; the pair ~7% slower than
                        bias_gelu alone.
  linear_to_gemm        MatMul + bias Add on [B, N, C] → Reshape/Gemm/Reshape (bias inside the
                        GEMM): measured -1..-3% CPU time, within the noise of this machine, and
                        it helps dense more than idle at batch 1; left out of the default.
Session options: ORT_ENABLE_ALL (ONNX Runtime's own LayerNorm/MatMul fusions), intra-op
threads as asked. `check` parity (1e-4, 100% top-1 and selection) holds: tests/bench/test_bench.py.
"""

from __future__ import annotations

from idle_export.deps import import_onnxruntime
from idle_export.onnx.graph import consumers as consumers_of
from idle_export.onnx.graph import copy_model
from idle_export.onnx.graph import producers as producers_of
from idle_export.onnx.metadata import OnnxMetadata

FOLDABLE_OPS = {"Slice", "Concat", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity",
                "Split", "MatMul"}  # MatMul: the folded score weight Wqᵀ·Wk
DEFAULT_PASSES = ("fold_initializer_ops", "gather_rows", "bias_gelu")


def fold_initializer_ops(proto):
    """Evaluate nodes whose inputs are all initializers or Constants and store their outputs as
    initializers (until nothing changes). Weight-only work leaves the graph."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    proto = copy_model(proto)
    graph = proto.graph
    consts = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        changed = False
        keep = []
        for node in graph.node:
            if node.op_type == "Constant" and len(node.output) == 1 and node.output[0] not in graph_outputs:
                value = onnx.helper.get_attribute_value(node.attribute[0]) if node.attribute else None
                if isinstance(value, onnx.TensorProto):
                    value = _copy_tensor(value, node.output[0])
                    consts[value.name] = value
                    graph.initializer.append(value)
                    changed = True
                    continue
            inputs = [i for i in node.input if i]
            if (node.op_type in FOLDABLE_OPS and inputs and all(i in consts for i in inputs)
                    and not any(o in graph_outputs for o in node.output)):
                sub = onnx.helper.make_graph([node], "fold", [], [
                    onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                    for o in node.output], initializer=[consts[i] for i in dict.fromkeys(inputs)])
                model = onnx.helper.make_model(sub, opset_imports=proto.opset_import)
                values = ReferenceEvaluator(model).run(None, {})
                for name, value in zip(node.output, values, strict=True):
                    t = numpy_helper.from_array(value, name)
                    consts[name] = t
                    graph.initializer.append(t)
                changed = True
                continue
            keep.append(node)
        del graph.node[:]
        graph.node.extend(keep)
    drop_unused_initializers(proto)
    return proto


def _copy_tensor(t, name):
    import onnx

    out = onnx.TensorProto()
    out.CopyFrom(t)
    out.name = name
    return out


def drop_unused_initializers(proto) -> None:
    """Remove the initializers no node reads and no graph output names (in place)."""
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def _ort_transformer_fusions(proto, num_heads: int | None, hidden_size: int | None, *,
                             skip_layer_norm: bool):
    """Run onnxruntime.transformers' fusions on a copy: Erf-GELU (+ its bias Add) → BiasGelu,
    LayerNormalization, and SkipLayerNormalization only when asked. Attention fusion is off: its
    patterns are those of the TorchScript exporter, not dynamo's."""
    optimizer = import_onnxruntime("transformers.optimizer")
    FusionOptions = import_onnxruntime("transformers.fusion_options").FusionOptions
    import logging

    import onnx

    meta = OnnxMetadata.of(proto)
    opts = FusionOptions("vit")
    opts.enable_attention = False
    opts.enable_embed_layer_norm = False
    opts.enable_rotary_embeddings = False
    opts.enable_qordered_matmul = False
    opts.enable_shape_inference = False
    opts.enable_skip_layer_norm = skip_layer_norm
    opts.enable_bias_skip_layer_norm = skip_layer_norm
    # its modules log under top-level names ("fusion_skiplayernorm" …): mute warnings meanwhile
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        fused = optimizer.optimize_model(copy_model(proto), model_type="vit", num_heads=num_heads or 0,
                                         hidden_size=hidden_size or 0, optimization_options=opts,
                                         opt_level=0)
    finally:
        logging.disable(previous)
    out = fused.model
    domains = {n.domain for n in out.graph.node if n.domain}
    have = {o.domain for o in out.opset_import}
    for domain in sorted(domains - have):  # a file on disk must name them (onnx.checker)
        out.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    meta.write(out)
    return out


def bias_gelu(proto, num_heads: int | None = None, hidden_size: int | None = None):
    """fc1's bias Add and the exported Erf-GELU (Div, Erf, Add, Mul, Mul: five passes over the
    widest activation) become one com.microsoft.BiasGelu. ONNX Runtime's own GeluFusion does not
    match the dynamo export's `x * (0.5 * (1 + erf(x / √2)))` order, so this is done here."""
    return _ort_transformer_fusions(proto, num_heads, hidden_size, skip_layer_norm=False)


def fuse_transformer_ops(proto, num_heads: int | None = None, hidden_size: int | None = None):
    """bias_gelu plus residual Add + LayerNorm → SkipLayerNormalization (slower on CPU here)."""
    return _ort_transformer_fusions(proto, num_heads, hidden_size, skip_layer_norm=True)


def _expanded_row_index(node, producers, consts):
    """For GatherElements/ScatterElements on axis 1 whose indices are
    Expand(Unsqueeze(idx[B, S], axes=[-1])): the Unsqueeze output idx[B, S, 1], else None."""
    import onnx
    from onnx import numpy_helper

    axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    if axis != 1 or any(a.name == "reduction" and a.s not in (b"", b"none") for a in node.attribute):
        return None
    expand = producers.get(node.input[1])
    if expand is None or expand.op_type != "Expand":
        return None
    unsq = producers.get(expand.input[0])
    if unsq is None or unsq.op_type != "Unsqueeze" or len(unsq.input) < 2 or unsq.input[1] not in consts:
        return None
    axes = numpy_helper.to_array(consts[unsq.input[1]]).reshape(-1).tolist()
    return unsq.output[0] if axes in ([2], [-1]) else None


def gather_rows(proto):
    """Token gathers/scatters as row operations: GatherElements / ScatterElements with an index
    expanded over the C channels (B·S·C index reads) → GatherND / ScatterND on [B, S, 2]
    (batch, token) pairs (one row copy per token), the pairs built once per index tensor.
    (GatherND with batch_dims=1 on [B, S, 1] is the same gather, but OpenVINO's ONNX reader
    makes it a Broadcast copy of the whole [B, N, C] input in front of the gather.)"""
    import onnx
    from onnx import helper

    proto = copy_model(proto)
    graph = proto.graph
    consts = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    producers = producers_of(proto)
    new_nodes, pairs = [], {}
    ones = helper.make_tensor("idle_export_rows_i64_1", onnx.TensorProto.INT64, [1], [1])
    zero = helper.make_tensor("idle_export_rows_i64_0", onnx.TensorProto.INT64, [], [0])
    one = helper.make_tensor("idle_export_rows_i64_one", onnx.TensorProto.INT64, [], [1])
    minus1 = helper.make_tensor("idle_export_rows_i64_m1", onnx.TensorProto.INT64, [1], [-1])
    used_helpers = False
    for n in graph.node:
        rows = _expanded_row_index(n, producers, consts) if n.op_type in (
            "GatherElements", "ScatterElements") else None
        if rows is None:
            new_nodes.append(n)
            continue
        if rows not in pairs:  # [B, S, 2]: (b, idx[b, s]) for every selected token
            used_helpers = True
            p = rows + "_rows"
            idx2 = producers[rows].input[0]
            new_nodes += [  # named like their outputs (NNCF and ORT's quantizer want names)
                helper.make_node("Shape", [idx2], [p + "_shape"], name=p + "_shape"),
                helper.make_node("Gather", [p + "_shape", zero.name], [p + "_b"], axis=0, name=p + "_b"),
                helper.make_node("Range", [zero.name, p + "_b", one.name], [p + "_range"], name=p + "_range"),
                helper.make_node("Unsqueeze", [p + "_range", ones.name], [p + "_col"], name=p + "_col"),
                helper.make_node("Expand", [p + "_col", p + "_shape"], [p + "_bidx"], name=p + "_bidx"),
                helper.make_node("Unsqueeze", [p + "_bidx", minus1.name], [p + "_bidx3"], name=p + "_bidx3"),
                helper.make_node("Concat", [p + "_bidx3", rows], [p + "_pairs"], axis=-1, name=p + "_pairs"),
            ]
            pairs[rows] = p + "_pairs"
        if n.op_type == "GatherElements":
            new_nodes.append(helper.make_node("GatherND", [n.input[0], pairs[rows]], list(n.output),
                                              name=n.name + "_rows"))
            continue
        new_nodes.append(helper.make_node("ScatterND", [n.input[0], pairs[rows], n.input[2]],
                                          list(n.output), name=n.name + "_rows"))
    if used_helpers:
        graph.initializer.extend([ones, zero, one, minus1])
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_dead_nodes(proto)
    return proto


def linear_to_gemm(proto):
    """MatMul(X[..., K], W[K, N]) + Add(b[N]) → Reshape(X, [-1, K]) → Gemm(W, b) → Reshape back:
    the bias is added inside the GEMM instead of in a separate pass over the output."""
    from onnx import helper, numpy_helper

    proto = copy_model(proto)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    consumers = consumers_of(proto)
    outputs = {o.name for o in graph.output}
    fused: dict[str, object] = {}  # id of the Add node → replacement nodes
    skip = set()
    for n in graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2:
            continue
        users = consumers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add" or n.output[0] in outputs:
            continue
        add = users[0]
        bias = add.input[1] if add.input[0] == n.output[0] else add.input[0]
        k, m = inits[n.input[1]].dims
        if bias not in inits or numpy_helper.to_array(inits[bias]).shape != (m,):
            continue
        p = n.output[0] + "_gemm"
        flat = helper.make_tensor(p + "_flat", 7, [2], [-1, k])
        tail = helper.make_tensor(p + "_n", 7, [1], [m])
        graph.initializer.extend([flat, tail])
        fused[id(add)] = [
            helper.make_node("Reshape", [n.input[0], flat.name], [p + "_x2"]),
            helper.make_node("Gemm", [p + "_x2", n.input[1], bias], [p + "_y2"]),
            helper.make_node("Shape", [n.input[0]], [p + "_lead"], start=0, end=-1),
            helper.make_node("Concat", [p + "_lead", tail.name], [p + "_shape"], axis=0),
            helper.make_node("Reshape", [p + "_y2", p + "_shape"], list(add.output)),
        ]
        skip.add(id(n))
    new_nodes = []
    for n in graph.node:
        if id(n) in skip:
            continue
        new_nodes.extend(fused.get(id(n), [n]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    drop_unused_initializers(proto)
    return proto


def _drop_dead_nodes(proto) -> None:
    """Remove nodes whose outputs nobody reads (the now unused index Expands)."""
    graph = proto.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    drop_unused_initializers(proto)


PASSES = {"fold_initializer_ops": fold_initializer_ops, "bias_gelu": bias_gelu,
          "fuse_transformer_ops": fuse_transformer_ops, "gather_rows": gather_rows,
          "linear_to_gemm": linear_to_gemm}


def optimize_model_proto(proto, passes: tuple[str, ...] = DEFAULT_PASSES):
    """Apply the passes in order; the metadata gains idle_export.optimized = [pass names]."""
    for name in passes:
        proto = PASSES[name](proto)
    OnnxMetadata.of(proto).updated(optimized=list(passes)).write(proto)
    return proto


