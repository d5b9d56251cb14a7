"""The elastic form (`idle-export onnx --elastic`): one file that runs at any keep rate.

Graph surgery on the fixed-K export (which stays byte-identical without --elastic):

* a scalar float32 input `keep_rate`, with an initializer of the same name holding the
  checkpoint's rate (ONNX's input with a default: a caller that feeds only `images` gets the
  fixed-K model's answers);
* per schedule exponent p, K_p = 1 + ReduceSum(Cast(keep_rate ≥ T_p)) with the float32 threshold
  table T_p of model.elastic_k (exact: comparisons and a sum, no float64), an int64 [1] tensor
  that replaces the constant K of each idle layer's TopK;
* the shape constants that baked K+1 in: Reshape targets [-1, K+1, …] become [0, 0, …] (copy
  batch and token dims from the input), and the [K+1] of the index Expand's shape becomes 1
  (Expand broadcasts the [B, K+1, 1] index).

The file records `idle_export.elastic` (input name, default rate, exponents, the smallest rate
at which every layer keeps a token, the clamping rule); `keep_rate`/`keep_k` stay the default's.
"""

from __future__ import annotations

import numpy as np

from idle_export.errors import BadInputError, IdleExportError
from idle_export.model.config import check_keep_rate
from idle_export.model.elastic_k import elastic_k, min_valid_rate, thresholds
from idle_export.onnx.graph import copy_model
from idle_export.onnx.graph import producers as producers_of
from idle_export.onnx.io import SELECTION_PREFIX
from idle_export.onnx.metadata import OnnxMetadata

KEEP_RATE_INPUT = "keep_rate"
ELASTIC_K_PREFIX = "elastic_k_p"  # the K subgraph's node names: elastic_k_p{p}[_ge|_count|_sum]
CLAMP_RULE = ("K per idle layer = int(N * rate**p) at the shortest decimal of the float32 rate, "
              "clamped to [1, N]")


def check_elastic_spec(spec, *, dense: bool = False, plugin: bool = False) -> None:
    """BadInputError unless `spec` (with these export options) can be made elastic."""
    if dense:
        raise BadInputError("elastic=True varies the idle layers' K; the dense baseline has none",
                            "drop elastic=True (or dense=True)")
    if plugin:
        raise BadInputError("elastic=True rewrites the TopK of the standard form; the plugin form has "
                            "IdleSelect nodes", "drop plugin=True (or elastic=True)")
    if not spec.follows_schedule:
        raise BadInputError("elastic=True computes K from the keep rate by the schedule; explicit "
                            "keep_k= has no rate to vary", "pass keep=R instead of keep_k=")
    n = spec.num_patches
    at_default = tuple(elastic_k(n, spec.keep_rate, p) for p in spec.exponents)
    if at_default != spec.keep_k:
        raise BadInputError(f"keep rate {spec.keep_rate!r} is not a float32 rate: the graph's input "
                            f"would give K {list(at_default)}, not {list(spec.keep_k)}",
                            "pass keep= with at most 7 significant digits, e.g. keep=0.7")


def keep_rate_feed(rate: float) -> np.ndarray:
    """The value fed to an elastic file's keep_rate input (float32 scalar)."""
    return np.asarray(rate, dtype=np.float32)


def k_subgraph(num_patches: int, exponents, *, source: str = KEEP_RATE_INPUT, tables=None):
    """Nodes, initializers and {exponent: K tensor name} computing K_p = 1 + Σ [source ≥ T_p]
    (int64 [1], what TopK takes) for each exponent. tables: {p: thresholds} of another unit
    (the TensorRT form's permille integers); default the float32 tables of model.elastic_k."""
    import onnx
    from onnx import helper, numpy_helper

    nodes, inits, k_of = [], [_int64("elastic_one", [1])], {}
    for p in sorted(set(exponents)):
        t, k = f"elastic_thresholds_p{p}", f"{ELASTIC_K_PREFIX}{p}"
        table = thresholds(num_patches, p) if tables is None else tables[p]
        inits.append(numpy_helper.from_array(table, t))
        nodes += [
            helper.make_node("GreaterOrEqual", [source, t], [k + "_ge"], name=k + "_ge"),
            helper.make_node("Cast", [k + "_ge"], [k + "_count"], to=onnx.TensorProto.INT64,
                             name=k + "_count"),
            helper.make_node("ReduceSum", [k + "_count"], [k + "_sum"], keepdims=1, name=k + "_sum"),
            helper.make_node("Add", [k + "_sum", "elastic_one"], [k], name=k),
        ]
        k_of[p] = k
    return nodes, inits, k_of


def elastic_feed(meta: OnnxMetadata, keep_rate: float | None, what: str) -> dict:
    """The extra feed of a runner asked for `keep_rate`: {} for None (the file's default, or a
    fixed-K file), {"keep_rate": float32} for an elastic file; BadInputError for a rate asked
    of a fixed-K file or outside (0, 1]."""
    if keep_rate is None:
        return {}
    rate = check_keep_rate(keep_rate)
    info = meta.elastic
    if info is None:
        k = meta.spec.keep_rate if meta.has_spec else None
        if k is not None and np.float32(k) == np.float32(rate):
            return {}  # the rate the fixed-K file was exported at
        raise BadInputError(f"{what} is a fixed-K export (keep {k}); it runs at no other keep rate",
                            "export it with `idle-export onnx CKPT --elastic`, or drop the keep rate")
    name = info.get("input", KEEP_RATE_INPUT)
    if name == KEEP_PERMILLE_INPUT:
        return {name: np.asarray(permille(rate), dtype=np.int64)}
    return {name: keep_rate_feed(rate)}


def _int64(name: str, values) -> object:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def to_elastic(proto):
    """The fixed-K export `proto` (standard form, FP32, its own metadata) in the elastic form."""
    import onnx
    from onnx import helper, numpy_helper

    meta = OnnxMetadata.of(proto)
    spec = meta.spec
    check_elastic_spec(spec, dense=meta.dense, plugin=meta.form != "standard")
    graph = proto.graph
    topks = [n for n in graph.node if n.op_type == "TopK"]
    if len(topks) != len(spec.idle_layers):
        raise IdleExportError(f"elastic: {len(topks)} TopK for {len(spec.idle_layers)} idle layers")
    inits = {t.name: t for t in graph.initializer}
    consts = dict(inits)
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t

    def value(name):
        return numpy_helper.to_array(consts[name]) if name in consts else None

    n_patches = spec.num_patches
    k_nodes, k_inits, k_of = k_subgraph(n_patches, spec.exponents)
    new_inits = [numpy_helper.from_array(keep_rate_feed(spec.keep_rate), KEEP_RATE_INPUT), *k_inits]
    kplus1 = set()
    for node, p, k in zip(topks, spec.exponents, spec.keep_k, strict=True):
        baked = value(node.input[1])
        if baked is None or baked.reshape(-1).tolist() != [k]:
            raise IdleExportError(f"elastic: TopK {node.name} has K {baked}, the spec says {k}")
        node.input[1] = k_of[p]
        kplus1.add(k + 1)
    _unbake_shapes(proto, consts, kplus1, new_inits)
    del graph.value_info[:]  # the exporter's shapes carry the fixed K+1
    for out in graph.output:  # --emit-selection outputs: [B, K+1] becomes [B, kept_layer{L}]
        if out.name.startswith(SELECTION_PREFIX):
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 2:
                dims[1].Clear()
                dims[1].dim_param = f"kept_{out.name[len(SELECTION_PREFIX):]}"
    graph.initializer.extend(new_inits)
    graph.input.append(helper.make_tensor_value_info(KEEP_RATE_INPUT, onnx.TensorProto.FLOAT, []))
    nodes = k_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    meta.updated(elastic={
        "input": KEEP_RATE_INPUT, "default": spec.keep_rate, "exponents": list(spec.exponents),
        "min_rate": min_valid_rate(n_patches, spec.exponents), "clamp": CLAMP_RULE,
    }).write(proto)
    return proto


def _unbake_shapes(proto, consts, kplus1: set[int], new_inits: list) -> None:
    """Reshape targets [-1, K+1, …] → [0, 0, …]; [K+1] pieces of an Expand shape Concat → [1]."""
    from onnx import numpy_helper

    producers = producers_of(proto)
    made = {}

    def replaced(name: str, values) -> str:
        key = (name, tuple(values))
        if key not in made:
            made[key] = f"{name}_elastic"
            new_inits.append(_int64(made[key], values))
        return made[key]

    for node in proto.graph.node:
        if node.op_type == "Reshape" and node.input[1] in consts:
            shape = numpy_helper.to_array(consts[node.input[1]]).reshape(-1).tolist()
            if len(shape) >= 2 and shape[0] == -1 and shape[1] in kplus1:
                node.input[1] = replaced(node.input[1], [0, 0, *shape[2:]])
                for attr in node.attribute:  # the exporter writes allowzero=1: 0 must copy the dim
                    if attr.name == "allowzero":
                        attr.i = 0
        elif node.op_type == "Expand":
            cat = producers.get(node.input[1])
            if cat is None or cat.op_type != "Concat":
                continue
            for i, name in enumerate(cat.input):
                if i == 1 and name in consts and numpy_helper.to_array(consts[name]).reshape(-1).tolist() in (
                        [k] for k in kplus1):
                    cat.input[i] = replaced(name, [1])


def without_default(proto):
    """A copy whose keep_rate input has no default (initializer dropped): OpenVINO's ONNX
    frontend reads an input with a default as a constant, so this is what it compiles."""
    proto = copy_model(proto)
    keep = [t for t in proto.graph.initializer if t.name != KEEP_RATE_INPUT]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return proto


def k_model(proto):
    """A small model of the elastic file's K computation: input keep_rate, one int64 [1] output
    per exponent (elastic_k_p{p}), run by any runtime to see the graph's K (tests, lint)."""
    import onnx
    from onnx import helper

    graph = proto.graph
    nodes = [n for n in graph.node if n.name.startswith(ELASTIC_K_PREFIX)]
    used = {i for n in nodes for i in n.input}
    inits = [t for t in graph.initializer if t.name in used and t.name != KEEP_RATE_INPUT]
    outs = [n.output[0] for n in nodes if n.op_type == "Add"]
    source = next(i for i in graph.input if i.name in used)
    sub = helper.make_graph(nodes, "elastic_k", [source],
                            [helper.make_tensor_value_info(o, onnx.TensorProto.INT64, [1]) for o in outs],
                            initializer=inits)
    return helper.make_model(sub, opset_imports=proto.opset_import, ir_version=proto.ir_version)


KEEP_PERMILLE_INPUT = "keep_permille"  # the TensorRT form's shape input: the rate in thousandths
PERMILLE = 1000


def permille_thresholds(num_patches: int, exponent: int) -> np.ndarray:
    """int64 [N-1]: the smallest m (0..1000) whose rate m/1000 keeps at least k, k = 2..N; so the
    integer form's K is the schedule's at every rate of the 0.001 grid, exactly."""
    ks = [elastic_k(num_patches, m / PERMILLE, exponent) for m in range(PERMILLE + 1)]
    out, m = [], 0
    for k in range(2, num_patches + 1):
        while ks[m] < k:
            m += 1
        out.append(m)
    return np.asarray(out, dtype=np.int64)


def to_integer_form(proto):
    """An elastic file for TensorRT, whose shape tensors must be integers: the float keep_rate
    (and its default) becomes an int64 scalar input keep_permille (the rate in thousandths, a
    shape input with a profile range), compared with integer thresholds. K stays exact; it is
    computed in int64, so FP16 and INT8 builds leave it alone."""
    import onnx
    from onnx import helper

    meta = OnnxMetadata.of(proto)
    info = meta.elastic
    if info is None:
        raise BadInputError("elastic=True builds an elastic file; this one has a fixed K",
                            "export it with `idle-export onnx CKPT --elastic`, or drop elastic=True")
    if info.get("input") == KEEP_PERMILLE_INPUT:
        return proto
    spec = meta.spec
    proto = copy_model(proto)
    graph = proto.graph
    tables = {p: permille_thresholds(spec.num_patches, p) for p in set(spec.exponents)}
    nodes, inits, _ = k_subgraph(spec.num_patches, spec.exponents, source=KEEP_PERMILLE_INPUT, tables=tables)
    replaced = {t.name for t in inits} | {KEEP_RATE_INPUT}
    keep = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend([*keep, *inits])
    body = [n for n in graph.node if not n.name.startswith(ELASTIC_K_PREFIX)]
    del graph.node[:]
    graph.node.extend([*nodes, *body])
    inputs = [i for i in graph.input if i.name != KEEP_RATE_INPUT]
    del graph.input[:]
    graph.input.extend([*inputs, helper.make_tensor_value_info(KEEP_PERMILLE_INPUT, onnx.TensorProto.INT64,
                                                               [])])
    meta.updated(elastic={**info, "input": KEEP_PERMILLE_INPUT, "scale": PERMILLE}).write(proto)
    return proto


def permille(rate: float) -> int:
    """The TensorRT form's keep_permille for a rate (rounded to the 0.001 grid)."""
    return int(round(check_keep_rate(rate) * PERMILLE))


def pin_rate(proto, rate: float):
    """A copy of an elastic graph fixed at one rate: each K tensor becomes a constant (the rule of
    model.elastic_k at that rate) and the keep_rate input and K nodes go. Shapes are then static
    to a compiler that folds (OpenVINO's CPU plugin runs the pinned graph as fast as the fixed
    export; the dynamic K costs it ~15 % at batch 1)."""
    meta = OnnxMetadata.of(proto)
    spec = meta.spec
    proto = copy_model(proto)
    graph = proto.graph
    pinned = {p: _int64(f"{ELASTIC_K_PREFIX}{p}", [elastic_k(spec.num_patches, rate, p)])
              for p in set(spec.exponents)}
    body = [n for n in graph.node if not n.name.startswith(ELASTIC_K_PREFIX)]
    used = {i for n in body for i in n.input}
    keep = [t for t in graph.initializer if t.name in used and t.name != KEEP_RATE_INPUT]
    del graph.node[:]
    graph.node.extend(body)
    del graph.initializer[:]
    graph.initializer.extend([*keep, *pinned.values()])
    inputs = [i for i in graph.input if i.name not in (KEEP_RATE_INPUT, KEEP_PERMILLE_INPUT)]
    del graph.input[:]
    graph.input.extend(inputs)
    return proto
