"""Run a plugin-form graph the way TensorRT with the plugins would: the IdleSelect/IdleScatter
nodes computed by the plugins' own implementations, every other node by ONNX's reference
evaluator (a third runtime, independent of ONNX Runtime).

    impl="reference"  idle_export.plugins.reference (numpy)
    impl="kernels"    the Triton kernels of idle_export.plugins.kernels on CPU torch tensors;
                      needs TRITON_INTERPRET=1 before triton is imported, so it runs as
                      ``python -m tests.onnx.plugin_graph MODEL IMAGES.npy OUT.npz kernels``

The graph given is the copy `idle-export trt --plugin` parses (no function bodies): nodes the
evaluator cannot run would fail loudly, so a pass here shows that the plugin nodes' inputs,
outputs and attributes match what the kernels compute.
"""

from __future__ import annotations

import sys

import numpy as np


def plugin_ops(impl: str = "reference") -> list:
    """OpRun classes for IdleSelect and IdleScatter (domain idle_export)."""
    from idle_export.plugins import reference as ref
    from onnx.reference.op_run import OpRun

    if impl == "kernels":
        import torch
        from idle_export.plugins import kernels

        def select(xn, x, w, k):
            t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (xn, x, w)]
            return tuple(o.numpy() for o in kernels.idle_select(*t, k))

        def scatter(x, idx, res):
            t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x, idx, res)]
            return kernels.idle_scatter(*t).numpy()
    else:
        select, scatter = ref.idle_select_reference, ref.scatter_reference

    class IdleSelect(OpRun):
        op_domain = "idle_export"

        def _run(self, xn, x, w, k=None, layer=None, plugin_namespace=None, aot=None):
            return tuple(select(xn, x, w, int(k)))

    class IdleScatter(OpRun):
        op_domain = "idle_export"

        def _run(self, x, idx, res, layer=None, plugin_namespace=None, aot=None):
            return (scatter(x, idx, res),)

    return [IdleSelect, IdleScatter]


def evaluate(model, images: np.ndarray, impl: str = "reference") -> dict[str, np.ndarray]:
    """All graph outputs by name for `images`."""
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(model, new_ops=plugin_ops(impl))
    values = ev.run(None, {"images": images})
    return dict(zip([o.name for o in model.graph.output], values, strict=True))


if __name__ == "__main__":
    import onnx

    model_path, images_path, out_path, impl = sys.argv[1:5]
    result = evaluate(onnx.load(model_path), np.load(images_path), impl)
    np.savez(out_path, **result)
