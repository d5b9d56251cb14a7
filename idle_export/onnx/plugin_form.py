"""The plugin form of an idle export (`idle-export onnx CKPT --plugin`): a graph pass over the
standard export that turns each idle layer's token selection into one `idle_export.IdleSelect`
node and its scatter back into one `idle_export.IdleScatter` node.

Both ops are also ONNX model-local functions (FunctionProto, same domain and name) whose bodies
are the standard ops (Slice, MatMul, TopK, Concat, Expand, GatherElements, ScatterElements), so
ONNX Runtime and TensorRT without the plugin run the file as it is (they inline the functions;
OpenVINO 2026.4 does not import model-local functions: `inline` first). TensorRT with the plugin
(`idle-export trt --plugin`) gets a copy without the functions, so its parser takes the nodes
as the AOT plugins of idle_export.plugins.

    IdleSelect(xn [B,N,C], x [B,N,C], w [B,C]; k, layer) -> idx [B,K+1], xn_sel, x_sel
        scores = xn[:, 1:] · w (folded scores), idx = [0, TopK(scores, k) + 1], rows of xn, x
    IdleScatter(x [B,N,C], idx [B,S], res [B,S,C]; layer) -> x with rows idx replaced by res

One function per op serves every layer (K is the node attribute `k`): ONNX names a function by
domain and name, and per-layer copies would need IR 10 overloads that TensorRT's parser ignores.
The pass matches the folded-score pattern exactly (the plugin computes folded scores only) and
refuses anything else with a one-line error; nothing else in the graph changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from idle_export.errors import BadInputError
from idle_export.onnx.graph import consumers as consumers_of
from idle_export.onnx.graph import copy_model
from idle_export.onnx.graph import producers as producers_of
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.plugin_functions import INT64_MAX, scatter_function, select_function
from idle_export.plugins.spec import DOMAIN, OP_SCATTER, OP_SELECT, OP_VERSION, trt_onnx_attributes

PLUGIN_OPS = (OP_SELECT, OP_SCATTER)
AXES_1 = "idle_export_plugin_axes_1"  # the int64 [1] initializer of the Squeeze w [B,1,C] -> [B,C]
_BIG = 2**62  # a Slice end at least this large means "to the end"


@dataclass(frozen=True)
class IdleSite:
    """One idle layer's selection in a standard graph: the tensors the plugin nodes take over."""

    k: int
    xn: str  # LN1(x) [B, N, C]
    x: str  # the layer input [B, N, C]
    w3: str  # folded query q_cls·Wk [B, 1, C]
    idx: str  # [B, K+1] kept tokens, CLS first
    xn_sel: str
    x_sel: str
    res: str  # the block's output rows [B, K+1, C]
    out: str  # the layer output (scatter of res into x)
    topk: str  # node names, for the position of the new nodes
    scatter: str


def _fail(layer: int, why: str) -> BadInputError:
    return BadInputError(f"idle layer #{layer}: not the folded selection pattern ({why})",
                         "plugin=True takes a folded-score export of `idle-export onnx` "
                         "(scores=folded, the default)")


def _constants(proto) -> dict:
    """name -> numpy value of every initializer and Constant output."""
    from onnx import helper, numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute:
            value = helper.get_attribute_value(n.attribute[0])
            values[n.output[0]] = (numpy_helper.to_array(value) if hasattr(value, "dims")
                                   else np.asarray(value))
    return values


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _ints(consts: dict, name: str) -> list[int] | None:
    value = consts.get(name)
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def find_sites(proto) -> list[IdleSite]:
    """The selection of every idle layer (one per TopK), matched exactly; BadInputError when a
    TopK is not the folded-score selection the plugin implements."""
    made_by, used_by, consts = producers_of(proto), consumers_of(proto), _constants(proto)
    dims = _shapes(proto)

    def producer(name: str, op: str, layer: int):
        node = made_by.get(name)
        if node is None or node.op_type != op:
            raise _fail(layer, f"{name} is not made by {op}")
        return node

    def only_user(name: str, op: str, layer: int):
        users = used_by.get(name, [])
        if len(users) != 1 or users[0].op_type != op:
            raise _fail(layer, f"{name} is not read by one {op} only")
        return users[0]

    sites = []
    for layer, topk in enumerate(n for n in proto.graph.node if n.op_type == "TopK"):
        k = _ints(consts, topk.input[1])
        if k is None or len(k) != 1 or _attr(topk, "axis", -1) not in (1, -1) \
                or _attr(topk, "largest", 1) != 1 or _attr(topk, "sorted", 1) != 1:
            raise _fail(layer, "TopK needs a constant K, axis 1, largest and sorted")
        if used_by.get(topk.output[0]):
            raise _fail(layer, "the TopK values are used")
        squeeze = producer(topk.input[0], "Squeeze", layer)
        matmul = producer(squeeze.input[0], "MatMul", layer)
        transpose = producer(matmul.input[1], "Transpose", layer)
        patches = producer(transpose.input[0], "Slice", layer)
        ends = _ints(consts, patches.input[2])
        if _ints(consts, squeeze.input[1]) != [1] or list(_attr(transpose, "perm", [])) != [0, 2, 1] \
                or _ints(consts, patches.input[1]) != [1] or not ends or ends[0] < _BIG \
                or _ints(consts, patches.input[3]) != [1] \
                or (len(patches.input) > 4 and _ints(consts, patches.input[4]) != [1]):
            raise _fail(layer, "the scores are not Squeeze(MatMul(w, xn[:, 1:]ᵀ), 1)")
        xn, w3 = patches.input[0], matmul.input[0]
        add = next((u for u in used_by.get(topk.output[1], []) if u.op_type == "Add"), None)
        if add is None or _ints(consts, add.input[1]) != [1]:
            raise _fail(layer, "the TopK indices are not shifted by 1")
        concat = only_user(add.output[0], "Concat", layer)
        zeros = made_by.get(concat.input[0])
        if _attr(concat, "axis") not in (1, -1) or list(concat.input)[1:] != [add.output[0]] \
                or zeros is None or zeros.op_type != "Expand" \
                or _ints(consts, zeros.input[0]) != [0]:
            raise _fail(layer, "the kept tokens are not [0, TopK + 1]")
        idx = concat.output[0]
        unsqueeze = next((u for u in used_by.get(idx, []) if u.op_type == "Unsqueeze"), None)
        if unsqueeze is None or _ints(consts, unsqueeze.input[1]) not in ([2], [-1]):
            raise _fail(layer, "the kept tokens are not expanded over the channels")
        expand = only_user(unsqueeze.output[0], "Expand", layer)
        users = used_by.get(expand.output[0], [])
        gathers = [u for u in users if u.op_type == "GatherElements" and _attr(u, "axis") == 1]
        scatters = [u for u in users if u.op_type == "ScatterElements" and _attr(u, "axis") == 1
                    and _attr(u, "reduction", b"none") in (b"none", "none")]
        by_data = {g.input[0]: g for g in gathers}
        if len(users) != 3 or len(gathers) != 2 or len(scatters) != 1 or xn not in by_data:
            raise _fail(layer, "the expanded index is not read by two GatherElements (xn, x) and "
                        "one ScatterElements")
        scatter = scatters[0]
        x = scatter.input[0]
        if x not in by_data or x == xn or scatter.input[1] != expand.output[0]:
            raise _fail(layer, "the scatter does not write into the gathered x")
        want = dims.get(xn)
        got = dims.get(by_data[xn].output[0])
        if want is None or got is None or len(want) != 3 or got[1:] != [k[0] + 1, want[2]]:
            raise _fail(layer, f"the gathered rows are {got}, not [B, {k[0] + 1}, C]")
        sites.append(IdleSite(k=k[0], xn=xn, x=x, w3=w3, idx=idx, xn_sel=by_data[xn].output[0],
                              x_sel=by_data[x].output[0], res=scatter.input[2],
                              out=scatter.output[0], topk=topk.name, scatter=scatter.name))
    return sites


def _shapes(proto) -> dict[str, list]:
    """Inferred shapes: name -> dims (int, or the symbol / None of a dynamic one)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    out = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                            for d in vi.type.tensor_type.shape.dim]
    return out


# ----------------------------------------------------------------------------- the pass
def to_plugin_form(proto):
    """The plugin form of a standard idle export (a new ModelProto; metadata form = plugin)."""
    from onnx import TensorProto, helper

    if is_plugin_form(proto):
        raise BadInputError("the model is already in the plugin form", "pass the standard export")
    sites = find_sites(proto)
    if not sites:
        raise BadInputError("no idle layer to fuse: the graph has no TopK (a dense export?)",
                            "plugin=True needs an idle export (drop dense=True)")
    meta = OnnxMetadata.of(proto)
    layers = meta.idle_layers if meta.idle_layers and len(meta.idle_layers) == len(sites) \
        else list(range(len(sites)))
    proto = copy_model(proto)
    graph = proto.graph
    at_topk = {s.topk: (s, layer) for s, layer in zip(sites, layers, strict=True)}
    at_scatter = {s.scatter: (s, layer) for s, layer in zip(sites, layers, strict=True)}
    nodes = []
    for node in graph.node:
        if node.name in at_topk:
            s, layer = at_topk[node.name]
            w = f"{s.w3}__idle_w"
            nodes += [helper.make_node("Squeeze", [s.w3, AXES_1], [w], name=f"IdleSelect_w_layer{layer}"),
                      helper.make_node(OP_SELECT, [s.xn, s.x, w], [s.idx, s.xn_sel, s.x_sel],
                                       name=f"IdleSelect_layer{layer}", domain=DOMAIN, k=s.k,
                                       layer=layer)]
        elif node.name in at_scatter:
            s, layer = at_scatter[node.name]
            nodes.append(helper.make_node(OP_SCATTER, [s.x, s.idx, s.res], [s.out],
                                          name=f"IdleScatter_layer{layer}", domain=DOMAIN,
                                          layer=layer))
        else:
            nodes.append(node)
    replaced = {t for s in sites for t in (s.idx, s.xn_sel, s.x_sel, s.out)}
    nodes = [n for n in nodes if n.domain == DOMAIN or not set(n.output) & replaced]
    graph.initializer.append(helper.make_tensor(AXES_1, TensorProto.INT64, [1], [1]))
    _set_nodes(graph, _topological(graph, _live(graph, nodes)))
    left = sorted({n.op_type for n in graph.node} & {"TopK", "GatherElements", "ScatterElements"})
    if left:  # a bug in this pass (the matcher let an unrelated use through)
        raise RuntimeError(f"the plugin pass left {', '.join(left)} in the main graph")
    opset = default_opset(proto)
    proto.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    proto.functions.extend([select_function(opset), scatter_function(opset)])
    meta.updated(form="plugin").write(proto)
    return proto


def _live(graph, nodes: list) -> list:
    """`nodes` without those whose outputs nobody reads (the replaced selection subgraphs)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        keep = [n for n in nodes if any(o in used for o in n.output if o)]
        if len(keep) == len(nodes):
            return keep
        nodes = keep


def _topological(graph, nodes: list) -> list:
    """`nodes` in an order where every input is made before it is read (stable otherwise)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    made = {o for n in nodes for o in n.output}
    ordered, pending = [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in ready or i not in made for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError("the plugin pass made a cycle")
        pending = rest
    return ordered


def _set_nodes(graph, nodes: list) -> None:
    """Replace the graph's nodes; drop initializers and value_info nobody uses any more."""
    nodes = list(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    made = {o for n in nodes for o in n.output}
    info = [v for v in graph.value_info if v.name in made]
    del graph.value_info[:]
    graph.value_info.extend(info)


def default_opset(proto) -> int:
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


# ----------------------------------------------------------------------------- readers
def plugin_nodes(proto, op: str = OP_SELECT) -> list:
    """The main graph's IdleSelect (or IdleScatter) nodes, in graph order."""
    return [n for n in proto.graph.node if n.domain == DOMAIN and n.op_type == op]


def is_plugin_form(proto) -> bool:
    """True for a graph with IdleSelect/IdleScatter nodes or the metadata form = plugin."""
    return OnnxMetadata.of(proto).form == "plugin" or any(
        n.domain == DOMAIN and n.op_type in PLUGIN_OPS for n in proto.graph.node)


def inline(proto):
    """The standard view: every model-local function inlined (what ORT and TensorRT without the
    plugin run), metadata form = standard. A model without functions comes back as a copy."""
    import onnx.inliner

    if not proto.functions:
        return copy_model(proto)
    out = onnx.inliner.inline_local_functions(proto)
    del out.functions[:]
    if not any(n.domain == DOMAIN for n in out.graph.node):
        kept = [o for o in out.opset_import if o.domain != DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(kept)
    meta = OnnxMetadata.of(out)
    if meta.form == "plugin":
        meta.updated(form="standard").write(out)
    return out


def add_selection_outputs(proto, names: list[str] | None = None) -> list[str]:
    """Per IdleSelect (graph order): a tensor equal to the TopK indices of the standard graph
    (idx[:, 1:] - 1, the patch positions), added to the graph outputs as `names` (default:
    IDX__topk); returns the names."""
    from onnx import TensorProto, helper

    graph = proto.graph
    have = {t.name for t in graph.initializer}
    consts = [("idle_export_sel_c1", [1]), ("idle_export_sel_end", [INT64_MAX]),
              ("idle_export_sel_one", [1])]
    for name, values in consts:
        if name not in have:
            graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    outputs = {o.name for o in graph.output}
    selects = plugin_nodes(proto)
    names = names or [f"{n.output[0]}__topk" for n in selects]
    if len(names) != len(selects):
        raise ValueError(f"{len(names)} names for {len(selects)} IdleSelect nodes")
    for node, name in zip(selects, names, strict=True):
        idx = node.output[0]
        graph.node.extend([
            helper.make_node("Slice", [idx, "idle_export_sel_c1", "idle_export_sel_end",
                                       "idle_export_sel_c1"], [name + "_p1"]),
            helper.make_node("Sub", [name + "_p1", "idle_export_sel_one"], [name])])
        if name not in outputs:
            graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, None))
    return names


def plugin_node_problem(node) -> str | None:
    """Why an IdleSelect/IdleScatter node would not select its TensorRT plugin (None if it would)."""
    try:
        trt_onnx_attributes(node.op_type, _attr(node, "k") if node.op_type == OP_SELECT else None)
    except ValueError as e:
        return str(e)
    return None


def for_tensorrt_plugin(proto):
    """The copy `idle-export trt --plugin` parses: no model-local functions (TensorRT's parser
    would import their bodies instead of the plugin) and each plugin node with the attributes
    that select its AOT plugin (plugin_namespace, aot, k)."""
    from onnx import helper

    proto = copy_model(proto)
    del proto.functions[:]
    for node in proto.graph.node:
        if node.domain != DOMAIN or node.op_type not in PLUGIN_OPS:
            continue
        k = _attr(node, "k") if node.op_type == OP_SELECT else None
        attrs = trt_onnx_attributes(node.op_type, k)
        kept = [a for a in node.attribute if a.name not in attrs]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.extend(helper.make_attribute(n, v) for n, v in attrs.items())
    return proto
