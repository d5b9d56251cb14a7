"""`idle-export check`: parity of an ONNX file (or engine) against torch or another ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export import api
from idle_export.cli.app import command
from idle_export.cli.options import (
    Ema,
    JsonOut,
    Threads,
    int_list,
    report_console,
    status,
    write_json,
)
from idle_export.errors import CheckFailedError
from idle_export.runtime import registry


@command("check", api_names={"batch_sizes": "batch"})
def check_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX file written by `idle-export onnx` (or "
                                          "`idle-export calibrate`), its OpenVINO IR (X.xml, "
                                          "--backend openvino), or a TensorRT engine (GPU).")],
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="Compare against torch built "
                                                 "from this checkpoint.")] = None,
    against: Annotated[Path | None, typer.Option("--against", help="Compare against another "
                                                    "ONNX file (the reference).")] = None,
    ema: Ema = False,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes to test.")] = "1,7,32",
    inputs: Annotated[str | None, typer.Option("--inputs", help="Input sets: noise (seeded), photos "
                                                  "(skimage.data photos, timm eval transform). Default: "
                                                  "noise,photos; none with --images.")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Real images (folder, .txt list "
                                                   "or file; timm eval transform), all run at each "
                                                   "batch size. DIR/<class>/x.png with the model's "
                                                   "class names also reports accuracy.")] = None,
    num: Annotated[int, typer.Option("--num", help="How many of --images (0: all).")] = 0,
    max_abs: Annotated[float | None, typer.Option("--max-abs", help="Logit tolerance (default "
                                                     "from the model's precision: fp32 1e-4, fp16 "
                                                     "5e-2, int8 none; int8 needs top-1 ≥ 99%; --precision "
                                                     "bf16 0.1).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the noise inputs (and of which "
                                      "--images are drawn with --num).")] = 0,
    threads: Threads = None,
    backend: Annotated[str, typer.Option("--backend", metavar="|".join(registry.names(registry.ONNX)),
                                         help="What runs the ONNX file being checked: "
                                         + registry.described(registry.ONNX) + ". The reference runs "
                                         "on torch (--ckpt) or ONNX Runtime CPU (--against).")] = "ort",
    precision: Annotated[str, typer.Option("--precision", metavar="f32|bf16|default", help="The "
                                           "inference precision of a runtime that offers one (OpenVINO): "
                                           "f32, bf16 (held to the bf16 tolerance, ties counted in token "
                                           "selection) or default (the runtime's own for this CPU: "
                                           "OpenVINO's bf16 where it has AVX-512 BF16 or AMX).")] = "f32",
    save_outputs: Annotated[Path | None, typer.Option("--save-outputs", help="Also write both runs' "
                                                         "outputs (Polygraphy RunResults JSON) to compare "
                                                         "later, elsewhere, with --load-outputs.")] = None,
    load_outputs: Annotated[Path | None, typer.Option("--load-outputs", help="Compare against a run saved "
                                                         "with --save-outputs (its checked model), e.g. an "
                                                         "engine on a GPU machine against the ONNX run on "
                                                         "the build machine; same --inputs/--batch/--seed.")
                            ] = None,
    keep_rate: Annotated[float | None, typer.Option("--keep-rate", help="Run an elastic file "
                                                     "(`onnx --elastic`) at this keep rate, against "
                                                     "torch (or --against) at the same rate. Default: "
                                                     "the file's rate.")] = None,
    json_out: JsonOut = None,
):
    """Parity of an ONNX file against torch or another ONNX: exit 1 when outside tolerance."""
    sets = None if inputs is None else [x for x in inputs.replace(" ", "").split(",") if x]
    against_what = against or load_outputs or ckpt
    with status(f"checking {model.name}" + (f" against {against_what.name}" if against_what else "")):
        report = api.check(model, ckpt=ckpt, against=against, ema=ema,
                           batch_sizes=int_list(batch, "--batch") or [], inputs=sets, images=images, num=num,
                           max_abs=max_abs, seed=seed, threads=threads, backend=backend, keep_rate=keep_rate,
                           save_outputs=save_outputs, load_outputs=load_outputs, precision=precision)
    console = report_console(json_out)
    print_check(report, console)
    print_check_details(report, console)
    if json_out:
        write_json(report, json_out)
    if not report["passed"]:
        failed = sum(not c["passed"] for c in report["cases"])
        raise CheckFailedError(f"{model.name}: {failed} of {len(report['cases'])} case(s) outside the "
                               "tolerance (table above)",
                               "see the failing column; --max-abs sets the logit tolerance")


def print_check_details(report: dict, console) -> None:
    """Token-selection agreement per idle layer, and accuracy where labels are known."""
    from rich.table import Table

    cases = [c for c in report["cases"] if c.get("selection_per_layer")]
    if cases:
        layers = list(cases[0]["selection_per_layer"])
        table = Table(title="token-selection agreement per idle layer (same kept set, ties counted)")
        table.add_column("inputs")
        table.add_column("batch", justify="right")
        for layer in layers:
            table.add_column(f"L{layer}", justify="right")
        for c in cases:
            table.add_row(c["inputs"], str(c["batch"]),
                          *[f"{c['selection_per_layer'].get(k, float('nan')):.1%}" for k in layers])
            if c.get("selection_raw_per_layer", c["selection_per_layer"]) != c["selection_per_layer"]:
                table.add_row("  identical sets (raw)", "",
                              *[f"{c['selection_raw_per_layer'].get(k, float('nan')):.1%}" for k in layers])
            if "selection_overlap_per_layer" in c:
                table.add_row("  kept-token overlap", "",
                              *[f"{c['selection_overlap_per_layer'].get(k, float('nan')):.1%}"
                                for k in layers])
        console.print(table)
    for c in report["cases"]:
        acc = c.get("accuracy")
        if acc:
            console.print(f"accuracy on {c.get('images', '?')} labelled {c['inputs']} (batch {c['batch']}): "
                          f"candidate {acc['candidate']:.2%}, reference {acc['reference']:.2%}, "
                          f"drop {acc['drop'] * 100:+.2f} points")


def print_check(report: dict, console) -> None:
    from rich.table import Table

    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    table = Table(title=f"{report['a']}  vs  {report['b']}  ({report.get('model', '')})")
    for col in ("inputs", "batch", "max abs", "max rel", "cos min", "top-1", "top-5", "selection",
                "raw", "ties", "verdict"):
        table.add_column(col, justify="right" if col not in ("inputs", "verdict") else "left")
    for c in report["cases"]:
        sel = f"{c['selection']:.2%}" if "selection" in c else "-"
        raw = f"{c['selection_raw']:.2%}" if "selection_raw" in c else "-"
        table.add_row(c["inputs"], str(c["batch"]), f"{c['max_abs']:.2e}", f"{c['max_rel']:.2e}",
                      f"{c['cosine_min']:.7f}", f"{c['top1']:.0%}", f"{c['top5']:.0%}", sel, raw,
                      str(c.get("selection_ties", "-")),
                      "[green]ok[/]" if c["passed"] else "[red]" + "; ".join(c["failures"]) + "[/]")
    console.print(table)
    console.print("[green]PASSED[/]" if report["passed"] else "[red]FAILED[/]")
