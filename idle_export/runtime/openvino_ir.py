"""The OpenVINO IR (X.xml + X.bin) of an idle ONNX file, with each idle layer's score path marked
to stay f32 whatever precision OpenVINO infers in.

Why an IR: OpenVINO's CPU plugin computes in bf16 by default on CPUs with AVX-512 BF16 or AMX
(`openvino_default_precision`), and bf16 scores (8-bit mantissa) pick other tokens than f32
ones. OpenVINO keeps a node in its original precision when the node's runtime info carries
`DisablePrecisionConversion` (the CPU plugin's graph then skips it when it enforces bf16; the
Python API sets it as `rt_info["precise_0"]`, which `save_model` writes as that attribute). ONNX
has no place for runtime info, so a marked model can only be an IR. A user's plain
`core.compile_model("X.xml")` at defaults then runs the big GEMMs in bf16 and the selection in
f32; `core.compile_model("X.onnx")` runs everything in bf16.

What is marked, per idle layer: the nodes `quantize.selection.selection_path_nodes` finds (the
score arithmetic from TopK back to the LayerNorm: CLS query, folded weight or keys, the CLS
product, head mean; TopK; the integer index path to the gathers), and the LayerNorm itself, so
the scores start from an f32 xn. The ONNX node names are matched to OpenVINO ops through their
output tensor names; ops without a name of their own between a node's inputs and outputs (an
ONNX op that OpenVINO decomposes, e.g. LayerNormalization into MVN, Multiply, Add) go with it.

The IR carries the ONNX file's idle_export.* metadata in its runtime info (`ir_metadata`), so
`check` and OpenVinoRunner read the spec from the IR alone. Weights stay f32
(compress_to_fp16=False): the IR computes what the ONNX file computes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from idle_export.deps import pip_extra
from idle_export.errors import BadInputError, MissingDependencyError
from idle_export.fileio import is_stream, mapped_disk_full, output_folder, work_dir
from idle_export.onnx.graph import producers as producers_of
from idle_export.onnx.io import load_onnx
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.quantize.selection import NORM_OPS, selection_path_nodes

OPENVINO_PIP = pip_extra("openvino") + ", or use backend=ort"
KEEP_PRECISION = "precise_0"  # Python's rt_info key that save_model writes as DisablePrecisionConversion
METADATA_KEY = "idle_export_metadata"  # model rt_info: the ONNX file's metadata_props, as JSON
NO_NAME_OPS = ("Constant", "Parameter", "Result")


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise MissingDependencyError("the openvino backend needs OpenVINO, which is not installed",
                                     OPENVINO_PIP) from None
    return openvino


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def ir_skipped(output: str | Path, *, dense: bool, elastic: bool) -> str | None:
    """Why no IR goes beside an openvino-target ONNX file (None: one is written)."""
    if dense:
        return "a dense file has no token selection"
    if elastic:
        return "an elastic file is pinned per keep rate on the ONNX"
    if is_stream(output):
        return "the ONNX went to a stream"
    if not openvino_installed():
        return f"OpenVINO is not installed: {pip_extra('openvino')}"
    return None


def ir_beside(onnx_path: str | Path) -> Path | None:
    """The marked IR that `onnx --target openvino` or `calibrate --target openvino` wrote beside
    this ONNX file (X.xml and X.bin, not older than X.onnx), else None."""
    xml, binary = ir_paths(onnx_path)
    try:
        fresh = xml.stat().st_mtime >= Path(onnx_path).stat().st_mtime and binary.is_file()
    except OSError:
        return None
    return xml if fresh else None


def is_ir(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".xml"


def ir_paths(onnx_path: str | Path) -> tuple[Path, Path]:
    """X.xml and X.bin beside X.onnx."""
    path = Path(onnx_path)
    return path.with_suffix(".xml"), path.with_suffix(".bin")


def score_path_onnx_nodes(proto) -> list[str]:
    """The ONNX nodes to keep f32: the selection path of every idle layer and its LayerNorm."""
    names = selection_path_nodes(proto)
    made_by = producers_of(proto)
    by_name = {n.name: n for n in proto.graph.node}
    for name in list(names):
        for tensor in by_name[name].input:
            node = made_by.get(tensor)
            if node is not None and node.op_type in NORM_OPS and node.name not in names:
                names.append(node.name)
    return names


def mark_score_path(model, proto) -> list[str]:
    """Mark (rt_info KEEP_PRECISION) the OpenVINO ops of `model` (read from `proto`) that compute
    the ONNX score-path nodes; returns the marked ops' friendly names."""
    keep = set(score_path_onnx_nodes(proto))
    inside = {o for n in proto.graph.node if n.name in keep for o in n.output if o}
    ops = model.get_ordered_ops()
    by_tensor = {name: op for op in ops for out in op.outputs() for name in out.get_names()}
    stack = [by_tensor[t] for t in sorted(inside) if t in by_tensor]
    marked: dict[str, object] = {}
    while stack:
        op = stack.pop()
        if op.get_name() in marked or op.get_type_name() in NO_NAME_OPS:
            continue
        marked[op.get_name()] = op
        for port in op.inputs():
            source = port.get_source_output()
            names = set(source.get_names())
            if names and not names & inside:
                continue  # made by an op outside the score path
            stack.append(source.get_node())
    for op in marked.values():
        op.get_rt_info()[KEEP_PRECISION] = ""
    return sorted(op.get_friendly_name() for op in marked.values())


def fold_constants(model) -> None:
    """OpenVINO's constant folding (what compile_model does first anyway)."""
    from openvino import passes

    manager = passes.Manager()
    manager.register_pass(passes.ConstantFolding())
    manager.run_passes(model)


def settle_marked(model) -> int:
    """Rewrite the marked ops that the CPU plugin would otherwise merge with a neighbour into a
    new op of its own: the new op does not inherit the marking (DisablePrecisionConversion is not
    merged) and would run in bf16. Each rewrite computes the same values in f32, as the op the
    plugin would have made: a bias Add after a weight MatMul becomes one MatMul of the input
    padded with a 1 and the weight with the bias as its last row (the plugin's FullyConnected
    + bias fusion); a Transpose of the last two axes into MatMul becomes MatMul's transpose
    flag; Squeeze/Unsqueeze become Reshape; a scaling by a constant after a MatMul goes into the
    weights of the MatMul that feeds it (the plugin would move it into the MatMul's operand); a
    one-row Slice becomes a Gather (two Slices of one tensor become a VariadicSplit). One rewrite
    is for speed alone: the patch tokens' scores are sliced from all tokens' scores instead of
    slicing xn before the product (_slice_after_score). Returns
    the number of rewrites (the tests check the compiled model's runtime precisions)."""
    count = 0
    rules = (_fold_bias, _fold_transpose, _squeeze_to_reshape, _scale_into_weights, _row_slice_to_gather,
             _slice_after_score)
    for rule in rules:
        for op in [op for op in model.get_ordered_ops() if is_marked(op)]:
            count += bool(rule(op))
    model.validate_nodes_and_infer_types()
    return count


def _data(output):
    node = output.get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def _replace(old, new) -> bool:
    """`new` (marked) takes over `old`'s output: consumers, tensor names, friendly name."""
    for target in old.output(0).get_target_inputs():
        target.replace_source_output(new.output(0))
    new.output(0).set_names(old.output(0).get_names())
    new.set_friendly_name(old.get_friendly_name())
    new.get_rt_info()[KEEP_PRECISION] = ""
    return True


def _fold_bias(op) -> bool:
    import numpy as np
    from openvino import opset1
    from openvino import opset13 as ops

    if op.get_type_name() != "Add":
        return False
    mm, bias = op.input_value(0), _data(op.input_value(1))
    if mm.get_node().get_type_name() != "MatMul" or bias is None or len(mm.get_target_inputs()) != 1:
        return False
    node = mm.get_node()
    weight, flags = _data(node.input_value(1)), node.get_attributes()
    rank = node.input_value(0).get_partial_shape().rank
    if weight is None or weight.ndim != 2 or flags["transpose_a"] or not rank.is_static:
        return False
    weight = weight.T if flags["transpose_b"] else weight
    if bias.size != weight.shape[1]:
        return False
    ends = np.zeros(rank.get_length(), np.int64)
    ends[-1] = 1
    # Pad-1, not Pad-12: the plugin converts Pad-12 to Pad-1, a new op without the marking
    padded = opset1.pad(node.input_value(0), np.zeros_like(ends), ends, "constant", np.float32(1.0))
    padded.get_rt_info()[KEEP_PRECISION] = ""
    augmented = np.concatenate([weight, bias.reshape(1, -1)]).astype(np.float32)
    return _replace(op, ops.matmul(padded, ops.constant(augmented), False, False))


def _fold_transpose(op) -> bool:
    from openvino import opset13 as ops

    if op.get_type_name() != "MatMul":
        return False
    inputs, flags = list(op.input_values()), op.get_attributes()
    swapped = False
    for i, key in ((0, "transpose_a"), (1, "transpose_b")):
        node = inputs[i].get_node()
        perm = _data(node.input_value(1)) if node.get_type_name() == "Transpose" else None
        if perm is not None and len(perm) >= 2 and list(perm) == [*range(len(perm) - 2), len(perm) - 1,
                                                                  len(perm) - 2]:
            inputs[i], flags[key], swapped = node.input_value(0), not flags[key], True
    return swapped and _replace(op, ops.matmul(*inputs, flags["transpose_a"], flags["transpose_b"]))


def _squeeze_to_reshape(op) -> bool:
    import numpy as np
    from openvino import opset13 as ops

    shape = op.get_output_partial_shape(0)
    if op.get_type_name() not in ("Squeeze", "Unsqueeze") or not shape.rank.is_static:
        return False
    dims = [d.get_length() if d.is_static else -1 for d in shape]
    if dims.count(-1) > 1:
        return False
    return _replace(op, ops.reshape(op.input_value(0), np.array(dims, np.int64), False))


def _scale_into_weights(op) -> bool:
    """Divide/Multiply by a scalar after [Reshape ←] MatMul(a, b) where a or b is a MatMul with
    constant weights: the scale goes into those weights (the plugin would move it into the
    MatMul's operand and re-create the MatMul without the marking)."""
    from openvino import opset13 as ops

    scale = _data(op.input_value(1)) if op.get_type_name() in ("Divide", "Multiply") else None
    if scale is None or scale.size != 1:
        return False
    value = op.input_value(0)
    node = value.get_node()
    if node.get_type_name() == "Reshape" and len(value.get_target_inputs()) == 1:
        node = node.input_value(0).get_node()
    if node.get_type_name() != "MatMul" or len(node.output(0).get_target_inputs()) != 1:
        return False
    factor = float(scale.reshape(-1)[0])
    factor = 1.0 / factor if op.get_type_name() == "Divide" else factor
    for source in node.input_values():
        inner = source.get_node()
        weight = _data(inner.input_value(1)) if inner.get_type_name() == "MatMul" else None
        if weight is None or len(source.get_target_inputs()) != 1:
            continue
        flags = inner.get_attributes()
        scaled = ops.matmul(inner.input_value(0), ops.constant((weight * factor).astype(weight.dtype)),
                            flags["transpose_a"], flags["transpose_b"])
        _replace(inner, scaled)
        for target in op.output(0).get_target_inputs():  # the scale itself is gone
            target.replace_source_output(value)
        value.get_tensor().add_names(op.output(0).get_names())
        return True
    return False


def _row_slice_to_gather(op) -> bool:
    import numpy as np
    from openvino import opset13 as ops

    if op.get_type_name() != "Slice" or op.get_input_size() < 5:
        return False
    values = [_data(op.input_value(i)) for i in range(1, 5)]
    if any(v is None or v.size != 1 for v in values):
        return False
    start, stop, step, axis = (int(v.reshape(-1)[0]) for v in values)
    if step != 1 or stop - start != 1 or start < 0:
        return False
    return _replace(op, ops.gather(op.input_value(0), np.array([start], np.int64), axis))


def _slice_after_score(op) -> bool:
    """MatMul(w [B, 1, C], Slice(xn, 1:, axis 1), transpose_b) → Slice(MatMul(w, xn, transpose_b),
    1:, last axis): the scores of every token, then the patch tokens' ones. The plugin copies a
    [B, N-1, C] slice of xn with a reference kernel (~3 % of an INT8 idle IR at batch 64); a
    slice of the [B, 1, N] scores costs nothing. Each score is the same dot product."""
    import numpy as np
    from openvino import opset13 as ops

    if op.get_type_name() != "MatMul":
        return False
    flags = op.get_attributes()
    if flags["transpose_a"] or not flags["transpose_b"]:
        return False
    sliced = op.input_value(1).get_node()
    if sliced.get_type_name() != "Slice" or sliced.get_input_size() < 5:
        return False
    values = [_data(sliced.input_value(i)) for i in range(1, 5)]
    rank = sliced.input_value(0).get_partial_shape().rank
    if any(v is None or v.size != 1 for v in values) or not rank.is_static or rank.get_length() != 3:
        return False
    start, stop, step, axis = (int(v.reshape(-1)[0]) for v in values)
    if (start, step) != (1, 1) or axis not in (1, -2) or stop < 2**31 - 1:
        return False
    scores = ops.matmul(op.input_value(0), sliced.input_value(0), False, True)
    scores.get_rt_info()[KEEP_PRECISION] = ""
    one = np.array([1], np.int64)
    last = ops.slice(scores, one, np.array([2**63 - 1], np.int64), one, np.array([2], np.int64))
    return _replace(op, last)


def is_marked(op) -> bool:
    """Whether an op of a model read from an IR carries the keep-precision marking."""
    return any(key.startswith("DisablePrecisionConversion") or key == KEEP_PRECISION
               for key in op.get_rt_info().keys())


def ir_metadata(model) -> OnnxMetadata:
    """The idle_export metadata an IR carries (empty when it has none)."""
    if not model.has_rt_info([METADATA_KEY]):
        return OnnxMetadata({})
    try:
        props = json.loads(model.get_rt_info([METADATA_KEY]).astype(str))
    except ValueError:
        raise BadInputError(f"the IR's {METADATA_KEY} is not valid JSON",
                            "write the IR again with `idle-export onnx --target openvino`") from None
    return OnnxMetadata({str(k): str(v) for k, v in props.items()})


def read_ir_metadata(path: str | Path) -> OnnxMetadata:
    """The metadata of an IR file (reads the model, not compiled)."""
    ov = import_openvino()
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"OpenVINO IR not found: {path}", "check the path")
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or ["?"])[0][:200]
        raise BadInputError(f"OpenVINO cannot read {path.name} ({first})",
                            "write it again with `idle-export onnx --target openvino`") from None
    return ir_metadata(model)


def write_ir(onnx_path: str | Path, xml_path: str | Path | None = None, *, fold: bool = True
             ) -> tuple[Path, Path, int]:
    """Write the marked IR of an ONNX file (default: X.xml + X.bin beside X.onnx), both files
    atomically: saved into a temporary folder beside them, then renamed (bin first, so an
    X.xml never names a missing X.bin; on failure neither is touched). Returns (xml, bin,
    number of marked ops). fold=False for an INT8 Q/DQ file: OpenVINO's constant folding would
    turn each int8 weight and its DequantizeLinear into an f32 weight (FP32 GEMMs again); its
    weights are constants already (quantized files have the openvino target's passes)."""
    ov = import_openvino()
    onnx_path = Path(onnx_path)
    xml, binary = (ir_paths(onnx_path) if xml_path is None else
                   (Path(xml_path), Path(xml_path).with_suffix(".bin")))
    proto = load_onnx(onnx_path)
    try:
        model = ov.Core().read_model(str(onnx_path))
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or ["?"])[0][:200]
        raise BadInputError(f"OpenVINO cannot read {onnx_path.name} ({first})",
                            "export with openvino_ir=False, or check the file with "
                            "`idle-export lint`") from None
    if fold:
        fold_constants(model)  # weights as Constants (a portable file slices and transposes them)
    mark_score_path(model, proto)
    settle_marked(model)
    marked = [op.get_friendly_name() for op in model.get_ordered_ops() if is_marked(op)]
    props = dict(OnnxMetadata.of(proto).props)
    props["idle_export.openvino_ir"] = json.dumps({"onnx": onnx_path.name, "fp32_ops": len(marked)})
    model.set_rt_info(json.dumps(props), [METADATA_KEY])
    needed = onnx_path.stat().st_size
    with work_dir(output_folder(xml), "ir") as tmp, mapped_disk_full(xml, needed):
        ov.save_model(model, str(tmp / xml.name), compress_to_fp16=False)
        os.replace(tmp / xml.with_suffix(".bin").name, binary)
        os.replace(tmp / xml.name, xml)
    return xml, binary, len(marked)
