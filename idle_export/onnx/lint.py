"""`idle-export lint`: will TensorRT take this ONNX? A static check, no TensorRT or GPU needed.

Rules come from the ONNX-TensorRT operator matrix (TensorRT 10: opsets 9..20; TensorRT 11 and
TensorRT-RTX parse the same set) and from what we saw fail in practice:
  unsupported-op       op not in TensorRT's ONNX parser, or a custom domain (needs a plugin)
  topk-k               TopK's K must be a constant ≤ 3840, `sorted` must be 1
  scatter-reduction    ScatterElements/ScatterND only without reduction
  float-shape-math     shape values taken through floating point (Shape→Cast(float)→…→Cast(int))
  dynamic-dims         only the batch dimension of the input may be dynamic
  mixed-float          a node whose float inputs differ in type (Half/Float Div: parser error)
  qdq                  Q/DQ must be INT8 with zero point 0; no INT32 bias DequantizeLinear
  layernorm-outputs    LayerNormalization: only output Y is supported
  opset                opset < 17 splits LayerNormalization (FP16 overflow); > 20 may be too new
  idle-ops             with expect_idle: TopK + GatherElements + ScatterElements per idle layer
                       (EViT / DynamicViT drop tokens: TopK + GatherElements)
  elastic              an elastic file (`onnx --elastic`): each TopK's K is computed from the
                       keep rate by the elastic K subgraph (allowed: TensorRT ≥ 8.6 takes a K
                       shape tensor ≤ 3840); the float keep_rate input is a constant to TensorRT
                       unless built with `trt --elastic` (integer form, keep_permille)
  plugin-ops           IdleSelect/IdleScatter (domain idle_export) of a declared plugin form
                       (`onnx --plugin`): allowed, since they are model-local functions whose
                       bodies TensorRT parses without the plugin; the bodies are linted like the
                       rest (the graph is checked with its functions inlined)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from idle_export.errors import BadInputError
from idle_export.numerics import describe_nonfinite
from idle_export.onnx.elastic import ELASTIC_K_PREFIX
from idle_export.onnx.graph import constant_tensors, mixed_float_inputs, producers, tensor_types
from idle_export.onnx.io import MIN_OPSET, load_onnx, nonfinite_initializers
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.plugin_form import PLUGIN_OPS, inline, plugin_node_problem
from idle_export.plugins.spec import DOMAIN

TOPK_MAX = 3840
MAX_OPSET = 20

# ONNX-TensorRT docs/operators.md (TensorRT 10.0), the operators marked supported.
TRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop
LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape
Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu
Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
IDLE_OPS = ("TopK", "GatherElements", "ScatterElements")
_INT = {6, 7}  # INT32, INT64
_FLOATS = {1, 10, 11, 16}


def _finding(rule: str, message: str, node=None, index: int | None = None, severity: str = "error") -> dict:
    name = None
    if node is not None:
        name = node.name or f"{node.op_type}#{index}"
    return {"rule": rule, "severity": severity, "node": name,
            "op": node.op_type if node is not None else None, "message": message}


def _const_value(name: str, inits: dict, constants: dict):
    from onnx import numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name])
    if name in constants:
        return numpy_helper.to_array(constants[name])
    return None


def lint_model(model, *, expect_idle: bool = False) -> list[dict]:
    """Findings for a loaded ModelProto, most serious first (severity 'error' or 'warning')."""
    from onnx import TensorProto

    findings: list[dict] = _plugin_findings(model) + _elastic_findings(model)
    bad = nonfinite_initializers(model)
    if bad:  # every runtime takes them; the outputs would be NaN
        findings.append(_finding("nonfinite-weights", f"{len(bad)} weight tensor(s) hold NaN or inf: "
                                 f"{describe_nonfinite(bad)}; re-export from a finite checkpoint"))
    elastic_k = ({n.output[0] for n in model.graph.node if n.name.startswith(ELASTIC_K_PREFIX)}
                 if OnnxMetadata.of(model).elastic else set())
    if model.functions:
        model = inline(model)  # what TensorRT without the plugin parses: the function bodies
    g = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        findings.append(_finding("opset", f"opset {opset} < {MIN_OPSET}: LayerNormalization is split into "
                                 "ReduceMean/Pow/Sqrt, which overflows in FP16; re-export with --opset 18",
                                 severity="warning"))
    elif opset > MAX_OPSET:
        findings.append(_finding("opset", f"opset {opset} is newer than TensorRT 10.0's parser "
                                 f"(≤ {MAX_OPSET}); later TensorRT or RTX may still take it",
                                 severity="warning"))
    inits = {i.name: i for i in g.initializer}
    constants = {n.output[0]: _constant_tensor(a) for n in g.node if n.op_type == "Constant"
                 for a in n.attribute if a.name in ("value", "value_int", "value_ints")}
    const = constant_tensors(model)
    types = tensor_types(model)
    made_by = producers(model)
    for inp in g.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        dynamic = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
        if [i for i in dynamic if i != 0]:
            findings.append(_finding("dynamic-dims", f"input {inp.name!r} has dynamic dims {dynamic}; "
                                     "only the batch (dim 0) may be dynamic for one optimisation "
                                     "profile"))
    for i, node in enumerate(g.node):
        op = node.op_type
        attrs = {a.name: a for a in node.attribute}
        if node.domain not in ("", "ai.onnx"):
            findings.append(_finding("unsupported-op", f"{op} (domain {node.domain}) is a custom op: "
                                     "TensorRT needs a plugin for it", node, i))
            continue
        if op not in TRT_OPS:
            findings.append(_finding("unsupported-op", f"{op} is not supported by TensorRT's ONNX parser",
                                     node, i))
            continue
        if op == "TopK":
            k_name = node.input[1] if len(node.input) > 1 else ""
            k = _constant_k(k_name, made_by, inits, constants)
            if k_name in elastic_k:
                pass  # the elastic form's K (checked once in _elastic_findings)
            elif k is None and k_name not in const:
                findings.append(_finding("topk-k", "TopK's K is computed at run time; TensorRT needs a "
                                         "constant K (export K as a Python int)", node, i))
            elif k is None:
                findings.append(_finding("topk-k", "TopK's K is folded from constants, not an "
                                         "initializer; fold constants (`polygraphy surgeon "
                                         "sanitize --fold-constants`) if the parser refuses", node, i,
                                         "warning"))
            elif int(np.asarray(k).reshape(-1)[0]) > TOPK_MAX:
                findings.append(_finding("topk-k", f"TopK K={int(np.asarray(k).reshape(-1)[0])} exceeds "
                                         f"TensorRT's limit of {TOPK_MAX}", node, i))
            if "sorted" in attrs and attrs["sorted"].i == 0:
                findings.append(_finding("topk-k", "TopK sorted=0 is not supported by TensorRT", node, i))
        elif op in ("ScatterElements", "ScatterND"):
            red = attrs["reduction"].s.decode() if "reduction" in attrs else "none"
            if red != "none":
                findings.append(_finding("scatter-reduction", f"{op} with reduction={red!r}: TensorRT "
                                         "supports only reduction='none'", node, i))
        elif op == "Cast" and attrs["to"].i in _INT and types.get(node.input[0]) in _FLOATS:
            if _from_shape(node.input[0], made_by):
                findings.append(_finding("float-shape-math", "a shape value goes through floating "
                                         "point (Shape → float → Cast to int): TensorRT keeps shapes "
                                         "integer; do the arithmetic in int64 or with constant sizes",
                                         node, i))
        elif op in ("QuantizeLinear", "DequantizeLinear"):
            has_zp = len(node.input) > 2 and node.input[2]
            zp = _const_value(node.input[2], inits, constants) if has_zp else None
            quant = node.output[0] if op == "QuantizeLinear" else node.input[0]
            qtype = types.get(quant)
            if zp is not None and np.any(np.asarray(zp) != 0):
                findings.append(_finding("qdq", f"{op} zero point is not 0: TensorRT needs symmetric "
                                         "quantization (quantize the FP32 export for TensorRT: "
                                         "idle-export calibrate FP32.onnx --target trt)", node, i))
            if qtype == TensorProto.INT32:
                findings.append(_finding("qdq", "DequantizeLinear of an INT32 tensor (quantized bias): "
                                         "TensorRT rejects it (ORT quantize_static: "
                                         "extra_options={'QuantizeBias': False})", node, i))
            elif qtype == TensorProto.UINT8:
                findings.append(_finding("qdq", f"{op} on UINT8: TensorRT quantizes to INT8 only "
                                         "(activation_type=QuantType.QInt8)", node, i))
        elif op == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            findings.append(_finding("layernorm-outputs", "LayerNormalization Mean/InvStdDev outputs are not "
                                     "supported by TensorRT", node, i))
    for text in mixed_float_inputs(model, types):
        findings.append(_finding("mixed-float", f"{text}: every input of a node must have one float type "
                                 "(insert a Cast)"))
    if expect_idle:
        findings.extend(_idle_findings(model))
    findings.sort(key=lambda f: f["severity"] != "error")
    return findings


def _constant_tensor(attr):
    """The TensorProto of a Constant's value / value_int / value_ints attribute."""
    from onnx import numpy_helper

    if attr.name == "value":
        return attr.t
    return numpy_helper.from_array(np.asarray(attr.i if attr.name == "value_int" else list(attr.ints),
                                              dtype=np.int64))


def _constant_k(name: str, made_by: dict, inits: dict, constants: dict):
    """TopK's K: a constant, or a constant that is only reshaped (the plugin form's function
    body makes K [1] as Unsqueeze(Constant(value_int=k)))."""
    for _ in range(4):
        value = _const_value(name, inits, constants)
        node = made_by.get(name)
        if value is not None or node is None or node.op_type not in (
                "Unsqueeze", "Reshape", "Squeeze", "Identity"):
            return value
        name = node.input[0]
    return None


def _elastic_findings(model) -> list[dict]:
    """An elastic file: every TopK's K from the elastic K subgraph, its input declared, N ≤ 3840;
    a warning that TensorRT reads the float form's keep_rate (an input with a default) as a
    constant unless built with `trt --elastic`."""
    info = OnnxMetadata.of(model).elastic
    if info is None:
        return []
    g = model.graph
    k_names = {n.output[0] for n in g.node if n.name.startswith(ELASTIC_K_PREFIX) and n.op_type == "Add"}
    out = []
    for i, node in enumerate(g.node):
        if node.op_type == "TopK" and (len(node.input) < 2 or node.input[1] not in k_names):
            out.append(_finding("elastic", "an elastic file's TopK whose K is not the elastic K "
                                "(elastic_k_p*): re-export with `idle-export onnx --elastic`", node, i))
    name = info.get("input")
    if name not in {i.name for i in g.input}:
        out.append(_finding("elastic", f"the elastic input {name!r} is not a graph input"))
    elif name in {t.name for t in g.initializer}:
        out.append(_finding("elastic", f"{name!r} is a float input with a default: TensorRT builds it as "
                            "a constant (an engine fixed at that rate); `idle-export trt --elastic` keeps "
                            "the rate variable (int64 shape input keep_permille)", severity="warning"))
    n = OnnxMetadata.of(model).spec.num_patches
    if n > TOPK_MAX:
        out.append(_finding("elastic", f"K can reach {n}, above TensorRT's TopK limit of {TOPK_MAX}"))
    return out


def _plugin_findings(model) -> list[dict]:
    """The plugin form's IdleSelect/IdleScatter nodes: a warning when the metadata does not declare
    the form, an error when a node's attributes would not select the TensorRT plugin. (A custom
    node without a model-local function stays an unsupported-op error.)"""
    functions = {(f.domain, f.name) for f in model.functions}
    declared = OnnxMetadata.of(model).form == "plugin"
    out = []
    for i, node in enumerate(model.graph.node):
        if node.domain != DOMAIN or node.op_type not in PLUGIN_OPS \
                or (node.domain, node.op_type) not in functions:
            continue
        if not declared:
            out.append(_finding("plugin-ops", f"{node.op_type} in a file whose metadata does not "
                                "declare idle_export.form = plugin: TensorRT parses its function "
                                "body; `trt --plugin` takes exports of `onnx --plugin`", node, i,
                                "warning"))
        problem = plugin_node_problem(node)
        if problem:
            out.append(_finding("plugin-ops", problem, node, i))
    return out


def _from_shape(name: str, made_by: dict, depth: int = 12) -> bool:
    """Does `name` derive (within a few nodes) from a Shape output?"""
    stack, seen = [(name, 0)], set()
    while stack:
        t, d = stack.pop()
        p = made_by.get(t)
        if p is None or t in seen or d > depth:
            continue
        seen.add(t)
        if p.op_type in ("Shape", "Size"):
            return True
        stack.extend((i, d + 1) for i in p.input if i)
    return False


def _idle_findings(model) -> list[dict]:
    from collections import Counter

    counts = Counter(n.op_type for n in model.graph.node)
    meta = OnnxMetadata.of(model)
    found = {op: counts.get(op, 0) for op in IDLE_OPS}
    out = []
    if meta.dense:
        out.append(_finding("idle-ops", "this is the dense baseline export (idle_export.dense = true), not "
                            "an IdleViT graph"))
    if found["TopK"] == 0:
        out.append(_finding("idle-ops", "no idle layers: the graph has no TopK (found "
                            + ", ".join(f"{k} {v}" for k, v in found.items()) + ")"))
        return out
    drops = _drops_tokens(meta)  # EViT, DynamicViT: TopK + GatherElements, nothing scattered back
    if found["GatherElements"] == 0 or (found["ScatterElements"] == 0 and not drops):
        out.append(_finding("idle-ops", "TopK without GatherElements/ScatterElements: not the idle-layer "
                            "pattern (" + ", ".join(f"{k} {v}" for k, v in found.items()) + ")"))
    layers = meta.idle_layers
    if layers is not None and len(layers) != found["TopK"]:
        out.append(_finding("idle-ops", f"metadata lists {len(layers)} idle layers but the graph has "
                            f"{found['TopK']} TopK"))
    return out


def _drops_tokens(meta: OnnxMetadata) -> bool:
    """The file's family drops tokens (its metadata's spec; False when it has none)."""
    try:
        return meta.has_spec and meta.spec.drops_tokens
    except BadInputError:
        return False


def lint_file(path: str | Path, *, expect_idle: bool = False) -> dict:
    """Report for one file: {'path', 'ops', 'findings', 'errors', 'warnings', 'passed'}."""
    from collections import Counter

    model = load_onnx(path)
    findings = lint_model(model, expect_idle=expect_idle)
    errors = sum(f["severity"] == "error" for f in findings)
    return {
        "path": str(path),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
        "ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        "form": OnnxMetadata.of(model).form,
        "findings": findings,
        "errors": errors,
        "warnings": len(findings) - errors,
        "passed": errors == 0,
    }
