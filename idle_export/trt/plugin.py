"""Engines from plugin-form ONNX files (`idle-export onnx --plugin`).

`idle-export trt PLUGIN.onnx --plugin`: the IdleSelect/IdleScatter nodes become the fused
Triton kernels of idle_export.plugins, registered as TensorRT AOT plugins (TensorRT ≥ 10.12,
`tensorrt.plugin.aot_impl`), so the engine embeds the kernels and runs in trtexec or Triton's
TensorRT backend without Python. The parser reads a copy without the model-local functions
(it would import their bodies instead of the plugins), written beside the engine.
TensorRT-RTX has no plugin layers: there `--plugin` is refused with what is missing.

`idle-export trt PLUGIN.onnx` (no --plugin): TensorRT builds the function bodies, the standard
ops; the graph is inlined first so the FP16 pass and the FP32 pinning see the score path.

Thin on purpose: the TensorRT calls run only on a GPU machine (scripts/gpu_acceptance.sh); the
checks, the graphs written for the parser and the errors are tested here.
"""

from __future__ import annotations

import os
from pathlib import Path

from idle_export.errors import BadInputError, MissingDependencyError
from idle_export.fileio import atomic_write_bytes
from idle_export.hardware import gpu_info
from idle_export.lazy import lazy_module
from idle_export.onnx.fp16 import convert_fp16
from idle_export.onnx.io import SELECTION_PREFIX
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.plugin_form import (
    add_selection_outputs,
    for_tensorrt_plugin,
    inline,
    is_plugin_form,
    plugin_nodes,
)
from idle_export.plugins.spec import OP_SCATTER, OP_SELECT

tp = lazy_module("idle_export.plugins.tensorrt_plugin")  # registers with tensorrt (GPU machines)

PLUGIN_HINT = ("on a machine with an NVIDIA GPU: pip install 'tensorrt>=10.12'; or build without "
               "plugin=True (TensorRT then runs the IdleSelect/IdleScatter function bodies)")


def _stem(output: Path) -> str:
    return output.name[:-7] if output.name.endswith(".engine") else output.name


def check_plugin_build(onnx: Path, model, precision: str, target: str | None,
                       flavour: str | None) -> str:
    """Refuse, before any TensorRT work, a --plugin build that cannot happen here, naming what
    is missing; returns the flavour to build with ("tensorrt")."""
    if not plugin_nodes(model):
        raise BadInputError(f"{onnx.name} has no IdleSelect nodes: plugin=True builds the plugin form",
                            "export it with `idle-export onnx CKPT --plugin`, or drop plugin=True")
    if precision == "int8":
        raise BadInputError("plugin=True builds FP32 or FP16 engines (the plugin form has no Q/DQ "
                            "INT8 path)",
                            "drop precision=int8, or build the standard export with precision=int8")
    if (flavour or os.environ.get("IDLE_EXPORT_TRT")) == "tensorrt_rtx" or target is not None:
        raise BadInputError("plugin=True needs TensorRT (tensorrt >= 10.12), which builds for the GPU "
                            "in this machine: TensorRT-RTX has no plugin layers, so no target= "
                            "cross-build", "drop target= / flavour=tensorrt_rtx, or drop plugin=True")
    try:
        tp.import_tensorrt()
    except tp.TensorRTPluginUnavailable as exc:
        text = str(exc) if "TensorRT-RTX" in str(exc) else f"{exc}; TensorRT-RTX has no plugin layers"
        raise MissingDependencyError(f"plugin=True: {text}", PLUGIN_HINT) from None
    if gpu_info() is None:
        raise MissingDependencyError("plugin=True builds with TensorRT for the GPU in this machine and "
                                     "there is none (TensorRT-RTX, which builds without one, has no "
                                     "plugin layers)", "build on a machine with an NVIDIA GPU, or "
                                     "drop plugin=True")
    return "tensorrt"


def plugin_graph_to_parse(trt, model, facts: dict, output: Path, precision: str, selection: bool,
                          echo) -> tuple[Path, dict | None, bool, dict]:
    """Register the AOT plugins and write the graph the parser reads (NAME.trtplugin.onnx beside
    the engine: FP16 for a strongly typed FP16 build, no functions, plugin attributes, and with
    `selection` each IdleSelect's kept patches as selection_layer{L}). Returns it, the FP16 pass
    report, whether the network is strongly typed, and the sidecar's plugin entry."""
    if trt.flavour != "tensorrt":
        raise BadInputError(f"{trt.label} has no plugin layers", PLUGIN_HINT)
    ids = tp.register()
    strongly_typed = trt.strongly_typed or (precision == "fp16" and facts["fp16"])
    report = None
    if precision == "fp16" and strongly_typed and not facts["fp16"]:
        # the kernels take FP16 xn, x and w and accumulate the scores in FP32, as the standard
        # FP16 graph does (its score MatMul casts the FP16 LayerNorm output and w up)
        model, report = convert_fp16(model)
        OnnxMetadata.of(model).updated(precision="fp16", fp32_nodes=report["fp32_nodes"]).write(model)
    proto = for_tensorrt_plugin(model)
    names = []
    if selection:
        layers = facts["metadata"].idle_layers or []
        selects = plugin_nodes(proto)
        layers = layers if len(layers) == len(selects) else list(range(len(selects)))
        names = [f"{SELECTION_PREFIX}{layer}" for layer in layers]
        if set(names) & {o.name for o in proto.graph.output}:
            raise BadInputError("this export already outputs its selections (`idle-export onnx "
                                "--emit-selection`)",
                                "build it without selection=True")
        add_selection_outputs(proto, names)
    parsed = output.with_name(f"{_stem(output)}.trtplugin.onnx")
    echo(f"plugin build: writing {parsed.name} (IdleSelect/IdleScatter as the AOT plugins "
         f"{', '.join(ids)}; no function bodies)")
    atomic_write_bytes(parsed, proto.SerializeToString())
    info = {"ops": {op: len(plugin_nodes(proto, op)) for op in (OP_SELECT, OP_SCATTER)},
            "ids": list(ids), "aot": True, "selection_outputs": names,
            "note": "kernels embedded in the engine (trtexec and Triton run it without Python); "
                    "building needs Python: idle_export.plugins.tensorrt_plugin.register()"}
    return parsed, report, strongly_typed, info


def prepare(onnx: Path, model, plugin: bool, precision: str, target: str | None,
            flavour: str | None):
    """Before the graph checks: (model, flavour, inlined). --plugin is checked (the flavour
    becomes "tensorrt"); without it a plugin-form graph is inlined (TensorRT takes the bodies)."""
    if plugin:
        flavour = check_plugin_build(onnx, model, precision, target, flavour)
    model, inlined = standard_view(model, plugin)
    return model, flavour, inlined


def graph_to_parse(standard, trt, model, facts: dict, onnx: Path, output: Path, precision: str,
                   selection: bool, plugin: bool, inlined: bool, echo):
    """(parsed file, FP16 report, strongly typed, sidecar plugin entry): the --plugin graph, or
    `standard(trt, model, facts, onnx, output, precision, echo)` (build._graph_to_parse) with a
    plugin-form file's inlined graph written when that parses the source file itself."""
    if plugin:
        return plugin_graph_to_parse(trt, model, facts, output, precision, selection, echo)
    parsed, report, strongly_typed = standard(trt, model, facts, onnx, output, precision, echo)
    parsed, entry = standard_view_path(parsed, onnx, model, inlined, output, echo)
    return parsed, report, strongly_typed, entry


def standard_view(model, plugin: bool):
    """(model, inlined): a plugin-form graph built without --plugin comes back with its functions
    inlined (TensorRT takes their bodies: the standard ops); any other graph as it is."""
    if plugin or not is_plugin_form(model):
        return model, False
    return inline(model), True


def standard_view_path(parsed: Path, onnx: Path, model, inlined: bool, output: Path,
                       echo) -> tuple[Path, None]:
    """The file to parse for a build without --plugin (no plugin entry in the sidecar): when the
    graph was inlined and no pass wrote another file, the inlined graph as NAME.inlined.onnx
    beside the engine, so TensorRT's layer names match the ONNX nodes (FP32 pinning)."""
    if not inlined or parsed != onnx:
        return parsed, None
    parsed = output.with_name(f"{_stem(output)}.inlined.onnx")
    echo(f"plugin form without --plugin: writing {parsed.name} (function bodies inlined)")
    atomic_write_bytes(parsed, model.SerializeToString())
    return parsed, None
