"""`idle-export serve bench`: throughput and latency of served models under concurrent load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export import api
from idle_export.cli.app import command
from idle_export.cli.options import JsonOut, echo_err, int_list, report_console, status, write_json
from idle_export.cli.serve import serve_app


@command("bench", target=serve_app, api_names={"batches": "batch"})
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
    report = api.serve_bench(url, models.replace(" ", "").split(","),
                             concurrency=int_list(concurrency, "--concurrency") or [],
                             batches=int_list(batch, "--batch") or [], protocol=protocol, grpc_url=grpc_url,
                             warmup=warmup, window=window, max_windows=max_windows, stability=stability,
                             timeout=timeout, plot=plot, progress=status)
    print_load(report, report_console(json_out))
    if plot is not None:
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
