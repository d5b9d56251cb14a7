"""`idle-export sweep`: keep ratios against agreement with dense, accuracy, GMACs and images/s;
optionally pick one for a latency budget or an agreement floor and write its ONNX."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

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
from idle_export.errors import BadInputError, CheckFailedError
from idle_export.explore.choose import DEFAULT_RATIOS, check_choice_options, choose_ratio, parse_ratios
from idle_export.explore.pareto import import_matplotlib, mark_front, plot_sweep, print_sweep
from idle_export.explore.sweep import check_backend, run_sweep, sweep_images
from idle_export.fileio import check_output_path, mkdir_hint
from idle_export.hardware import check_threads
from idle_export.model.checkpoint import load_checkpoint
from idle_export.onnx.export import export_checkpoint
from idle_export.runtime import registry


@command("sweep")
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

    sizes = int_list(batch, "--batch") or []
    if not sizes or min(sizes) < 1:
        raise BadInputError(f"--batch {batch!r} needs positive sizes", "e.g. --batch 1,64")
    choosing = latency_ms is not None or min_agreement is not None
    check_choice_options(sizes, latency_ms=latency_ms, min_agreement=min_agreement)
    if output is not None and not choosing:
        raise BadInputError("-o writes the picked ratio's ONNX, but nothing says how to pick",
                            "add --latency-ms X --batch N or --min-agreement A")
    if num < 0:
        raise BadInputError(f"--num {num} must be ≥ 0", "e.g. --num 200 (0: all images)")
    check_backend(backend)
    wanted = parse_ratios(ratios) if ratios is not None else None
    if output is not None:
        check_output_path(output)
    if plot is not None:
        check_output_path(plot, "--plot")
        import_matplotlib()  # missing: exit 3 now, not after the sweep
    if onnx_dir is not None and not onnx_dir.is_dir():
        raise BadInputError(f"--onnx-dir {onnx_dir} is not a folder", mkdir_hint(onnx_dir))
    layers = int_list(idle_layers, "--idle-layers")
    with status(f"loading {checkpoint.name}"):
        ckpt = load_checkpoint(checkpoint, ema=ema)
        if choosing and output is None:  # the default CHECKPOINT_idle_rR.onnx goes beside it
            check_output_path(checkpoint.with_name(f"{checkpoint.stem}_idle.onnx"))

        def spec_for(r: float):
            return ckpt.spec(arch=arch, keep_rate=r, schedule=schedule, idle_layers=layers)

        base = spec_for(1.0)
        if wanted is None:
            wanted = parse_ratios(DEFAULT_RATIOS)
            if ckpt.keep_rate is not None and 0 < ckpt.keep_rate <= 1:
                wanted = sorted(set(wanted) | {ckpt.keep_rate})
        for r in wanted:
            spec_for(r)  # a ratio too small for some idle layer fails here, before any export
        imgs, labels, note = sweep_images(images, num, base, ckpt.classes, seed=seed)
    if imgs.skipped:
        echo_err(f"warning: skipped {len(imgs.skipped)} unreadable file(s) in {imgs.source}, e.g. "
                 f"{imgs.skipped[0][0]} ({imgs.skipped[0][1]})")
    report = _run(ckpt, spec_for, wanted, sizes, imgs, labels, note, backend, check_threads(threads),
                  runs, warmup, min_time, optimize, onnx_dir, choosing, latency_ms, min_agreement,
                  output, checkpoint, quiet=json_out == "-" or QUIET["on"])
    print_sweep(report, report_console(json_out))
    if json_out:
        write_json(report, json_out)
    if plot is not None:
        plot_sweep(report, plot)
        echo_err(f"wrote {plot}")
    choice = report["choice"]
    if choice is not None:
        if not choice["met"]:
            raise CheckFailedError(choice["reason"], "relax the constraint or sweep other ratios "
                                   "(--ratios); no ONNX file was written")
        echo_err(f"picked: {choice['reason']}")
        echo_err(f"wrote {choice['file']}")


def _run(ckpt, spec_for, ratios, sizes, imgs, labels, note, backend, threads, runs, warmup, min_time,
         optimize, onnx_dir, choosing, latency_ms, min_agreement, output, checkpoint, quiet) -> dict:
    """The sweep with its progress display, the choice, and the picked file copied to `output`."""
    workdir = onnx_dir or Path(tempfile.mkdtemp(prefix="idle-export-sweep-"))
    try:
        with _Display(len(ratios), quiet) as display:
            report = run_sweep(ckpt, spec_for, ratios, batches=sizes, images=imgs, labels=labels,
                               workdir=workdir, backend=backend, threads=threads, runs=runs,
                               warmup=warmup, min_time=min_time, optimize=optimize, label_note=note,
                               progress=display.progress, on_row=display.row)
        mark_front(report)
        if choosing:
            choice = choose_ratio(report["results"], report["settings"]["batch"], latency_ms=latency_ms,
                                  min_agreement=min_agreement)
            report["choice"] = choice.to_json()
            if choice.met:
                r = choice.row["keep_rate"]
                target = output or checkpoint.with_name(f"{checkpoint.stem}_idle_r{r:g}.onnx")
                with status(f"exporting keep {r:g} to {target}"):  # the fixed-K file of the pick
                    export_checkpoint(ckpt, spec_for(r), target)
                report["choice"]["file"] = str(target)
        return report
    finally:
        if onnx_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


class _Display:
    """Progress on stderr: a bar over the ratios on a terminal, plain lines otherwise (logs, CI),
    nothing when quiet; a line with the figures of every finished ratio."""

    def __init__(self, total: int, quiet: bool):
        from rich.console import Console

        self.total, self.quiet = total, quiet
        self.console = Console(stderr=True)
        self.bar = self.task = None

    def __enter__(self):
        if not self.quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("ratios"), TimeElapsedColumn(), console=self.console,
                                transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("sweep", total=self.total)
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False

    def progress(self, done: float, message: str) -> None:
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
