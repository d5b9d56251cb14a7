"""ONNX Runtime as a Runner, and the session options every ORT session of the project uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from idle_export.deps import import_onnxruntime as _import_ort
from idle_export.onnx.elastic import elastic_feed
from idle_export.onnx.graph import consumers
from idle_export.onnx.io import SELECTION_PREFIX
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.passes import optimize_model_proto
from idle_export.onnx.plugin_form import add_selection_outputs, inline, is_plugin_form
from idle_export.onnx.targets import file_passes, missing_passes
from idle_export.runtime.base import Runner


def import_onnxruntime():
    """onnxruntime from onnxruntime or onnxruntime-gpu; exit 3 naming the extras when neither is
    installed (idle_export.deps)."""
    return _import_ort()


def ort_available_providers() -> list[str]:
    return import_onnxruntime().get_available_providers()


# ONNX Runtime's exact INT8 products on x86 CPUs without VNNI (SSE4.1, AVX2, AVX-512 without
# VNNI): their u8×s8 kernels add pairs of products in 16 bits, which saturate (photos10 INT8 with
# 8-bit weights: top-1 agreement 98 %, not 100 %); with this entry ORT multiplies such weights
# (any outside [-64, 64]) as u8×u8. It changes nothing on CPUs with VNNI or AMX, for float models,
# or for 7-bit weights (`calibrate`'s default for ort): docs/int8.md#cpus-without-vnni
X64_QUANT_PRECISION = ("session.x64quantprecision", "1")


def unshare_int8_weights(proto) -> int:
    """Give each consumer of a weight DequantizeLinear (int8 initializer) its own DQ node and copy
    of the weights and zero point; returns how many copies were made. With X64_QUANT_PRECISION
    on a CPU without VNNI, ONNX Runtime converts every fused node's int8 weight and zero point to
    u8 initializers named after them, and a weight two fused MatMuls share (the `trt` recipe's
    key projection with --scores official, after the ort passes) fails the session ("Attempt to
    replace the existing tensor")."""
    import onnx

    inits = {t.name: t for t in proto.graph.initializer}
    readers = consumers(proto)
    nodes, copies = [], 0
    for dq in proto.graph.node:
        nodes.append(dq)
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits \
                or inits[dq.input[0]].data_type != onnx.TensorProto.INT8:
            continue
        for k, user in enumerate(readers.get(dq.output[0], [])[1:], 1):
            inputs = list(dq.input)
            for j in (0, 2):  # the weights and their zero point: ORT converts both, by name
                if j < len(inputs) and inputs[j] in inits:
                    twin = onnx.TensorProto()
                    twin.CopyFrom(inits[inputs[j]])
                    twin.name = inputs[j] = f"{inputs[j]}__copy{k}"
                    proto.graph.initializer.append(twin)
            out = f"{dq.output[0]}__copy{k}"
            nodes.append(onnx.helper.make_node(  # right after the original: the order stays topological
                "DequantizeLinear", inputs, [out], name=f"{dq.name}__copy{k}",
                **{a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}))
            user.input[:] = [out if i == dq.output[0] else i for i in user.input]
            copies += 1
    if copies:
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return copies


def session_options(ort, *, threads: int | None = None):
    """SessionOptions for CPU inference: ORT_ENABLE_ALL, intra-op threads, quiet logs, exact INT8
    products on CPUs without VNNI (X64_QUANT_PRECISION)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry(*X64_QUANT_PRECISION)
    return opts


def topk_index_outputs(proto) -> list[str]:
    """Names of the TopK index outputs, in graph order (= idle layer order)."""
    return [n.output[1] for n in proto.graph.node if n.op_type == "TopK"]


def topk_score_inputs(proto) -> list[str]:
    """Names of the token-score tensors the TopKs rank, in graph order."""
    return [n.input[0] for n in proto.graph.node if n.op_type == "TopK"]


def expose_outputs(proto, index_names: list[str], score_names: list[str]) -> None:
    """Mark graph tensors as outputs (what Polygraphy's `--onnx-outputs` does): the TopK index
    tensors as INT64, the score tensors with the type inference gives them."""
    import onnx

    outputs = {o.name for o in proto.graph.output}
    for name in index_names:
        if name not in outputs:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    for name in score_names:
        if name not in outputs:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))


class OrtRunner(Runner):
    """ONNX Runtime session on an ONNX file (embedded or external weights).

    With selection=True the TopK index tensors inside the graph are marked as outputs (what
    Polygraphy's `--onnx-outputs` does), so any exported graph — plain, INT8, fused — can be
    compared token by token without re-exporting it. In a plugin-form graph (IdleSelect nodes)
    each IdleSelect's kept tokens are turned into the same TopK positions (idx[:, 1:] - 1) and
    marked instead. optimize=True applies, in memory, the passes of the `target` export target that
    the file does not have yet (none for a file written with `--target ort`; `passes_at_load`
    says which), inlining a plugin-form graph's functions first so the passes see the standard
    ops (ORT inlines them anyway). The scores each TopK ranks come back
    too (`last_scores`, one [B, N-1] array per idle layer), so parity can tell near-ties from
    real disagreement.
    """

    def __init__(self, path: str | Path, *, name: str | None = None, selection: bool = False,
                 providers: list[str] | None = None, threads: int | None = None,
                 optimize: bool = False, keep_rate: float | None = None, target: str = "ort"):
        self.path = Path(path)
        self.target = target  # the export target whose passes `optimize` applies (onnx.targets)
        self.keep_rate = keep_rate  # an elastic file's keep_rate input (None: the file's default)
        self._extra: dict = {}
        self.name = name or f"onnxruntime:{self.path.name}"
        self.selection = selection
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self.optimize = optimize  # onnx.targets' ort passes the file lacks, applied in memory
        self.file_passes: list[str] = []  # the passes the file on disk has (its metadata)
        self.passes_at_load: list[str] = []  # the passes applied in memory before the session
        self.session = None
        self.idle_layers: list[int] = []
        self._topk: list[str] = []
        self._scores: list[str] = []
        self.last_scores: list[np.ndarray] = []
        self.score_mode: str | None = None  # how the graph ranks tokens (from its metadata)

    def activate(self) -> None:
        ort = import_onnxruntime()
        proto = self.onnx_model(self.path)
        plugin = is_plugin_form(proto)
        if self.selection:
            self._topk = add_selection_outputs(proto) if plugin else topk_index_outputs(proto)
            self._scores = [] if plugin else topk_score_inputs(proto)  # plugin form: inside the function
            meta = OnnxMetadata.of(proto)
            self.score_mode = meta.score_mode if meta.has_spec else None
            layers = list(meta.spec.idle_layers) if meta.has_spec else []
            self.idle_layers = layers if len(layers) == len(self._topk) else list(range(len(self._topk)))
            expose_outputs(proto, self._topk, self._scores)
        meta = OnnxMetadata.of(proto)
        self.file_passes = file_passes(meta)
        todo = missing_passes(meta, self.target) if self.optimize else ()
        if todo:
            proto = optimize_model_proto(inline(proto) if plugin else proto, todo)
        self.passes_at_load = list(todo)
        unshare_int8_weights(proto)
        opts = session_options(ort, threads=self.threads)
        self.session = ort.InferenceSession(proto.SerializeToString(), opts, providers=self.providers)
        self.input_name = self.session.get_inputs()[0].name
        self._extra = elastic_feed(meta, self.keep_rate, self.path.name)
        self._meta = meta

    def deactivate(self) -> None:
        self.session = None

    def infer(self, feed):
        names = ["logits", *self._topk, *self._scores]
        extra = self._extra if feed.get("keep_rate") is None else \
            elastic_feed(self._meta, feed["keep_rate"], self.path.name)  # a rate for this call only
        values = self.session.run(names, {self.input_name: feed["images"].astype(np.float32, copy=False),
                                          **extra})
        result = {"logits": values[0]}
        n = len(self._topk)
        for layer, idx in zip(self.idle_layers, values[1:1 + n], strict=False):
            result[f"{SELECTION_PREFIX}{layer}"] = idx
        self.last_scores = [np.asarray(s, dtype=np.float64) for s in values[1 + n:]]
        return result
