"""ONNX Runtime as a Runner, and the session options every ORT session of the project uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from idle_export.errors import MissingDependencyError
from idle_export.onnx.io import SELECTION_PREFIX, load_onnx
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.passes import optimize_model_proto
from idle_export.runtime.base import Runner


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed",
                                     "pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


def ort_available_providers() -> list[str]:
    return import_onnxruntime().get_available_providers()


def session_options(ort, *, threads: int | None = None):
    """SessionOptions for CPU inference: ORT_ENABLE_ALL, intra-op threads, quiet logs."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def topk_index_outputs(proto) -> list[str]:
    """Names of the TopK index outputs, in graph order (= idle layer order)."""
    return [n.output[1] for n in proto.graph.node if n.op_type == "TopK"]


class OrtRunner(Runner):
    """ONNX Runtime session on an ONNX file (embedded or external weights).

    With selection=True the TopK index tensors inside the graph are marked as outputs (what
    Polygraphy's `--onnx-outputs` does), so any exported graph — plain, INT8, fused — can be
    compared token by token without re-exporting it.
    """

    def __init__(self, path: str | Path, *, name: str | None = None, selection: bool = False,
                 providers: list[str] | None = None, threads: int | None = None,
                 optimize: bool = False):
        self.path = Path(path)
        self.name = name or f"onnxruntime:{self.path.name}"
        self.selection = selection
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self.optimize = optimize  # onnx.passes, applied in memory before the session
        self.session = None
        self.idle_layers: list[int] = []
        self._topk: list[str] = []

    def activate(self) -> None:
        import onnx

        ort = import_onnxruntime()
        proto = load_onnx(self.path)
        if self.selection:
            self._topk = topk_index_outputs(proto)
            meta = OnnxMetadata.of(proto)
            layers = list(meta.spec.idle_layers) if meta.has_spec else []
            self.idle_layers = layers if len(layers) == len(self._topk) else list(range(len(self._topk)))
            outputs = {o.name for o in proto.graph.output}
            for name in self._topk:
                if name not in outputs:
                    proto.graph.output.append(
                        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
        if self.optimize:
            proto = optimize_model_proto(proto)
        opts = session_options(ort, threads=self.threads)
        self.session = ort.InferenceSession(proto.SerializeToString(), opts, providers=self.providers)
        self.input_name = self.session.get_inputs()[0].name

    def deactivate(self) -> None:
        self.session = None

    def infer(self, feed):
        names = ["logits", *self._topk]
        values = self.session.run(names, {self.input_name: feed["images"].astype(np.float32, copy=False)})
        result = {"logits": values[0]}
        for layer, idx in zip(self.idle_layers, values[1:], strict=False):
            result[f"{SELECTION_PREFIX}{layer}"] = idx
        return result
