"""`idle-export sweep`: keep ratios against agreement with dense, accuracy, GMACs and images/s;
optionally pick one for a latency budget or an agreement floor and write its ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export import api
from idle_export.cli.app import command
from idle_export.cli.options import (
    QUIET,
    Arch,
    Ema,
    IdleLayers,
    JsonOut,
    Schedule,
    Threads,
    echo_err,
    int_list,
    report_console,
    status,
    write_json,
)
from idle_export.errors import CheckFailedError
from idle_export.explore.choose import DEFAULT_RATIOS
from idle_export.explore.pareto import print_sweep
from idle_export.runtime import registry


@command("sweep", api_names={"batches": "batch"})
def sweep_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="IdleViT checkpoint (.pth or .safetensors).")],
    images: Annotated[Path | None, typer.Option("--images", help="Image folder (ImageFolder layout "
                                                "DIR/<class>/… adds accuracy) or .txt list; default: "
                                                "100 views of the scikit-image photos.")] = None,
    num: Annotated[int, typer.Option("--num", help="Images to use (0: all).")] = 0,
    ratios: Annotated[str | None, typer.Option(
        "--ratios", metavar="R:R:R|R,R,...", help="Keep ratios: start:stop:step or a list, e.g. "
        f"0.5:0.9:0.1 or 0.5,0.6,0.7 (default {DEFAULT_RATIOS} and the checkpoint's own).")] = None,
    batch: Annotated[str, typer.Option("--batch", metavar="N,N,...",
                                       help="Batch sizes to time, e.g. 1,64.")] = "1,64",
    backend: Annotated[str, typer.Option("--backend", metavar="|".join(registry.names(registry.ONNX)),
                                         help=registry.described(registry.ONNX) + ".")] = "ort",
    threads: Threads = None,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per ratio and batch.")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed calls before timing.")] = 2,
    min_time: Annotated[float, typer.Option("--min-time", help="Seconds one run lasts at least.")] = 0.5,
    optimize: Annotated[bool, typer.Option("--optimize/--no-optimize", help="Apply, in memory, the "
                                           "passes of the backend's export target (`onnx --target`) "
                                           "to each ratio's export before timing it (bench's "
                                           "--optimize).")] = True,
    arch: Arch = None,
    schedule: Schedule = "eval",
    idle_layers: IdleLayers = None,
    ema: Ema = False,
    latency_ms: Annotated[float | None, typer.Option(
        "--latency-ms", metavar="MS", help="Pick the ratio with the best agreement whose median call "
        "at --batch N takes at most MS milliseconds.")] = None,
    min_agreement: Annotated[float | None, typer.Option(
        "--min-agreement", metavar="A", help="Pick the fastest ratio whose top-1 agreement with dense "
        "is at least A (e.g. 0.99).")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Where the picked ratio's "
                                                "ONNX goes (default: CHECKPOINT_idle_rR.onnx).")] = None,
    onnx_dir: Annotated[Path | None, typer.Option("--onnx-dir", help="Keep every exported ONNX "
                                                  "(the elastic file every ratio runs, and dense) in "
                                                  "this folder; the same exports already there are "
                                                  "reused.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the built-in photo crops and of a "
                                      "folder's sample.")] = 0,
    json_out: JsonOut = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG: agreement vs images/s "
                                              "per batch size, the Pareto front.")] = None,
):
    """Sweep keep ratios: agreement with dense, accuracy, GMACs and images/s; pick one for a budget."""

    quiet = json_out == "-" or QUIET["on"]
    with _Display(quiet) as display:
        report = api.sweep(checkpoint, images=images, num=num, ratios=ratios,
                           batches=int_list(batch, "--batch") or [], backend=backend, threads=threads,
                           runs=runs, warmup=warmup, min_time=min_time, optimize=optimize, arch=arch,
                           schedule=schedule, idle_layers=int_list(idle_layers, "--idle-layers"), ema=ema,
                           latency_ms=latency_ms, min_agreement=min_agreement, output=output,
                           onnx_dir=onnx_dir, seed=seed, plot=plot, progress=status,
                           on_ratio=display.progress, on_row=display.row, on_note=echo_err)
    print_sweep(report, report_console(json_out))
    if json_out:
        write_json(report, json_out)
    if plot is not None:
        echo_err(f"wrote {plot}")
    choice = report["choice"]
    if choice is not None:
        if not choice["met"]:
            raise CheckFailedError(choice["reason"], "relax the constraint or sweep other ratios "
                                   "(--ratios); no ONNX file was written")
        echo_err(f"picked: {choice['reason']}")
        echo_err(f"wrote {choice['file']}")


class _Display:
    """Progress on stderr: a bar over the ratios on a terminal, plain lines otherwise (logs, CI),
    nothing when quiet; a line with the figures of every finished ratio."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.total, self.quiet = None, quiet
        self.console = Console(stderr=True)
        self.bar = self.task = None

    def __enter__(self):
        return self

    def start(self, total: int) -> None:
        """The bar, once the sweep knows how many ratios it runs (after loading, so that the
        loading spinner and any error come first)."""
        self.total = total
        if not self.quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("ratios"), TimeElapsedColumn(), console=self.console,
                                transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("sweep", total=total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False

    def progress(self, done: float, total: int, message: str) -> None:
        if self.total is None:
            self.start(total)
        if self.bar is not None:
            self.bar.update(self.task, completed=int(done), **({"description": message} if message else {}))
        elif not self.quiet and message:
            step = min(int(done) + 1, self.total)
            self.console.print(f"… [{step}/{self.total}] {message}", highlight=False)

    def row(self, row: dict) -> None:
        if not self.quiet:
            speeds = ", ".join(f"{v:.1f} images/s at batch {b}" for b, v in row["images_per_s"].items())
            self.console.print(f"keep {row['keep_rate']:g}: agreement {row['agreement']:.1%}, "
                               f"{row['gmacs']:.3f} GMACs, {speeds}", highlight=False)
