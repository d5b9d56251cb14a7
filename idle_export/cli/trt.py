"""`idle-export trt` (TensorRT engines) and `idle-export lint` (will TensorRT take this ONNX?)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export import api
from idle_export.cli.app import command
from idle_export.cli.options import JsonOut, echo_err, report_console, status, write_json
from idle_export.errors import BadInputError, CheckFailedError


@command("trt", api_names={"batch": "profile", "selection": "emit_selection", "images": "calib",
                           "num": "calib_num", "precision=fp32": "fp32", "precision=fp16": "fp16",
                           "precision=int8": "int8"})
def trt_cmd(
    onnx: Annotated[Path | None, typer.Argument(
        help="ONNX file from `idle-export onnx` (or `calibrate --target trt` for "
        "--int8). Default: the one idle export in this folder.")] = None,
    fp32: Annotated[bool, typer.Option("--fp32", help="FP32 engine (TF32 off).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 engine (the default); token scores, TopK "
                                       "and indices stay FP32/INT64.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="INT8 engine. An FP32 ONNX is first calibrated "
                                       "for TensorRT (symmetric Q/DQ; --calib DIR, else the built-in "
                                       "photos) into ONNX_STEM.int8.trt.onnx.")] = False,
    profile: Annotated[str, typer.Option("--profile", metavar="MIN:OPT:MAX", help="Batch sizes the "
                                         "engine takes (MIN to MAX), tuned for OPT; a static engine is "
                                         "N:N:N.")] = "1:32:64",
    min_shapes: Annotated[str | None, typer.Option("--minShapes", "--min-shapes", metavar="NAME:BxCxHxW",
                                                   help="trtexec-style profile instead of --profile "
                                                   "(give all three).")] = None,
    opt_shapes: Annotated[str | None, typer.Option("--optShapes", "--opt-shapes", metavar="NAME:BxCxHxW",
                                                   help="trtexec-style, e.g. images:32x3x224x224.")] = None,
    max_shapes: Annotated[str | None, typer.Option("--maxShapes", "--max-shapes", metavar="NAME:BxCxHxW",
                                                   help="trtexec-style, e.g. images:64x3x224x224.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Engine file (default: "
                                                   "ONNX_STEM.PRECISION.engine); ENGINE.json is written "
                                                   "beside it.")] = None,
    target: Annotated[str | None, typer.Option("--target", metavar="SM", help="GPU architecture to "
                                                  "cross-build for with TensorRT-RTX, e.g. sm89 (default: "
                                                  "a portable engine for every RTX GPU with RTX; this "
                                                  "GPU with TensorRT).")] = None,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="Timing cache file, read "
                                                         "and updated (TensorRT 10/11; TensorRT-RTX has "
                                                         "none and ignores it).")] = None,
    workspace: Annotated[int | None, typer.Option("--workspace", metavar="MIB",
                                                     help="Workspace limit in MiB.")] = None,
    flavour: Annotated[str | None, typer.Option("--flavour", help="tensorrt or tensorrt_rtx (default: "
                                                   "tensorrt_rtx with --target, else tensorrt if "
                                                   "installed; env IDLE_EXPORT_TRT).")] = None,
    calib: Annotated[Path | None, typer.Option("--calib", metavar="DIR", help="With --int8: calibration "
                                                  "images (default: the built-in photos).")] = None,
    calib_num: Annotated[int | None, typer.Option("--calib-num", metavar="N", help="Calibration images "
                                                     "to use (default: up to 512).")] = None,
    emit_selection: Annotated[bool, typer.Option("--emit-selection", help="Also output each idle "
                                                 "layer's kept token indices (for `check`; may cost "
                                                 "speed).")] = False,
    plugin: Annotated[bool, typer.Option("--plugin", help="For an `onnx --plugin` export: build "
                                         "IdleSelect/IdleScatter as the fused-kernel TensorRT AOT "
                                         "plugins (tensorrt >= 10.12 and a GPU; TensorRT-RTX has no "
                                         "plugins). Without it TensorRT builds their function "
                                         "bodies.")] = False,
    elastic: Annotated[bool, typer.Option("--elastic", help="For an `onnx --elastic` file: keep the "
                                          "rate variable, as the int64 shape input keep_permille (rate "
                                          "in thousandths) with the --keep-range profile. Without it "
                                          "the engine is fixed at the file's default rate.")] = False,
    keep_range: Annotated[str | None, typer.Option("--keep-range", metavar="MIN:OPT:MAX", help="With "
                                                      "--elastic: the keep rates the engine takes, tuned "
                                                      "for OPT (default: the file's smallest valid rate, "
                                                      "its default rate, 1).")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show the TensorRT builder log.")] = False,
    batch: Annotated[str | None, typer.Option("--batch", hidden=True)] = None,
    json_out: JsonOut = None,
):
    """Build a TensorRT engine (TensorRT 10/11 on a GPU, or TensorRT-RTX without one)."""
    if batch is not None:
        example = batch if ":" in batch else "1:32:64"
        raise BadInputError("trt takes the batch range as --profile MIN:OPT:MAX (--batch lists the batch "
                            "sizes that check and bench run)", f"e.g. --profile {example}")
    chosen = [name for name, on in (("fp32", fp32), ("fp16", fp16), ("int8", int8)) if on]
    if len(chosen) > 1:
        raise BadInputError(f"choose one precision, not {' and '.join('--' + c for c in chosen)}",
                            "pass one of --fp32, --fp16, --int8")
    precision = chosen[0] if chosen else "fp16"
    shapes = (min_shapes, opt_shapes, max_shapes)
    if any(shapes) and not all(shapes):
        raise BadInputError("give --minShapes, --optShapes and --maxShapes together",
                            "e.g. --minShapes images:1x3x224x224 --optShapes images:32x3x224x224 "
                            "--maxShapes images:64x3x224x224")
    info = api.build_engine(onnx, output, precision=precision, batch=profile,
                            shapes=shapes if all(shapes) else None, target=target, flavour=flavour,
                            timing_cache=timing_cache, workspace=workspace, selection=emit_selection,
                            plugin=plugin, verbose=verbose, elastic=elastic, keep_range=keep_range,
                            calib=calib, calib_num=calib_num, progress=status, echo=echo_err)
    onnx = onnx or Path(info["onnx"]["path"])  # the idle export picked in this folder
    output = output or onnx.with_name(info["engine"])
    if timing_cache is not None and str(info.get("timing_cache", "")).startswith("not used"):
        echo_err(f"note: --timing-cache {timing_cache} {info['timing_cache']}")
    echo_err(f"equivalent: {info['trtexec']}")
    p = info["profiles"][0]
    dims = {k: "x".join(map(str, p[k])) for k in ("min", "opt", "max")}
    echo_err(f"wrote {output} ({info['engine_bytes'] / 1e6:.1f} MB, {precision}, {info['flavour']} "
             f"{info['trt_version']}, {info['compute_capability']}, profile {p['input']} min {dims['min']} "
             f"opt {dims['opt']} max {dims['max']}"
             + (", keep_permille {min}:{opt}:{max}".format(**info["elastic"]) if info.get("elastic") else "")
             + f", built in {info['build_seconds']:.1f} s) and {output.name}.json")
    if info["flavour"] == "tensorrt_rtx":
        echo_err("note: Triton's tensorrt_plan backend cannot load TensorRT-RTX engines; to serve with "
                 f"TensorRT on Triton: idle-export serve repo {onnx.name} --accelerator tensorrt "
                 "(the server builds its engine on its GPU)")
    if json_out:
        write_json(info, json_out)


@command("lint")
def lint_cmd(
    onnx: Annotated[Path, typer.Argument(help="ONNX file to check.")],
    expect_idle: Annotated[bool, typer.Option("--expect-idle", help="Fail unless the graph has the idle "
                                              "ops (TopK + GatherElements + ScatterElements).")] = False,
    json_out: JsonOut = None,
):
    """Static check that TensorRT (10, 11, RTX) supports every op and attribute: exit 1 on errors."""
    from rich.table import Table

    report = api.lint(onnx, expect_idle=expect_idle)
    console = report_console(json_out)
    ops = report["ops"]
    shown = ("IdleSelect", "IdleScatter") if report["form"] == "plugin" else (
        "TopK", "GatherElements", "ScatterElements")
    idle = ", ".join(f"{op} {ops.get(op, 0)}" for op in shown)
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
                  + (" (plugin form: function bodies checked)" if report["form"] == "plugin" else "")
                  + (f", {report['warnings']} warning(s)" if report["warnings"] else ""))
    if json_out:
        write_json(report, json_out)
    if not report["passed"]:
        raise CheckFailedError(f"{onnx.name}: {report['errors']} error(s) for TensorRT (table above)",
                               "fix the graph or re-export it with `idle-export onnx`")
