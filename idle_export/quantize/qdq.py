"""INT8 post-training quantization with ONNX Runtime's quantizer, sparing the token selection.

`quantize_onnx(src, dst, images=..., target="ort"|"trt")`:
1. load the FP32 graph with its weights (external .onnx.data too) and refuse one that is
   already quantized;
2. ONNX Runtime's `quant_pre_process` on the in-memory model (constant folding turns the
   sliced Wq/Wk of the score path into plain initializers; shape inference);
3. find the selection path: every node walked backwards from each TopK until the idle
   layer's LayerNorm — q_cls, the key projection, q_cls·kᵀ, the head mean, TopK itself — and
   the index arithmetic after TopK (Add/Concat/Unsqueeze/Expand feeding Gather/ScatterElements
   indices); they go into `nodes_to_exclude`, so the scores are computed in FP32 and the
   kept-token sets only change when the FP32 inputs of the score path change;
4. `quantize_static` with a CalibrationDataReader over the calibration images, in chunks
   (ORT's `CalibStridedMinMax`), so entropy/percentile histograms do not hold every activation
   of every image in memory at once;
5. for target "ort", fold the bias Adds into com.microsoft.MatMulIntegerToFloat (the node ORT
   makes of DQ→MatMul anyway; `fuse_matmul_bias`);
6. copy the idle_export.* metadata, add `idle_export.precision = "int8"` and the recipe, write
   atomically (external data when the source had it).

Recipes (docs/int8.md has the measurements behind the ORT one):
- target "ort": fastest on ONNX Runtime CPU (x86 VNNI): see ORT_RECIPE.
- target "trt": TensorRT wants symmetric int8 Q/DQ (zero point 0) in front of MatMul/Gemm/Conv
  and float biases (`QuantizeBias: False`: TensorRT rejects int32 bias DQ).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from idle_export.data.images import load_images
from idle_export.deps import import_onnxruntime
from idle_export.errors import BadInputError
from idle_export.fileio import check_output_path, mapped_disk_full, output_folder, work_dir
from idle_export.hardware import memory_available
from idle_export.onnx.graph import consumers as consumers_of
from idle_export.onnx.graph import producers as producers_of
from idle_export.onnx.io import MAX_BATCH, install_onnx, load_onnx
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.passes import bias_gelu
from idle_export.onnx.targets import ORT_ONLY_PASSES, apply_target, file_passes, file_target
from idle_export.quantize.openvino_int8 import import_nncf, write_openvino
from idle_export.quantize.recipes import EXPORT_TARGET, RECIPES, check_recipe
from idle_export.quantize.selection import (
    activation_matmuls,
    dequantized_score_inputs,
    is_quantized,
    selection_path_nodes,
)

# Older ONNX Runtimes fail in quant_pre_process: their symbolic shape inference raises IndexError in
# _infer_Concat on our exported graphs (1.20.1 … 1.30.0 tried; 1.31.0 works). Inference is fine there.
MIN_ORT_QUANTIZATION = "1.31"


def _ort_quantization():
    """onnxruntime.quantization from onnxruntime or onnxruntime-gpu (exit 3 naming the extras, or
    the version to upgrade to)."""
    return import_onnxruntime("quantization", at_least=MIN_ORT_QUANTIZATION, needed_for="INT8 calibration")


# ----------------------------------------------------------------------------- graph helpers


# ----------------------------------------------------------------------------- calibration data
class _Reader:
    """ORT CalibrationDataReader over a preprocessed array, in batches; supports set_range so
    quantize_static's CalibStridedMinMax can calibrate chunk by chunk."""

    def __init__(self, input_name: str, array: np.ndarray, batch_size: int, progress=None):
        self.input_name = input_name
        self.batches = [array[i:i + batch_size] for i in range(0, len(array), batch_size)]
        self.progress = progress
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(range(start_index, min(end_index, len(self.batches))))

    def get_next(self):
        i = next(self._it, None)
        if i is None:
            return None
        if self.progress:
            self.progress(i, len(self.batches))
        return {self.input_name: np.ascontiguousarray(self.batches[i], dtype=np.float32)}

    def rewind(self) -> None:
        self.set_range(0, len(self.batches))


def _make_reader_class(quantization):
    """The reader as a subclass of ORT's CalibrationDataReader (imported lazily)."""

    class Reader(_Reader, quantization.CalibrationDataReader):
        pass

    return Reader


def _bias_gelu(path: Path, spec, external: bool) -> Path:
    """onnx.passes.bias_gelu (fc1 bias + Erf-GELU → BiasGelu, the pass `bench` runs) on the
    preprocessed model, before quantizing: the MatMuls stay visible to the quantizer."""
    import onnx

    fused = bias_gelu(onnx.load(str(path)), spec.num_heads, spec.embed_dim)
    out = path.with_name("fused.onnx")
    if external:
        onnx.save(fused, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="fused.onnx.data")
    else:
        onnx.save(fused, str(out))
    return out


def fuse_matmul_bias(proto) -> int:
    """In place: DequantizeLinear(x_q) · DequantizeLinear(W_q) followed by `+ bias` becomes one
    com.microsoft.MatMulIntegerToFloat(x_q, W_q, scales, zero points, bias) — the node ONNX
    Runtime's CPU kernels make of DQ→MatMul anyway, minus the separate bias Add. Returns the
    number of MatMuls fused. ORT-only (TensorRT does not know the op)."""
    import onnx

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers, consumers = producers_of(proto), consumers_of(proto)
    graph_outputs = {o.name for o in graph.output}
    replace, drop = {}, set()
    for mm in graph.node:
        if mm.op_type != "MatMul" or mm.output[0] in graph_outputs:
            continue
        a, b = (producers.get(i) for i in mm.input)
        if not (a is not None and b is not None and a.op_type == b.op_type == "DequantizeLinear"
                and b.input[0] in inits and len(a.input) == 3 and len(b.input) == 3):
            continue
        users = consumers.get(mm.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = [i for i in add.input if i != mm.output[0]]
        if len(bias) != 1 or bias[0] not in inits or len(inits[bias[0]].dims) != 1:
            continue
        inputs = [a.input[0], b.input[0], a.input[1], b.input[1], a.input[2], b.input[2], bias[0]]
        replace[mm.name] = onnx.helper.make_node("MatMulIntegerToFloat", inputs, [add.output[0]],
                                                 name=f"{mm.name}_int8_bias", domain="com.microsoft")
        drop.add(add.name)
        drop.update(dq.name for dq in (a, b) if len(consumers[dq.output[0]]) == 1)
    if not replace:
        return 0
    nodes = [replace.get(n.name, n) for n in graph.node if n.name not in drop]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return len(replace)


# ----------------------------------------------------------------------------- main entry
DEFAULT_NUM = 512  # calibration images when the user gives no --num (fewer in a folder are fine)
MAX_CALIB_IMAGES = 100_000


def default_int8_path(src: str | Path, target: str) -> Path:
    """MODEL.int8.TARGET.onnx beside MODEL.onnx: each target's INT8 file has its own name."""
    src = Path(src)
    stem = src.name[:-5] if src.name.endswith(".onnx") else src.name
    return src.with_name(f"{stem}.int8.{target}.onnx")


def check_not_other_target(dst: Path, target: str, src: Path) -> None:
    """Refuse to replace an INT8 file made for another target (it would be lost silently)."""
    if not dst.is_file():
        return
    try:
        made_for = (OnnxMetadata.read(dst).get("quantization") or {}).get("target")
    except (BadInputError, AttributeError):
        return
    if made_for and made_for != target:
        raise BadInputError(f"{dst.name} holds an INT8 model calibrated for {made_for}; target="
                            f"{target} would replace it",
                            f"write to another file: output={default_int8_path(src, target).name}")


def quantize_onnx(src, dst, *, images=None, num: int | None = None, method: str = "minmax",
                  target: str = "ort", per_channel: bool = True, batch_size: int = 16, seed: int = 0,
                  cache_dir=None, status=None, activations: str = "auto", weight_range: str = "auto") -> dict:
    """Calibrate on `images` (None: the built-in set; a folder, list file, list of paths or a
    preprocessed array) and write an INT8 Q/DQ model to `dst`. `num=None`: up to DEFAULT_NUM
    images (all of a smaller folder). `activations`: "symmetric", "asymmetric" or "auto" (the
    target's: ACTIVATIONS). `weight_range`: "reduced" (7-bit), "full" (8-bit) or "auto" (the
    target's: WEIGHT_RANGES). Returns a report dict."""
    t0 = time.perf_counter()
    symmetric, reduce_range = check_recipe(method, target, activations, weight_range)
    if not 1 <= batch_size <= MAX_BATCH:
        raise BadInputError(f"batch_size={batch_size} must be between 1 and {MAX_BATCH}",
                            "e.g. batch_size=16")
    if num is not None and not 0 <= num <= MAX_CALIB_IMAGES:
        raise BadInputError(f"num={num} must be between 0 and {MAX_CALIB_IMAGES}",
                            "a few hundred images calibrate a ViT well, e.g. num=512")
    src, dst = Path(src), Path(dst)
    check_output_path(dst, "output=")
    if dst.resolve() == src.resolve():
        raise BadInputError(f"output {dst} is the input model", "write the INT8 model to a new file, "
                            f"e.g. output={default_int8_path(src, target).name}")
    check_not_other_target(dst, target, src)
    proto = load_onnx(src)
    if is_quantized(proto):
        raise BadInputError(f"{src.name} is already quantized (it has Q/DQ or integer operators)",
                            "calibrate the FP32 model exported by `idle-export onnx`")
    meta = OnnxMetadata.of(proto)
    if meta.form == "plugin":
        raise BadInputError(f"{src.name} is the plugin form (IdleSelect/IdleScatter nodes); INT8 "
                            "takes the standard export",
                            "calibrate an export made without `idle-export onnx --plugin`")
    spec = meta.spec
    if target != "ort" and (set(file_passes(meta)) & ORT_ONLY_PASSES or file_target(meta) == "ort"):
        raise BadInputError(f"{src.name} was exported for ONNX Runtime (com.microsoft ops); target="
                            f"{target} needs standard ops", "calibrate the portable export "
                            "(idle-export onnx CKPT) or one made with `idle-export onnx --target "
                            + EXPORT_TARGET[target] + "`")
    if target != "openvino" and "gather_rows" in file_passes(meta):
        raise BadInputError(f"{src.name} has row gathers (GatherND/ScatterND of an "
                            "`idle-export onnx --target "
                            f"{file_target(meta)}` export), whose shapes ONNX Runtime's quantizer cannot "
                            "infer", "calibrate the portable export (idle-export onnx CKPT): the INT8 "
                            "file gets the target's passes after quantizing")
    if target == "openvino":
        import_nncf()  # exit 3 before reading images
    available = memory_available()
    need = (num or DEFAULT_NUM) * 3 * spec.img_size**2 * 4  # the preprocessed images stay in memory
    if available and need > 0.5 * available:
        raise BadInputError(f"num={num} images take about {need / 2**30:.0f} GiB preprocessed; this "
                            f"machine has {available / 2**30:.0f} GiB available",
                            f"use num={int(0.5 * available // (3 * spec.img_size**2 * 4))} or less")
    input_name = proto.graph.input[0].name
    import onnx

    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(src), load_external_data=False).graph.initializer)

    def say(msg):
        if status is not None:
            status(msg)

    say(f"reading calibration images ({'built-in set' if images is None else images})")
    calib = load_images(images, DEFAULT_NUM if num is None else num, spec, seed=seed, cache_dir=cache_dir,
                        at_most=num is None)

    if target == "openvino":
        return write_openvino(proto, meta, src, dst, calib, external, per_channel, symmetric, say, t0)
    q = _ort_quantization()
    rec = RECIPES[target]
    fmt = getattr(q.QuantFormat, rec["quant_format"])
    act = getattr(q.QuantType, rec["activation"])
    wt = getattr(q.QuantType, rec["weight"])
    cal_method = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
                  "entropy": q.CalibrationMethod.Entropy}[method]

    with work_dir(output_folder(dst), "int8") as tmpdir, mapped_disk_full(dst):
        say("preprocessing (constant folding, shape inference)")
        pre = tmpdir / "pre.onnx"
        quant_pre_process = import_onnxruntime("quantization.shape_inference").quant_pre_process
        quant_pre_process(proto, str(pre), save_as_external_data=external,
                          all_tensors_to_one_file=True, external_data_location="pre.onnx.data")
        if not pre.exists():
            raise BadInputError(f"ONNX Runtime could not preprocess {src.name}",
                                "rerun with --debug and report it")
        if rec["bias_gelu"]:
            say("fusing bias + GELU into BiasGelu (onnxruntime.transformers)")
            pre = _bias_gelu(pre, spec, external)
        pre_proto = onnx.load(str(pre), load_external_data=False)
        exclude = selection_path_nodes(pre_proto)
        if not rec.get("activation_matmuls", True):
            exclude += [n for n in activation_matmuls(pre_proto) if n not in exclude]
        topk = sum(1 for n in pre_proto.graph.node if n.op_type == "TopK")
        del pre_proto, proto

        reader = _make_reader_class(q)(input_name, calib.array, batch_size,
                                       progress=lambda i, n: say(f"calibrating ({method}) batch {i + 1}/{n}"))
        extra = {**rec.get("extra_options", {}), "CalibStridedMinMax": 1}
        if symmetric:
            extra["ActivationSymmetric"] = True
        if method == "percentile":
            extra.setdefault("CalibPercentile", 99.999)
        out = tmpdir / dst.name
        say(f"quantizing ({rec['quant_format']}, {len(exclude)} selection-path nodes kept FP32)")
        q.quantize_static(str(pre), str(out), reader, quant_format=fmt, op_types_to_quantize=rec["op_types"],
                          per_channel=per_channel, reduce_range=reduce_range, activation_type=act,
                          weight_type=wt,
                          nodes_to_exclude=exclude, use_external_data_format=external,
                          calibrate_method=cal_method, extra_options=extra)
        say("writing")
        model = onnx.load(str(out))
        fused_bias = fuse_matmul_bias(model) if rec.get("fuse_bias") else 0
        recipe_meta = {"target": target, "method": method, "num_images": len(calib),
                       "calibration": calib.source, "per_channel": per_channel,
                       "format": rec["quant_format"], "activation": rec["activation"],
                       "activations": "symmetric" if symmetric else "asymmetric",
                       "weight": rec["weight"], "weight_range": "reduced" if reduce_range else "full",
                       "op_types": rec["op_types"],
                       "selection_path_fp32": len(exclude), "bias_fused_matmuls": fused_bias}
        done = file_passes(meta) + (["bias_gelu"] if rec["bias_gelu"] else [])
        OnnxMetadata(meta.ours()).updated(precision="int8", quantization=recipe_meta, source_model=src.name,
                                          optimized=list(dict.fromkeys(done))).write(model)
        # the rest of the target's passes (ort: folded slices, row gathers), so the file is
        # timed and deployed as written
        model = apply_target(model, EXPORT_TARGET[target])
        ops: dict[str, int] = {}
        for n in model.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        dq_scores = dequantized_score_inputs(model)
        final_dir = tmpdir / "final"  # quantize_static wrote `out` (same name) into tmpdir
        final_dir.mkdir()
        install_onnx(model, final_dir, dst, external_data=external)
    return {
        "source": str(src),
        "output": str(dst),
        "external_data": external,
        "model": spec.describe(),
        **recipe_meta,
        "extra_options": {k: v for k, v in extra.items() if k != "CalibStridedMinMax"},
        "images": calib.summary(),
        "topk": topk,
        "score_matmuls_fp32": sum(1 for d in dq_scores if not d),
        "ops": dict(sorted(ops.items())),
        "size_bytes": dst.stat().st_size + (dst.with_name(dst.name + ".data").stat().st_size
                                            if external else 0),
        "seconds": round(time.perf_counter() - t0, 2),
    }

