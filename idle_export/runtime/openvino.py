"""OpenVINO (CPU) as a Runner: `openvino.Core().compile_model(...)` on an exported ONNX file, or
on the OpenVINO IR (X.xml) that `onnx --target openvino` writes beside it (runtime.openvino_ir).

FP32 inference is asked for explicitly (INFERENCE_PRECISION_HINT f32): OpenVINO's CPU plugin
otherwise computes in bf16 on CPUs that have it, which moves logits by ~1e-2 and changes which
tokens the idle layers keep. (An INT8 file's quantized ops still run in INT8: the hint only
sets the floating-point precision.) PERFORMANCE_HINT LATENCY: one stream, `threads` threads,
what one synchronous request per call wants.

selection=True returns the kept patch indices per idle layer: the file's own
`selection_layer{L}` outputs when it was exported with --emit-selection, else the TopK index
tensors inside the graph, marked as outputs by an ONNX edit before compiling (as OrtRunner
does; a plugin-form graph's IdleSelect outputs likewise), together with the scores each TopK
ranks (`last_scores`, for the tie analysis of parity.compare). optimize=True applies, in
memory, the passes of the `openvino` export target that the file does not have yet.

An IR runs as written (it has the openvino target's passes, and its score path is marked to
stay f32 when OpenVINO infers in bf16); selection=True adds each TopK's indices and scores as
outputs of the read model. inference_precision "bf16" asks for bf16 (where the CPU has no bf16,
OpenVINO runs f32: `runtime_precision` says what it compiled for).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from idle_export.errors import BadInputError
from idle_export.model.config import check_keep_rate
from idle_export.onnx.elastic import elastic_feed, pin_rate
from idle_export.onnx.io import SELECTION_PREFIX
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.passes import optimize_model_proto
from idle_export.onnx.plugin_form import add_selection_outputs, inline, is_plugin_form
from idle_export.onnx.targets import file_passes, missing_passes
from idle_export.runtime.base import Runner
from idle_export.runtime.onnxruntime import expose_outputs, topk_index_outputs, topk_score_inputs
from idle_export.runtime.openvino_ir import OPENVINO_PIP, import_openvino, ir_metadata, is_ir

__all__ = ["OPENVINO_PIP", "OpenVinoRunner", "import_openvino", "openvino_config",
           "openvino_default_precision"]


def openvino_default_precision() -> str:
    """The floating-point precision OpenVINO's CPU plugin computes in unless told otherwise:
    bf16 on CPUs with AMX or AVX-512 BF16, f32 elsewhere."""
    return import_openvino().Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


def openvino_config(threads: int | None, precision: str | None = "f32") -> dict:
    """compile_model properties of every OpenVINO CPU model of the project (bench, check, sweep);
    precision None: OpenVINO's own default (openvino_default_precision)."""
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class OpenVinoRunner(Runner):
    """An ONNX file compiled by OpenVINO for the CPU, FP32 (INT8 where the file is quantized)."""

    def __init__(self, path: str | Path, *, name: str | None = None, selection: bool = False,
                 threads: int | None = None, optimize: bool = False, keep_rate: float | None = None,
                 inference_precision: str | None = "f32", target: str = "openvino"):
        self.path = Path(path)
        self.target = target  # the export target whose passes `optimize` applies (onnx.targets)
        self.inference_precision = inference_precision  # None: OpenVINO's default for this CPU
        self.keep_rate = keep_rate  # an elastic file's keep_rate (None: the file's default)
        self._meta = None
        self._pinned: dict = {}  # an elastic file: {rate: (compiled, request)}
        self.name = name or f"openvino:{self.path.name}"
        self.selection = selection
        self.threads = threads
        self.optimize = optimize
        self.compiled = None
        self.request = None
        self.file_passes: list[str] = []
        self.passes_at_load: list[str] = []
        self.score_mode: str | None = None
        self.last_scores: list[np.ndarray] = []
        self._selection: list[tuple[str, str]] = []  # (result key, output name)
        self._cls_first = False  # --emit-selection outputs: [B, K+1], CLS (0) first
        self._scores: list[str] = []
        self.runtime_precision: str | None = None  # what OpenVINO compiled for (f32, bf16)
        self._source = None  # static_batch: what each batch size's model is compiled from
        self._by_batch: dict = {}  # static_batch: {batch: (compiled, request)}

    def activate(self) -> None:
        ov = import_openvino()
        if not self.path.is_file():
            raise BadInputError(f"{'OpenVINO IR' if is_ir(self.path) else 'ONNX file'} not found: "
                                f"{self.path}", "check the path")
        self._core = ov.Core()
        if is_ir(self.path):
            self._activate_ir()
            return
        meta = self.onnx_metadata(self.path)
        self.file_passes = file_passes(meta)
        self.score_mode = meta.score_mode if meta.has_spec else None
        todo = missing_passes(meta, self.target) if self.optimize else ()
        self.passes_at_load = list(todo)
        elastic_feed(meta, self.keep_rate, self.path.name)  # a rate this file cannot run: now
        self._meta, self._pinned = meta, {}
        if meta.elastic:  # compiled per rate, on first use (_at_rate)
            self._base = self._edited(meta, todo)
            self._at_rate(self.keep_rate)
            return
        if self.selection or todo:
            source = self._edited(meta, todo).SerializeToString()
        else:
            self.given()  # OpenVINO reads the file itself: drop a model handed over
            source = str(self.path)
        self._start(source)

    def _start(self, source) -> None:
        """Compile `source` now, or (static_batch) per batch size on first use (_at_batch)."""
        if self.static_batch:
            self._source, self._by_batch = self._read(source), {}  # read once, cloned per batch size
            return
        self.compiled = self._compile(source)
        self.request = self.compiled.create_infer_request()

    def _at_batch(self, batch: int) -> None:
        """static_batch: the model compiled with its image batch fixed to `batch` becomes current."""
        if batch not in self._by_batch:
            model = self._source.clone()
            images = model.inputs[0]
            model.reshape({images.get_any_name(): [batch, *list(images.get_partial_shape())[1:]]})
            compiled = self._compile(model)
            self._by_batch[batch] = (compiled, compiled.create_infer_request())
        self.compiled, self.request = self._by_batch[batch]

    def _activate_ir(self) -> None:
        """An IR: read, its selection exposed (selection=True), compiled as written."""
        model = self._core.read_model(str(self.path))
        meta = ir_metadata(model)
        if meta.elastic:
            raise BadInputError(f"{self.path.name} is the IR of an elastic file: its keep rate is "
                                "pinned per compile on the ONNX file", f"run {self.path.stem}.onnx")
        elastic_feed(meta, self.keep_rate, self.path.name)
        self._meta, self._pinned = meta, {}
        self.file_passes = file_passes(meta)
        self.score_mode = meta.score_mode if meta.has_spec else None
        if self.selection:
            self._expose_ir(model, meta)
        self._start(model)

    def _expose_ir(self, model, meta: OnnxMetadata) -> None:
        """The IR's own selection_layer outputs, else each TopK's indices and scores as outputs."""
        own = [n for o in model.outputs for n in sorted(o.get_names()) if n.startswith(SELECTION_PREFIX)]
        if own:
            self._cls_first = True
            self._selection = [(name, name) for name in own]
            return
        topk = [op for op in model.get_ordered_ops() if op.get_type_name() == "TopK"]
        if not topk:
            raise BadInputError(f"{self.path.name} has no token selection (no TopK)",
                                "check a dense file without selection, or pass the idle export")
        layers = list(meta.spec.idle_layers) if meta.has_spec else []
        layers = layers if len(layers) == len(topk) else list(range(len(topk)))
        index = model.add_outputs([op.output(1) for op in topk])
        scores = model.add_outputs([op.input_value(0) for op in topk])
        self._selection = [(f"{SELECTION_PREFIX}{layer}", out.get_any_name())
                           for layer, out in zip(layers, index, strict=True)]
        self._scores = [out.get_any_name() for out in scores]

    def _read(self, model):
        """An ov.Model of an ov.Model, a path or serialized ONNX bytes (one-line error if OpenVINO
        cannot read it)."""
        if hasattr(model, "get_ordered_ops"):
            return model
        try:
            return self._core.read_model(model)
        except RuntimeError as e:
            raise self._refused(e) from None

    def _compile(self, model):
        """Compile an ov.Model, a path or serialized ONNX bytes for the CPU."""
        try:
            compiled = self._core.compile_model(self._read(model), "CPU",
                                                openvino_config(self.threads, self.inference_precision))
        except RuntimeError as e:
            raise self._refused(e) from None
        self.runtime_precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        return compiled

    def _refused(self, error: RuntimeError) -> BadInputError:
        first = (str(error).strip().splitlines() or ["?"])[0][:200]
        return BadInputError(f"OpenVINO cannot compile {self.path.name} ({first})",
                             "export it with `idle-export onnx CKPT --target openvino` (or portable): a "
                             "file for target ort has ONNX Runtime-only ops")

    def _at_rate(self, rate: float | None) -> None:
        """An elastic file: the model compiled for `rate` (None: the runner's, else the file's
        default) becomes current. OpenVINO gets the graph pinned at that rate (onnx.elastic.
        pin_rate: static shapes; with K computed at run time its CPU plugin is ~15 % slower at
        batch 1), one compile per rate, kept for later calls."""
        rate = self.keep_rate if rate is None else rate
        rate = self._meta.elastic["default"] if rate is None else check_keep_rate(rate)
        key = float(np.float32(rate))
        if key not in self._pinned:
            compiled = self._compile(pin_rate(self._base, rate).SerializeToString())
            self._pinned[key] = (compiled, compiled.create_infer_request())
        self.compiled, self.request = self._pinned[key]

    def _edited(self, meta: OnnxMetadata, passes: tuple[str, ...]):
        """The file's graph with the selection tensors marked as outputs and `passes` applied."""
        proto = self.onnx_model(self.path)
        plugin = is_plugin_form(proto)
        if self.selection:
            own = [o.name for o in proto.graph.output if o.name.startswith(SELECTION_PREFIX)]
            layers = list(meta.spec.idle_layers) if meta.has_spec else []
            if own:
                self._cls_first = True
                self._selection = [(name, name) for name in own]
            else:
                topk = add_selection_outputs(proto) if plugin else topk_index_outputs(proto)
                if not topk:
                    raise BadInputError(f"{self.path.name} has no token selection (no TopK)",
                                        "check a dense file without selection, or pass the idle export")
                layers = layers if len(layers) == len(topk) else list(range(len(topk)))
                self._selection = [(f"{SELECTION_PREFIX}{layer}", name) for layer, name in
                                   zip(layers, topk, strict=True)]
                self._scores = [] if plugin else topk_score_inputs(proto)
            expose_outputs(proto, [name for _, name in self._selection], self._scores)
        if passes:
            proto = optimize_model_proto(inline(proto) if plugin else proto, passes)
        return proto

    def deactivate(self) -> None:
        self.request = None
        self.compiled = None
        self._pinned = {}
        self._by_batch, self._source = {}, None

    def infer(self, feed):
        images = np.ascontiguousarray(feed["images"], dtype=np.float32)
        if self._meta.elastic:  # the call's rate (or the runner's): its pinned model
            self._at_rate(feed.get("keep_rate"))
        elif feed.get("keep_rate") is not None:
            elastic_feed(self._meta, feed["keep_rate"], self.path.name)  # refused unless the file's own
        if self._source is not None:
            self._at_batch(images.shape[0])
        out = self.request.infer({"images": images})
        # copies (np.array): the request reuses its output buffers on the next call
        result = {"logits": np.array(out[self.compiled.output("logits")])}
        for key, name in self._selection:
            idx = np.array(out[self.compiled.output(name)], dtype=np.int64)
            result[key] = idx[:, 1:] - 1 if self._cls_first else idx  # patch indices
        self.last_scores = [np.array(out[self.compiled.output(n)], dtype=np.float64)
                            for n in self._scores]
        return result
