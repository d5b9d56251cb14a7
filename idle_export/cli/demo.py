"""`idle-export demo`: the whole pipeline on a seeded model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export import api
from idle_export.cli.app import command
from idle_export.cli.options import JsonOut, int_list, report_console, status, write_json
from idle_export.errors import CheckFailedError
from idle_export.model.families import ARCH_NAMES


@command("demo", api_names={"folder": "output", "batch_sizes": "batch"})
def demo_cmd(
    output: Annotated[Path, typer.Option("-o", "--output",
                                         help="Folder for the demo files.")] = Path("demo_out"),
    arch: Annotated[str, typer.Option("--arch", help="Architecture of the demo model: "
                                      f"{'|'.join(ARCH_NAMES)}.")] = "deit_small",
    keep: Annotated[float, typer.Option("--keep", help="Keep rate of the demo model.")] = 0.7,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes to check.")] = "1,7,32",
    json_out: JsonOut = None,
):
    """Seeded checkpoint (IdleViT, EViT or DynamicViT, its authors' training format) → idle (or
    pruned) and dense ONNX → checks."""

    report = api.demo(output, arch=arch, keep=keep, batch_sizes=int_list(batch, "--batch") or [],
                      progress=status)
    print_demo(report, report_console(json_out))
    if json_out:
        write_json(report, json_out)
    if not report["passed"]:
        raise CheckFailedError("the demo's parity checks failed (table above)",
                               "rerun with --debug and report it: the demo model should always pass")


def print_demo(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"idle-export demo: {report['model']}")
    for col in ("file", "TopK", "GMACs", "max abs", "top-1", "selection", "check"):
        table.add_column(col)
    for row in report["rows"]:
        sel = "-" if row["selection"] is None else f"{row['selection']:.0%}"
        table.add_row(Path(row["file"]).name, str(row["topk"]), f"{row['gmacs']:.2f}",
                      f"{row['max_abs']:.1e}", f"{row['top1']:.0%}", sel,
                      "[green]ok[/]" if row["passed"] else "[red]FAILED[/]")
    console.print(table)
    console.print(f"K per idle layer: {report['keep_k']}; {report['scores']} scores; FLOP ideal "
                  f"speed-up {report['ideal']:.2f}x; files in {report['folder']}")
