"""The Runner interface, in Polygraphy's shape: `with runner: out = runner.infer({"images": x})`.

Inputs and outputs are dicts of numpy arrays. An elastic model (`onnx --elastic`) also takes
"keep_rate" (a float) in the feed, for that call only; otherwise the runner's own `keep_rate`.
Every runner returns "logits" and, when asked (`selection=True`), one "selection_layer{i}" int64
[B, K] array per idle layer: the indices of the kept patch tokens (CLS excluded, 0-based over
patches), in the runtime's own order.
"""

from __future__ import annotations

import numpy as np

from idle_export.onnx.io import load_onnx
from idle_export.onnx.metadata import OnnxMetadata


class Runner:
    """`with runner:` activates it (loads the model, makes the session) and deactivates it on
    leaving. Nested `with`s of one runner share one activation: the outermost makes the session,
    inner ones reuse it (a command that runs a model in several steps loads it once)."""

    name = "runner"
    _depth = 0
    # compile for the batch size of each call (one compiled model per size) where the runtime
    # runs static shapes faster than a dynamic batch: OpenVINO's CPU plugin (~13 % for an idle
    # DeiT-S at bf16/INT8, ~3-7 % dense). bench sets it; check and serving keep one dynamic model.
    static_batch = False

    def __enter__(self):
        if self._depth == 0:
            self.activate()
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            self.deactivate()

    def given(self, proto=None, meta=None) -> None:
        """Hand the runner what its caller has read from the file at its path already: the ONNX
        model (the runner may edit it) and/or its OnnxMetadata, so that activating it does not
        read the file again for them."""
        self._given, self._given_meta = proto, meta

    def onnx_model(self, path):
        """The ONNX model of `path`: the one given (once), else read from the file."""
        proto, self._given = getattr(self, "_given", None), None
        return proto if proto is not None else load_onnx(path)

    def onnx_metadata(self, path):
        """The OnnxMetadata of `path`: given, or of the model given, else read from the file."""
        meta, proto = getattr(self, "_given_meta", None), getattr(self, "_given", None)
        if meta is None:
            meta = OnnxMetadata.of(proto) if proto is not None else OnnxMetadata.read(path)
        return meta

    def activate(self) -> None:  # pragma: no cover - interface
        pass

    def deactivate(self) -> None:  # pragma: no cover - interface
        pass

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError
