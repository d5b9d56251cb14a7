"""An IdleViT (or its dense twin) as a Runner in eager PyTorch."""

from __future__ import annotations

import numpy as np

from idle_export.onnx.io import SELECTION_PREFIX
from idle_export.runtime.base import Runner


class TorchRunner(Runner):
    """An IdleViT, LV-ViT, EViT or DynamicViT (or its dense twin) in eager PyTorch, FP32, CPU:
    any model of model.build.build_model (`.spec`, `.dense`, `.emit_selection`, `.idle_blocks`
    whose `record_scores` / `last_scores` keep the token scores for tie analysis). The
    selections come out as the TopK positions an ONNX file's TopK gives (IdleViT's emitted
    indices have a CLS column first; EViT's and DynamicViT's are the positions: a model with
    cls_in_selection False)."""

    def __init__(self, model, *, name: str = "torch", selection: bool = False, threads: int | None = None):
        self.model = model
        self.name = name
        self.selection = selection and not model.dense
        self.threads = threads
        self.last_scores: list[np.ndarray] = []
        self.score_mode = getattr(model, "score_mode", None)

    def activate(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.model.eval()
        self.model.emit_selection = self.selection

    def infer(self, feed):
        import torch

        blocks = self.model.idle_blocks
        for b in blocks:
            b.record_scores = self.selection
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(feed["images"])))
        for b in blocks:
            b.record_scores = False
        if not self.selection:
            return {"logits": out.numpy()}
        result = {"logits": out[0].numpy()}
        with_cls = getattr(self.model, "cls_in_selection", True)
        for layer, idx in zip(self.model.spec.idle_layers, out[1:]):
            result[f"{SELECTION_PREFIX}{layer}"] = idx[:, 1:].numpy() - 1 if with_cls else idx.numpy()
        self.last_scores = [b.last_scores.numpy() for b in blocks]
        return result
