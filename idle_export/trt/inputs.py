"""What a build takes, checked before any TensorRT work: the batch profile (ours or trtexec's
spelling), the ONNX graph's input and precision facts, the engine's default name."""

from __future__ import annotations

import re
from pathlib import Path

from idle_export.errors import BadInputError
from idle_export.onnx.elastic import permille
from idle_export.onnx.io import MAX_BATCH
from idle_export.onnx.lint import lint_model
from idle_export.onnx.metadata import OnnxMetadata


def parse_profile(text: str | None = "1:32:64", *, shapes: tuple[str, str, str] | None = None,
                  input_name: str = "images", chw: tuple[int, ...] | None = None) -> tuple[int, int, int]:
    """The batch optimisation profile (MIN, OPT, MAX) from `--profile MIN:OPT:MAX`, or from
    trtexec-style `--minShapes/--optShapes/--maxShapes NAME:BxCxHxW` (all three; C, H, W must be
    the model's `chw` when given)."""
    if shapes is not None:
        batches = []
        for flag, value in zip(("--minShapes", "--optShapes", "--maxShapes"), shapes, strict=True):
            name, _, dims = str(value).rpartition(":")
            try:
                numbers = tuple(int(d) for d in dims.lower().split("x"))
            except ValueError:
                numbers = ()
            if len(numbers) != 4 or (name and name != input_name):
                raise BadInputError(f"{flag} {value!r} is not {input_name}:BxCxHxW",
                                    f"e.g. {flag}={input_name}:1x3x224x224")
            if chw is not None and numbers[1:] != tuple(chw):
                raise BadInputError(f"{flag} {value!r}: the model takes {'x'.join(map(str, chw))} images",
                                    f"only the batch may vary, e.g. {flag}={input_name}:1x"
                                    + "x".join(map(str, chw)))
            batches.append(numbers[0])
        return check_batch(tuple(batches))
    parts = str(text).replace(" ", "").split(":")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise BadInputError(f"batch={text!r} is not MIN:OPT:MAX", "e.g. batch=1:32:64") from None
    if len(values) != 3:
        static = f"; a static engine for batch {values[0]} is batch={values[0]}:{values[0]}:{values[0]}" \
            if len(values) == 1 else ""
        raise BadInputError(f"batch={text!r} needs three batch sizes MIN:OPT:MAX{static}",
                            "e.g. batch=1:32:64 (any batch from MIN to MAX, tuned for OPT)")
    return check_batch(values)


def check_batch(batch) -> tuple[int, int, int]:
    lo, opt, hi = (int(v) for v in batch)
    if lo < 1:
        raise BadInputError(f"batch range {lo}:{opt}:{hi} starts below 1", "e.g. batch=1:32:64")
    if not lo <= opt <= hi:
        lo2, opt2, hi2 = sorted((lo, opt, hi))
        raise BadInputError(f"batch range {lo}:{opt}:{hi} is inverted (need MIN ≤ OPT ≤ MAX)",
                            f"e.g. batch={lo2}:{opt2}:{hi2}")
    if hi > MAX_BATCH:
        raise BadInputError(f"batch range {lo}:{opt}:{hi}: MAX is above {MAX_BATCH}, the largest batch "
                            "an exported graph takes", f"e.g. batch={lo}:{min(opt, 64)}:{min(hi, 256)}")
    return lo, opt, hi


def onnx_facts(model) -> dict:
    """What the builder needs to know about an ONNX graph before parsing it."""
    from onnx import TensorProto

    g = model.graph
    meta = OnnxMetadata.of(model)
    init_names = {i.name for i in g.initializer}
    shape_input = (meta.elastic or {}).get("input")  # the elastic TensorRT form's keep_permille
    inputs = [i for i in g.input if i.name not in init_names and i.name != shape_input]
    if len(inputs) != 1:
        raise BadInputError(f"the ONNX graph has {len(inputs)} inputs; expected one image input",
                            "export with `idle-export onnx` (input 'images' [B,3,H,W])")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    if len(shape) != 4 or any(s <= 0 for s in shape[1:]):
        raise BadInputError(f"input {inputs[0].name!r} has shape {shape}; expected [B,3,H,W] with fixed "
                            "C,H,W", "export with `idle-export onnx`")
    ops = {n.op_type for n in g.node}
    types = {i.data_type for i in g.initializer} | {
        v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    return {
        "input": inputs[0].name,
        "shape": shape,
        "outputs": [o.name for o in g.output],
        "qdq": bool(ops & {"QuantizeLinear", "DequantizeLinear"}),
        "fp16": TensorProto.FLOAT16 in types,
        "topk": sum(n.op_type == "TopK" for n in g.node),
        "metadata": meta,
        "shape_input": shape_input if shape_input in {i.name for i in g.input} - init_names else None,
    }


def parse_keep_range(text: str | None, meta: OnnxMetadata) -> tuple[int, int, int]:
    """`trt --elastic --keep-range MIN:OPT:MAX` (rates) → the keep_permille profile; default the
    file's min_rate:default:1. A rate outside the range is refused at run time (TrtRunner)."""
    info = meta.elastic
    if info is None:
        raise BadInputError("elastic=True builds an elastic file; this one has a fixed K",
                            "export it with `idle-export onnx CKPT --elastic`, or drop elastic=True")
    if text is None:
        text = f"{info['min_rate']}:{info['default']}:1"
    try:
        rates = [float(p) for p in str(text).replace(" ", "").split(":")]
    except ValueError:
        rates = []
    if len(rates) != 3 or not all(0 < r <= 1 for r in rates) or not rates[0] <= rates[1] <= rates[2]:
        raise BadInputError(f"keep_range={text!r} is not MIN:OPT:MAX with 0 < MIN ≤ OPT ≤ MAX ≤ 1",
                            "e.g. keep_range=0.3:0.7:1")
    lo, opt, hi = (permille(r) for r in rates)
    return lo, opt, hi


def default_engine_path(onnx: str | Path, precision: str) -> Path:
    """NAME.PRECISION.engine, with NAME free of the suffixes earlier steps add (x.int8.trt.onnx
    and x.fp16.onnx give x.int8.engine and x.fp16.engine, not x.int8.trt.int8.engine)."""
    onnx = Path(onnx)
    stem = onnx.name[:-5] if onnx.name.endswith(".onnx") else onnx.name
    stem = re.sub(r"(\.(int8|fp16|fp32|ort|trt|typed))+$", "", stem) or stem
    return onnx.with_name(f"{stem}.{precision}.engine")


def check_graph(onnx: Path, model, facts: dict, precision: str, batch) -> None:
    """Refuse, before any TensorRT work, a graph the requested build cannot take."""
    check_precision(onnx, facts, precision)
    if facts["shape"][0] > 0 and batch != (facts["shape"][0],) * 3:
        b = facts["shape"][0]
        raise BadInputError(f"{onnx.name} has a fixed batch of {b}; batch={':'.join(map(str, batch))} "
                            "needs a dynamic one", f"pass batch={b}:{b}:{b} or export with dynamic batch")
    errors = [f for f in lint_model(model) if f["severity"] == "error"]
    if errors:
        raise BadInputError(f"{onnx.name}: {errors[0]['message']}"
                            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                            f"run `idle-export lint {onnx}` for every finding")


def check_precision(onnx: Path, facts: dict, precision: str) -> None:
    if precision == "int8" and not facts["qdq"]:
        raise BadInputError(f"INT8 needs a Q/DQ ONNX: {onnx.name} has no QuantizeLinear/DequantizeLinear "
                            "nodes", f"quantize it for TensorRT: idle-export calibrate {onnx} --target trt "
                            f"(or let `idle-export trt {onnx} --int8` do it)")
    recipe = facts["metadata"].get("quantization") if precision == "int8" else None
    if isinstance(recipe, dict) and recipe.get("target") not in (None, "trt"):
        source = facts["metadata"].get("source_model") or "FP32.onnx"
        raise BadInputError(f"{onnx.name} is quantized for {recipe.get('target')} (asymmetric activations, "
                            "ONNX Runtime's own ops); TensorRT needs symmetric Q/DQ",
                            f"idle-export trt {source} --int8 (calibrates for TensorRT), or "
                            f"idle-export calibrate {source} --target trt")
    if precision != "int8" and facts["qdq"]:
        raise BadInputError(f"{onnx.name} has Q/DQ nodes (an INT8 graph); precision={precision} would "
                            "ignore them",
                            "pass precision=int8, or build from the FP32 export")
    if precision == "fp32" and facts["fp16"]:
        raise BadInputError(f"{onnx.name} has FP16 tensors; a strongly typed build would run them in FP16",
                            "pass precision=fp16, or build precision=fp32 from the FP32 export")
