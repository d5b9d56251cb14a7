"""`idle-export trt` (TensorRT engines) and `idle-export lint` (will TensorRT take this ONNX?)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export.cli.app import command
from idle_export.cli.options import JsonOut, echo_err, report_console, status, write_json
from idle_export.errors import BadInputError, CheckFailedError
from idle_export.onnx.lint import lint_file
from idle_export.quantize.qdq import quantize_onnx
from idle_export.trt.build import build_engine, default_engine_path, parse_batch


@command("trt")
def trt_cmd(
    onnx: Annotated[Path, typer.Argument(help="ONNX file from `idle-export onnx` (or a Q/DQ one for "
                                         "--int8).")],
    fp32: Annotated[bool, typer.Option("--fp32", help="FP32 engine (TF32 off).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 engine; token scores, TopK and indices stay "
                                       "FP32/INT64 (the default precision).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="INT8 engine from a Q/DQ ONNX (or --calib "
                                       "DIR).")] = False,
    batch: Annotated[str, typer.Option("--batch", help="Optimisation profile MIN:OPT:MAX.")] = "1:32:64",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Engine file (default: "
                                                   "ONNX_STEM.PRECISION.engine); ENGINE.json is written "
                                                   "beside it.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Compute capability to cross-build for "
                                                  "with TensorRT-RTX, e.g. sm89 (default: portable "
                                                  "for RTX, this GPU for TensorRT).")] = None,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="Timing cache file, "
                                                         "read and updated (TensorRT 10/11).")] = None,
    workspace: Annotated[int | None, typer.Option("--workspace", help="Workspace limit in MiB.")] = None,
    flavour: Annotated[str | None, typer.Option("--flavour", help="tensorrt or tensorrt_rtx "
                                                   "(default: tensorrt if installed, else "
                                                   "tensorrt_rtx; env IDLE_EXPORT_TRT).")] = None,
    calib: Annotated[Path | None, typer.Option("--calib", help="With --int8: folder of calibration "
                                                  "images; quantizes the ONNX first (minmax).")] = None,
    calib_num: Annotated[int, typer.Option("--calib-num", help="Calibration images to use.")] = 256,
    emit_selection: Annotated[bool, typer.Option("--emit-selection", help="Also output each idle "
                                                 "layer's kept token indices (for `check`; may cost "
                                                 "speed).")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show the TensorRT builder log.")] = False,
    json_out: JsonOut = None,
):
    """Build a TensorRT engine (TensorRT 10/11 on a GPU, or TensorRT-RTX without one)."""

    chosen = [name for name, on in (("fp32", fp32), ("fp16", fp16), ("int8", int8)) if on]
    if len(chosen) > 1:
        raise BadInputError(f"choose one precision, not {' and '.join('--' + c for c in chosen)}",
                            "pass one of --fp32, --fp16, --int8")
    precision = chosen[0] if chosen else "fp16"
    profile = parse_batch(batch)
    if calib is not None and precision != "int8":
        raise BadInputError("--calib is for INT8 builds", "add --int8, or drop --calib")
    if calib_num < 1:
        raise BadInputError(f"--calib-num {calib_num} must be at least 1", "e.g. --calib-num 256")
    output = output or default_engine_path(onnx, precision)
    source = onnx
    if calib is not None:
        source = _quantize(onnx, output, calib, calib_num)
    with status(f"building {output.name} ({precision})"):
        info = build_engine(source, precision=precision, batch=profile, target=target,
                            timing_cache=timing_cache, workspace=workspace, verbose=verbose,
                            output=output, flavour=flavour, selection=emit_selection, echo=echo_err)
    echo_err(f"equivalent: {info['trtexec']}")
    echo_err(f"wrote {output} ({info['engine_bytes'] / 1e6:.1f} MB, {precision}, {info['flavour']} "
             f"{info['trt_version']}, {info['compute_capability']}, batch {batch}, built in "
             f"{info['build_seconds']:.1f} s) and {output.name}.json")
    if json_out:
        write_json(info, json_out)


def _quantize(onnx: Path, output: Path, calib: Path, num: int) -> Path:
    """--int8 --calib DIR: Q/DQ ONNX for TensorRT via idle_export.quantize."""
    if not calib.is_dir():
        raise BadInputError(f"--calib {calib} is not a folder", "pass a folder of calibration images")

    stem = output.name[:-7] if output.name.endswith(".engine") else output.name
    dst = output.with_name(f"{stem}.qdq.onnx")
    with status(f"calibrating {onnx.name} on {calib} ({num} images)"):
        quantize_onnx(onnx, dst, images=calib, num=num, method="minmax", target="trt")
    echo_err(f"wrote {dst} (Q/DQ for TensorRT)")
    return dst


@command("lint")
def lint_cmd(
    onnx: Annotated[Path, typer.Argument(help="ONNX file to check.")],
    expect_idle: Annotated[bool, typer.Option("--expect-idle", help="Fail unless the graph has the idle "
                                              "ops (TopK + GatherElements + ScatterElements).")] = False,
    json_out: JsonOut = None,
):
    """Static check that TensorRT (10, 11, RTX) supports every op and attribute: exit 1 on errors."""
    from rich.table import Table

    report = lint_file(onnx, expect_idle=expect_idle)
    console = report_console(json_out)
    ops = report["ops"]
    idle = ", ".join(f"{op} {ops.get(op, 0)}" for op in ("TopK", "GatherElements", "ScatterElements"))
    console.print(f"{onnx.name}: opset {report['opset']}, {sum(ops.values())} nodes, "
                  f"{len(ops)} op types; {idle}")
    if report["findings"]:
        table = Table(show_header=True)
        for col in ("severity", "rule", "node", "finding"):
            table.add_column(col)
        for f in report["findings"]:
            color = "red" if f["severity"] == "error" else "yellow"
            table.add_row(f"[{color}]{f['severity']}[/]", f["rule"], f["node"] or "-", f["message"])
        console.print(table)
    verdict = "[green]OK[/]" if report["passed"] else f"[red]{report['errors']} error(s)[/]"
    console.print(f"{verdict} for TensorRT 10/11 and TensorRT-RTX"
                  + (f", {report['warnings']} warning(s)" if report["warnings"] else ""))
    if json_out:
        write_json(report, json_out)
    if not report["passed"]:
        raise CheckFailedError(f"{onnx.name}: {report['errors']} error(s) for TensorRT (table above)",
                               "fix the graph or re-export it with `idle-export onnx`")
