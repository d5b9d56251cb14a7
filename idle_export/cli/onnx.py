"""`idle-export onnx`: checkpoint → idle (or dense) ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export.cli.app import command
from idle_export.cli.options import (
    Arch,
    Ema,
    IdleLayers,
    JsonOut,
    Keep,
    KeepK,
    Schedule,
    echo_err,
    spec_from_options,
    status,
    write_json,
)
from idle_export.errors import BadInputError
from idle_export.fileio import check_output_path
from idle_export.model.checkpoint import load_checkpoint
from idle_export.model.config import SCORE_MODES
from idle_export.onnx.export import export_checkpoint
from idle_export.onnx.io import onnx_summary


@command("onnx")
def onnx_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="IdleViT checkpoint (.pth or .safetensors).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="ONNX file to write "
                                                   "(default: CHECKPOINT_idle.onnx / _dense.onnx).")] = None,
    arch: Arch = None,
    keep: Keep = None,
    schedule: Schedule = "eval",
    idle_layers: IdleLayers = None,
    keep_k: KeepK = None,
    ema: Ema = False,
    dense: Annotated[bool, typer.Option("--dense", help="Export the dense baseline (every token "
                                        "in every layer) from the same weights.")] = False,
    emit_selection: Annotated[bool, typer.Option("--emit-selection", help="Add the kept token "
                                                 "indices of each idle layer as outputs.")] = False,
    scores: Annotated[str, typer.Option("--scores", help="folded (default): rank by xn·(Wkᵀq), "
                                        "keys only for kept tokens, the same top-K; official: keys "
                                        "for every token, as in the paper's code.")] = "folded",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (≥17).")] = 18,
    external_data: Annotated[bool, typer.Option("--external-data", help="Write weights to "
                                                "OUTPUT.data instead of embedding them.")] = False,
    json_out: JsonOut = None,
):
    """Export a checkpoint to ONNX with the idle path (TopK + GatherElements + ScatterElements)."""

    if scores not in SCORE_MODES:
        raise BadInputError(f"--scores {scores!r} is not one of {', '.join(SCORE_MODES)}",
                            "use --scores official or --scores folded")
    if output is None:
        output = checkpoint.with_name(f"{checkpoint.stem}_{'dense' if dense else 'idle'}.onnx")
    check_output_path(output)
    with status(f"loading {checkpoint.name}"):
        ckpt = load_checkpoint(checkpoint, ema=ema)
        spec = spec_from_options(ckpt, arch, keep, schedule, idle_layers, keep_k)
    with status(f"exporting {spec.describe()}{' dense' if dense else ''} to {output}"):
        export_checkpoint(ckpt, spec, output, dense=dense, emit_selection=emit_selection,
                          score_mode=scores, opset=opset, external_data=external_data)
    summary = onnx_summary(output)
    what = (f"dense baseline of {spec.arch}" if dense else
            f"{spec.describe()}; {scores} scores, {summary['ops'].get('TopK', 0)} TopK")
    echo_err(f"wrote {output} ({what}; opset {summary['opset']}"
             f"{'; weights in ' + output.name + '.data' if external_data else ''})")
    if json_out:
        write_json({"spec": spec.describe(), "dense": dense, **summary}, json_out)
