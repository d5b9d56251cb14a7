"""The Runner interface, in Polygraphy's shape: `with runner: out = runner.infer({"images": x})`.

Inputs and outputs are dicts of numpy arrays. An elastic model (`onnx --elastic`) also takes
"keep_rate" (a float) in the feed, for that call only; otherwise the runner's own `keep_rate`.
Every runner returns "logits" and, when asked (`selection=True`), one "selection_layer{i}" int64
[B, K] array per idle layer: the indices of the kept patch tokens (CLS excluded, 0-based over
patches), in the runtime's own order.
"""

from __future__ import annotations

import numpy as np


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
