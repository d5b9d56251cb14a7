"""`idle-export bench`: images/s of idle vs dense side by side, against the FLOP ideal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export import api
from idle_export.bench.report import print_report
from idle_export.cli.app import command
from idle_export.cli.options import (
    JsonOut,
    Threads,
    echo_err,
    int_list,
    report_console,
    status,
    write_json,
)
from idle_export.explore.choose import parse_ratios
from idle_export.runtime import registry


@command("bench", api_names={"batches": "batch", "keep_rates": "keep_rate", "backends": "backend"})
def bench_cmd(
    targets: Annotated[list[Path] | None, typer.Argument(
        metavar="TARGET", help="Idle and dense ONNX files (paired by their metadata), engines, or "
        "one checkpoint (exported to a temporary folder). Default: the idle export in this folder and "
        "its dense twin (exported from the checkpoint beside it when missing).")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, e.g. 1,8,64.")] = "1,8,64",
    backend: Annotated[str, typer.Option("--backend", help="Comma-separated, of: "
                                         + registry.described() + ".")] = "ort",
    threads: Threads = None,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per variant and batch "
                                      "(interleaved), 1 to 1000.")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed calls per variant and batch "
                                        "before timing, 1 to 1000 (they also size the runs).")] = 3,
    min_time: Annotated[float, typer.Option("--min-time", help="Seconds one run lasts at least "
                                            "(sets the calls per run).")] = 1.0,
    inputs: Annotated[str, typer.Option("--inputs", help="noise (seeded) or photos (skimage "
                                        "photos, timm eval transform).")] = "noise",
    scores: Annotated[str, typer.Option("--scores", help="Idle score modes exported from a "
                                        "checkpoint: official, folded or official,folded."
                                        )] = "official,folded",
    optimize: Annotated[bool, typer.Option("--optimize/--no-optimize", help="Apply, in memory, the "
                                           "passes of each backend's export target (`onnx --target`) "
                                           "that a file lacks. Default: time every file as written "
                                           "(a checkpoint is exported with each backend's target)."
                                           )] = False,
    official_repo: Annotated[Path | None, typer.Option("--official-repo", help="A clone of "
                                                          "Ackesnal/IdleViT for --backend "
                                                          "torch-official.")] = None,
    independent: Annotated[bool, typer.Option("--independent", help="Also time every ONNX file "
                                              "with timeit in a separate process (a check on the "
                                              "bench's own figures).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the noise inputs and of the photo crops.")] = 0,
    keep_rate: Annotated[str | None, typer.Option("--keep-rate", metavar="R1,R2,…", help="Time each "
                                                     "elastic file (`onnx --elastic`) or engine at these "
                                                     "keep rates, e.g. 0.5,0.7,1.0 (one file, no export "
                                                     "per rate); each rate gets its FLOP ideal.")] = None,
    json_out: JsonOut = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG: images/s vs batch, "
                                                 "idle vs dense, ideal line.")] = None,
):
    """Measure idle vs dense (and the official code) on each backend, against the FLOP ideal."""

    backends = [b for b in backend.replace(" ", "").split(",") if b]
    modes = [m for m in scores.replace(" ", "").split(",") if m]
    report = api.bench(targets or [], plot=plot, on_pick=echo_err, backends=backends,
                       batches=int_list(batch, "--batch") or [],
                       threads=threads, runs=runs, warmup=warmup, min_time=min_time, inputs=inputs,
                       scores=modes, optimize=optimize, official_repo=official_repo, independent=independent,
                       seed=seed, progress=status,
                       keep_rates=None if keep_rate is None else parse_ratios(keep_rate, "keep_rates"))
    print_report(report, report_console(json_out))
    if json_out:
        write_json(report, json_out)
    if plot is not None:
        typer.echo(f"wrote {plot}", err=True)
