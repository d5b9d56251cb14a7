"""`idle-export onnx`: checkpoint → idle (or dense) ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export import api
from idle_export.cli.app import command
from idle_export.cli.options import (
    Arch,
    Ema,
    FamilyOpt,
    IdleLayers,
    JsonOut,
    Keep,
    KeepK,
    Schedule,
    echo_err,
    int_list,
    status,
    write_json,
)
from idle_export.model.families import family_of
from idle_export.onnx.io import onnx_summary
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.targets import TARGET_PASSES
from idle_export.runtime import registry


@command("onnx", api_names={"ir": "openvino_ir"})
def onnx_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="IdleViT, EViT or DynamicViT checkpoint (.pth or "
                                               ".safetensors).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="ONNX file to write "
                                                   "(default: CHECKPOINT_idle.onnx / _dense.onnx / "
                                                   "_idle_plugin.onnx / _idle_elastic.onnx).")] = None,
    arch: Arch = None,
    family: FamilyOpt = None,
    keep: Keep = None,
    schedule: Schedule = "eval",
    idle_layers: IdleLayers = None,
    keep_k: KeepK = None,
    ema: Ema = False,
    dense: Annotated[bool, typer.Option("--dense", help="Export the dense baseline (every token "
                                        "in every layer) from the same weights.")] = False,
    emit_selection: Annotated[bool, typer.Option("--emit-selection", help="Add the kept token "
                                                 "indices of each idle (or drop) layer as outputs.")] = False,
    scores: Annotated[str | None, typer.Option("--scores", help="How idle layers rank tokens. folded "
                                               "(IdleViT's default): the paper's q_cls·k ranking "
                                               "computed as xn·(Wkᵀq_cls), the same top-K without keys "
                                               "for idle tokens (fewer FLOPs); official: keys for every "
                                               "token, as in the paper's code (EViT and DynamicViT: "
                                               "their own scores, official only).")] = None,
    plugin: Annotated[bool, typer.Option("--plugin", help="Plugin form: each idle layer's "
                                         "selection as one idle_export.IdleSelect node and its "
                                         "scatter as one IdleScatter node, both also model-local "
                                         "functions of standard ops (ONNX Runtime and TensorRT "
                                         "run those; `trt --plugin` uses the fused kernels). Folded "
                                         "scores only.")] = False,
    target: Annotated[str, typer.Option("--target", help="Where the file runs; its graph passes are "
                                        "written into it. portable (default): the plain export, "
                                        "read by every runtime and by trt/calibrate; ort: + BiasGelu "
                                        "(com.microsoft, ONNX Runtime only), row gathers, folded "
                                        "weight slices; openvino: row gathers, folded weight "
                                        "slices (standard ops); tensorrt: the plain export."
                                        )] = "portable",
    ir: Annotated[bool, typer.Option("--ir/--no-ir", help="With --target openvino: also write the "
                                     "OpenVINO IR OUTPUT.xml + OUTPUT.bin beside the file, its token-score "
                                     "path marked to stay f32 when OpenVINO computes in bf16 (its CPU "
                                     "default on AVX-512 BF16 / AMX CPUs); ONNX cannot carry that "
                                     "marking. Compile the .xml to get it (docs/export.md#bf16-on-openvino)."
                                     )] = True,
    elastic: Annotated[bool, typer.Option("--elastic", help="One file for every keep rate: an "
                                          "optional float input keep_rate (default the --keep rate) "
                                          "from which the graph computes each idle layer's K by the "
                                          "schedule, clamped to [1, N] (docs/export.md#elastic-keep-rate)."
                                          )] = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (≥17).")] = 18,
    external_data: Annotated[bool, typer.Option("--external-data", help="Write weights to "
                                                "OUTPUT.data instead of embedding them.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Export weights with "
                                                  "NaN or inf values (refused otherwise).")] = False,
    json_out: JsonOut = None,
):
    """Export a checkpoint to ONNX with the idle path (TopK + GatherElements + ScatterElements),
    or EViT's / DynamicViT's token dropping (TopK + GatherElements)."""

    output = output or api.default_onnx_path(checkpoint, dense=dense, plugin=plugin, elastic=elastic,
                                             target=target)
    output = api.export_onnx(checkpoint, output, dense=dense, arch=arch, family=family, keep=keep,
                             schedule=schedule, idle_layers=int_list(idle_layers, "--idle-layers"),
                             keep_k=int_list(keep_k, "--keep-k"), ema=ema, scores=scores,
                             emit_selection=emit_selection, plugin=plugin, opset=opset,
                             external_data=external_data, target=target, elastic=elastic,
                             openvino_ir=False, allow_nonfinite=allow_nonfinite, progress=status)
    summary = onnx_summary(output)
    meta = OnnxMetadata(summary["metadata"])
    spec = meta.spec
    what = (f"dense baseline of {spec.arch}" if dense else
            f"{family_of(spec.arch).title} {spec.describe()}; {meta.score_mode} scores, "
            f"{summary['ops'].get('TopK', 0)} TopK")
    if plugin:
        what = (f"{spec.describe()}; plugin form, {summary['ops'].get('IdleSelect', 0)} IdleSelect "
                f"+ {summary['ops'].get('IdleScatter', 0)} IdleScatter")
    if elastic:
        what += "; elastic: keep_rate input (any rate, K computed in the graph)"
    passes = TARGET_PASSES[target]
    what += f"; target {target}" + (f" ({', '.join(passes)})" if passes else "")
    echo_err(f"wrote {output} ({what}; opset {summary['opset']}"
             f"{'; weights in ' + output.name + '.data' if external_data else ''})")
    written = write_openvino_ir(output, target=target, wanted=ir)
    faster = None if dense else registry.faster_target_here(target)
    if faster:
        echo_err(f"note: {faster}")
    if json_out:
        write_json({"spec": spec.describe(), "dense": dense, "elastic": elastic, "target": target,
                    "passes": list(passes), **summary,
                    "openvino_ir": [str(p) for p in written] if written else None}, json_out)


def write_openvino_ir(output: Path, *, target: str, wanted: bool):
    """The marked IR beside an openvino-target file (api.write_openvino_ir), with its one line;
    None where none is written."""
    if target != "openvino" or not wanted:
        return None
    ir = api.write_openvino_ir(output, progress=status)
    if "skipped" in ir:
        echo_err(f"note: no OpenVINO IR written ({ir['skipped']}); OpenVINO runs the .onnx as it is")
        return None
    xml, binary = ir["xml"], ir["bin"]
    echo_err(f"wrote {xml} + {binary.name} (OpenVINO IR: ONNX cannot carry OpenVINO's precision "
             f"marking; its {ir['marked']} token-score ops stay f32 where OpenVINO computes in bf16: "
             f"compile {xml.name}, not {output.name})")
    return xml, binary
