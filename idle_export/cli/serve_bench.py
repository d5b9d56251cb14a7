"""`idle-export serve bench`: throughput and latency of served models under concurrent load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export.cli.app import command
from idle_export.cli.options import (
    JsonOut,
    batch_list,
    echo_err,
    int_list,
    report_console,
    status,
    write_json,
)
from idle_export.cli.serve import serve_app
from idle_export.errors import BadInputError
from idle_export.fileio import check_output_path
from idle_export.serve.load import bench_server
from idle_export.serve.load_plot import plot_load

MAX_CONCURRENCY = 256


@command("bench", target=serve_app)
def bench_cmd(
    url: Annotated[str, typer.Argument(help="HTTP address of the server, e.g. http://127.0.0.1:8000")],
    models: Annotated[str, typer.Option("--models", help="Served models to load, comma-separated; "
                                        "the first two are compared (e.g. idle,dense).")],
    concurrency: Annotated[str, typer.Option("--concurrency", help="Clients in flight at once, each "
                                             "sending its next request when the last is answered "
                                             "(perf_analyzer's --concurrency-range).")] = "1,2,4,8",
    batch: Annotated[str, typer.Option("--batch", help="Images per request.")] = "1,8",
    protocol: Annotated[str, typer.Option("--protocol", help="http (binary tensors) or grpc.")] = "http",
    grpc_url: Annotated[str | None, typer.Option("--grpc-url", help="gRPC address with --protocol "
                                                    "grpc (default: the HTTP host, port 8001).")] = None,
    warmup: Annotated[float, typer.Option("--warmup", help="Seconds of load before measuring, at "
                                          "each level.")] = 1.0,
    window: Annotated[float, typer.Option("--window", help="Seconds per measurement window.")] = 2.0,
    max_windows: Annotated[int, typer.Option("--max-windows", help="Stop measuring a level after N "
                                             "windows even when they disagree.")] = 8,
    stability: Annotated[float, typer.Option("--stability", help="Measuring stops when the last three "
                                             "windows' throughputs are within this fraction of their "
                                             "mean (perf_analyzer: 0.1).")] = 0.1,
    timeout: Annotated[float, typer.Option("--timeout", help="Network timeout per request, seconds.")] = 60.0,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG: throughput and p99 latency "
                                              "against concurrency.")] = None,
    json_out: JsonOut = None,
):
    """Closed-loop load on a Triton server: images/s and p50/p90/p99 latency per concurrency."""
    names = [m for m in models.replace(" ", "").split(",") if m]
    if not names:
        raise BadInputError("--models names no model", "e.g. --models deit_s_idle,deit_s_dense")
    levels = int_list(concurrency, "--concurrency") or []
    if not levels or min(levels) < 1 or max(levels) > MAX_CONCURRENCY:
        raise BadInputError(f"--concurrency {concurrency!r} needs levels between 1 and {MAX_CONCURRENCY}",
                            "e.g. --concurrency 1,2,4,8")
    for value, what in ((warmup, "--warmup"), (window, "--window"), (timeout, "--timeout")):
        if not 0 <= value <= 3600 or (what != "--warmup" and value == 0):
            raise BadInputError(f"{what} {value} must be a number of seconds in (0, 3600]", f"e.g. {what} 2")
    if not 3 <= max_windows <= 100:
        raise BadInputError(f"--max-windows {max_windows} must be between 3 and 100", "e.g. --max-windows 8")
    if not 0 < stability < 1:
        raise BadInputError(f"--stability {stability} must lie in (0, 1)", "e.g. --stability 0.1")
    if plot is not None:
        check_output_path(plot, "--plot")
    with status(f"load on {url}") as progress:
        report = bench_server(url, names, concurrency=levels, batch=batch_list(batch), protocol=protocol,
                              grpc_url=grpc_url, warmup_s=warmup, window_s=window, max_windows=max_windows,
                              stability=stability, timeout_s=timeout, progress=progress.update)
    print_load(report, report_console(json_out))
    if plot is not None:
        plot_load(report, plot)
        echo_err(f"wrote {plot}")
    if json_out:
        write_json(report, json_out)


def print_load(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"closed-loop load on {report['url']} ({report['protocol']})")
    for col in ("model", "batch", "conc.", "images/s", "p50 ms", "p90 ms", "p99 ms", "queue ms",
                "compute ms", "errors", "stable"):
        table.add_column(col, justify="left" if col == "model" else "right")

    def ms(v):
        return "-" if v is None else f"{v / 1e3:.1f}"

    for r in report["rows"]:
        table.add_row(r["model"], str(r["batch"]), str(r["Concurrency"]), f"{r['images_per_second']:.1f}",
                      ms(r["p50 latency"]), ms(r["p90 latency"]), ms(r["p99 latency"]), ms(r["Server Queue"]),
                      ms(r["Server Compute Infer"]), str(r["errors"]), "yes" if r["stable"] else "no")
    console.print(table)
    for ratio in report["ratios"]:
        console.print(f"{ratio['models']} throughput at batch {ratio['batch']}, concurrency "
                      f"{ratio['Concurrency']}: {ratio['throughput_ratio']:.2f}×")
    for r in report["rows"]:
        for e in r.get("error_samples", [])[:1]:
            console.print(f"[yellow]errors[/] {r['model']} batch {r['batch']} c{r['Concurrency']}: {e}")
