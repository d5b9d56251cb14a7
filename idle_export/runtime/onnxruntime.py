"""Runners in Polygraphy's shape: `with runner: out = runner.infer({"images": x})`.

Inputs and outputs are dicts of numpy arrays. Every runner returns "logits" and, when asked
(`selection=True`), one "selection_layer{i}" int64 [B, K] array per idle layer: the indices of
the kept patch tokens (CLS excluded, 0-based over patches), in the runtime's own order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from idle_export.errors import BadInputError, MissingDependencyError
from idle_export.onnx.export import SELECTION_PREFIX


class Runner:
    name = "runner"

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()

    def activate(self) -> None:  # pragma: no cover - interface
        pass

    def deactivate(self) -> None:  # pragma: no cover - interface
        pass

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError


class TorchRunner(Runner):
    """An IdleViT (or its dense twin) in eager PyTorch, FP32, CPU."""

    def __init__(self, model, *, name: str = "torch", selection: bool = False, threads: int | None = None):
        self.model = model
        self.name = name
        self.selection = selection and not model.dense
        self.threads = threads
        self.last_scores: list[np.ndarray] = []

    def activate(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.model.eval()
        self.model.emit_selection = self.selection

    def infer(self, feed):
        import torch

        from idle_export.model.vit import IdleBlock

        blocks = [m for m in self.model.layers if isinstance(m, IdleBlock)]
        for b in blocks:
            b.record_scores = self.selection
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(feed["images"])))
        for b in blocks:
            b.record_scores = False
        if not self.selection:
            return {"logits": out.numpy()}
        result = {"logits": out[0].numpy()}
        for layer, idx in zip(self.model.spec.idle_layers, out[1:]):
            result[f"{SELECTION_PREFIX}{layer}"] = idx[:, 1:].numpy() - 1
        self.last_scores = [b.last_scores.numpy() for b in blocks]
        return result


def ort_available_providers() -> list[str]:
    ort = import_onnxruntime()
    return ort.get_available_providers()


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed",
                                     "pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


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
        self.optimize = optimize  # idle_export.optimize passes, applied in memory before the session
        self.session = None
        self.idle_layers: list[int] = []

    def activate(self) -> None:
        import onnx

        ort = import_onnxruntime()
        proto = load_onnx(self.path)
        outputs = [o.name for o in proto.graph.output]
        self._topk = []
        if self.selection:
            from idle_export.model.config import ModelSpec

            meta = {p.key: p.value for p in proto.metadata_props}
            self._topk = topk_index_outputs(proto)
            try:
                self.idle_layers = list(ModelSpec.from_metadata(meta).idle_layers)
            except BadInputError:
                self.idle_layers = list(range(len(self._topk)))
            if len(self.idle_layers) != len(self._topk):
                self.idle_layers = list(range(len(self._topk)))
            for name in self._topk:
                if name not in outputs:
                    proto.graph.output.append(
                        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
        from idle_export.onnx.passes import optimize_model_proto, session_options

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


def load_onnx(path: str | Path):
    """onnx.ModelProto with external data resolved; bad files give a one-line error."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise BadInputError(f"ONNX file not found: {path}", "check the path")
    if not path.is_file():
        raise BadInputError(f"{path} is not a file", "pass the .onnx file itself")
    try:
        return onnx.load(str(path))
    except FileNotFoundError as e:
        raise BadInputError(f"{path.name} refers to external weights that are missing ({e.filename})",
                            "keep the .onnx.data file next to the .onnx file") from None
    except Exception as e:  # onnx raises DecodeError and friends
        raise BadInputError(f"{path.name} is not an ONNX model ({type(e).__name__})",
                            "pass a file written by `idle-export onnx` or torch.onnx.export") from None
