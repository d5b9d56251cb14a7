"""`idle-export bench`: images/s of idle vs dense side by side, against the FLOP ideal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export.bench.plot import plot_report, require_matplotlib
from idle_export.bench.report import print_report
from idle_export.bench.run import run_bench
from idle_export.bench.targets import default_targets
from idle_export.cli.app import command
from idle_export.cli.options import (
    JsonOut,
    Threads,
    batch_list,
    check_threads,
    echo_err,
    finite,
    report_console,
    status,
    write_json,
)
from idle_export.errors import BadInputError
from idle_export.explore.choose import parse_ratios
from idle_export.fileio import check_output_path
from idle_export.model.config import SCORE_MODES


@command("bench")
def bench_cmd(
    targets: Annotated[list[Path] | None, typer.Argument(
        metavar="TARGET", help="Idle and dense ONNX files (paired by their metadata), engines, or "
        "one checkpoint (exported to a temporary folder). Default: the idle export in this folder and "
        "its dense twin (exported from the checkpoint beside it when missing).")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, e.g. 1,8,64.")] = "1,8,64",
    backend: Annotated[str, typer.Option("--backend", help="torch, torch-official, ort, ort-cuda, "
                                         "openvino, trt (comma-separated).")] = "ort",
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

    sizes = batch_list(batch)
    finite(min_time, "--min-time", open_low=True, high=3600, example="e.g. --min-time 1")
    if not 1 <= runs <= 1000 or not 1 <= warmup <= 1000:
        raise BadInputError(f"--runs {runs} and --warmup {warmup} must be between 1 and 1000",
                            "e.g. --runs 5 --warmup 3")
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
        require_matplotlib()  # exit 3 naming the extra before the benchmark, not after it
    if not targets:
        targets, picked = default_targets(Path("."), status=status)
        echo_err(picked)
    report = run_bench(targets, backends=backends, batches=sizes, threads=check_threads(threads), runs=runs,
                       warmup=warmup, min_time=min_time, inputs=inputs, score_modes=modes,
                       optimize=optimize, official_repo=official_repo, independent=independent,
                       seed=seed, status=status,
                       keep_rates=None if keep_rate is None else parse_ratios(keep_rate, "--keep-rate"))
    print_report(report, report_console(json_out))
    if json_out:
        write_json(report, json_out)
    if plot is not None:
        plot_report(report, plot)
        typer.echo(f"wrote {plot}", err=True)
