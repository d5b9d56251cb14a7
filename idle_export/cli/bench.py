"""`idle-export bench`: images/s of idle vs dense side by side, against the FLOP ideal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export.bench.plot import plot_report
from idle_export.bench.report import print_report
from idle_export.bench.run import run_bench
from idle_export.cli.app import command
from idle_export.cli.options import (
    JsonOut,
    Threads,
    check_threads,
    int_list,
    report_console,
    status,
    write_json,
)
from idle_export.errors import BadInputError
from idle_export.fileio import check_output_path
from idle_export.model.config import SCORE_MODES


@command("bench")
def bench_cmd(
    targets: Annotated[list[Path], typer.Argument(help="Idle and dense ONNX files (paired by their "
                                                  "metadata), engines, or one checkpoint (exported "
                                                  "to a temporary folder).")],
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, e.g. 1,8,64.")] = "1,8,64",
    backend: Annotated[str, typer.Option("--backend", help="torch, torch-official, ort, ort-cuda, "
                                         "trt (comma-separated).")] = "ort",
    threads: Threads = None,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per variant and batch "
                                      "(interleaved).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed calls per variant and batch "
                                        "before timing (at least 1: it also sizes the "
                                        "runs).")] = 3,
    min_time: Annotated[float, typer.Option("--min-time", help="Seconds one run lasts at least "
                                            "(sets the calls per run).")] = 1.0,
    inputs: Annotated[str, typer.Option("--inputs", help="noise (seeded) or photos (skimage "
                                        "photos, timm eval transform).")] = "noise",
    scores: Annotated[str, typer.Option("--scores", help="Idle score modes exported from a "
                                        "checkpoint: official, folded or official,folded."
                                        )] = "official,folded",
    optimize: Annotated[bool, typer.Option("--optimize/--no-optimize", help="Apply the ONNX Runtime "
                                           "graph passes (idle_export.optimize) at session time.")] = True,
    official_repo: Annotated[Path | None, typer.Option("--official-repo", help="A clone of "
                                                          "Ackesnal/IdleViT for --backend "
                                                          "torch-official.")] = None,
    independent: Annotated[bool, typer.Option("--independent", help="Also time every ONNX file "
                                              "with timeit in a separate process (a check on the "
                                              "bench's own figures).")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    json_out: JsonOut = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG: images/s vs batch, "
                                                 "idle vs dense, ideal line.")] = None,
):
    """Measure idle vs dense (and the official code) on each backend, against the FLOP ideal."""

    sizes = int_list(batch, "--batch") or []
    if not sizes or min(sizes) < 1:
        raise BadInputError(f"--batch {batch!r} needs positive sizes", "e.g. --batch 1,8,64")
    backends = [b for b in backend.replace(" ", "").split(",") if b]
    modes = [m for m in scores.replace(" ", "").split(",") if m]
    bad = [m for m in modes if m not in SCORE_MODES]
    if bad or not modes:
        raise BadInputError(f"--scores {scores!r}: unknown mode {', '.join(bad) or '(none)'}",
                            "use official, folded or official,folded")
    if official_repo is not None and not official_repo.is_dir():
        raise BadInputError(f"--official-repo {official_repo} is not a folder",
                            "git clone https://github.com/Ackesnal/IdleViT and pass its path")
    if plot is not None:  # (--json FILE is checked by cli.command before this runs)
        check_output_path(plot, "--plot")
    report = run_bench(targets, backends=backends, batches=sizes, threads=check_threads(threads), runs=runs,
                       warmup=warmup, min_time=min_time, inputs=inputs, score_modes=modes,
                       optimize=optimize, official_repo=official_repo, independent=independent,
                       seed=seed, status=status)
    print_report(report, report_console(json_out))
    if json_out:
        write_json(report, json_out)
    if plot is not None:
        plot_report(report, plot)
        typer.echo(f"wrote {plot}", err=True)
