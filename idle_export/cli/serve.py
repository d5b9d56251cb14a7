"""`idle-export serve repo|run|query`: Triton model repository, local pytriton server, client."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export import api
from idle_export.cli.app import app, command
from idle_export.cli.options import (
    JsonOut,
    Threads,
    byte_size,
    echo_err,
    int_list,
    report_console,
    status,
    write_json,
)

serve_app = typer.Typer(name="serve", no_args_is_help=True, add_completion=False,
                        help="Triton Inference Server: write a model repository, serve it locally "
                        "(pytriton, CPU), query a server.")
app.add_typer(serve_app, name="serve")


def _serve_command(name: str, api_names: dict[str, str] | None = None):
    return command(name, target=serve_app, api_names=api_names)


@_serve_command("repo")
def repo_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX file (→ onnxruntime_onnx) or TensorRT engine "
                                          ".engine/.plan with its .json sidecar (→ tensorrt_plan).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Model repository folder (created "
                                         "if its parent exists).")] = Path("model_repository"),
    name: Annotated[str | None, typer.Option("--name", help="Model name (default: file stem).")] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", help="max_batch_size (default 64; "
                                                     "an engine: its profile's max).")] = None,
    preferred: Annotated[str | None, typer.Option("--preferred", help="Preferred batch sizes of the "
                                                     "dynamic batcher (default: MAX/2,MAX or the "
                                                     "engine's opt,max).")] = None,
    queue_delay_us: Annotated[int | None, typer.Option("--queue-delay-us", help="Dynamic batcher: "
                                                       "longest wait for a fuller batch, microseconds "
                                                       "(default 100).")] = None,
    instances: Annotated[int | None, typer.Option("--instances", help="instance_group count (default "
                                                     "1).")] = None,
    tune: Annotated[bool, typer.Option("--tune", help="Time the ONNX model on ONNX Runtime here at batch "
                                       "1, 2, 4, … and choose preferred sizes (90 %/97 % of the best "
                                       "images/s), queue delay (5 % of batch-1 latency, ≤ 2 ms) and "
                                       "instances for this CPU; given options still win.")] = False,
    threads: Threads = None,
    kind: Annotated[str | None, typer.Option("--kind", help="instance_group kind: auto|cpu|gpu "
                                                "(default auto; gpu for engines).")] = None,
    version: Annotated[int, typer.Option("--version", help="Version folder number; a model folder that "
                                         "exists gets it beside its other versions.")] = 1,
    onnx: Annotated[Path | None, typer.Option("--onnx", help="For an engine: the ONNX it was "
                                                 "built from (tensor names, shapes, metadata).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace that version if it exists.")] = False,
    accelerator: Annotated[str | None, typer.Option("--accelerator", help="For an ONNX model: tensorrt "
                                                       "(Triton's ONNX Runtime backend builds a TensorRT "
                                                       "engine on the serving GPU) or openvino (CPU)."
                                                       )] = None,
    accelerator_precision: Annotated[str, typer.Option("--accelerator-precision", help="tensorrt "
                                                       "accelerator: fp16 or fp32.")] = "fp16",
    json_out: JsonOut = None,
):
    """Write a Triton model repository: NAME/config.pbtxt, NAME/1/model.onnx|model.plan, labels."""

    report = api.serve_repo(model, output, name=name, max_batch=max_batch,
                            preferred=int_list(preferred, "--preferred"), queue_delay_us=queue_delay_us,
                            instances=instances, tune=tune, threads=threads, kind=kind, version=version,
                            onnx=onnx, force=force, accelerator=accelerator,
                            accelerator_precision=accelerator_precision, progress=status)
    tuned = report["tuned"]
    if tuned:
        rates = ", ".join(f"{b}: {r:.1f}" for b, r in tuned["images_per_second"].items())
        echo_err(f"tuned on this CPU ({tuned['cores']} cores, {tuned['threads']} threads): images/s by batch "
                 f"{rates}; batch-1 latency {tuned['latency_ms']['1']:.1f} ms")
    for w in report["warnings"]:
        echo_err(f"warning: {w}")
    check = "parsed back with Triton's model_config protobuf" if report["validated_with_triton_protobuf"] \
        else "not parsed back (tritonclient missing)"
    accel = f", {report['accelerator']} accelerator" if report["accelerator"] else ""
    echo_err(f"wrote {report['folder']} version {report['version']} (versions {report['versions']}; "
             f"{report['platform']}{accel}, max batch {report['max_batch_size']}, "
             f"preferred {report['preferred_batch_sizes']}, {report['labels'] or 'no'} labels; "
             f"config.pbtxt {check})")
    if json_out:
        write_json(report, json_out)


@_serve_command("run", api_names={"max_input_bytes": "max_input", "in_flight_bytes": "in_flight",
                                  "models": "model"})
def run_cmd(
    repository: Annotated[Path, typer.Argument(help="Model repository written by `serve repo`.")],
    port: Annotated[int, typer.Option("--port", help="HTTP port (KServe v2).")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Address to bind; keep 127.0.0.1 unless the "
                                      "server must be reachable from other machines.")] = "127.0.0.1",
    model: Annotated[list[str] | None, typer.Option("--model", help="Serve only this model "
                                                       "(repeatable).")] = None,
    threads: Threads = None,
    grpc_port: Annotated[int | None, typer.Option("--grpc-port", help="Also serve gRPC on this "
                                                     "port (off by default).")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Prometheus metrics "
                                                        "on this port (off by default).")] = None,
    exit_timeout: Annotated[int, typer.Option("--exit-timeout", help="Seconds (0-25) to let the "
                                              "requests accepted before a stop finish.")] = 10,
    log_file: Annotated[Path | None, typer.Option("--log-file", help="Keep tritonserver's log "
                                                     "here (default: a temp file, removed on a clean "
                                                     "exit).")] = None,
    max_input: Annotated[str | None, typer.Option("--http-max-input-size", metavar="BYTES", help="Most "
                                                  "bytes of inputs one HTTP request may declare, and of "
                                                  "its body (e.g. 64MiB; default 64MiB or the largest "
                                                  "full batch of a served model). Larger requests get "
                                                  "413/400 and the server keeps serving.")] = None,
    in_flight: Annotated[str | None, typer.Option("--max-in-flight", metavar="BYTES", help="Most bytes of "
                                                  "request bodies held at once (default: 16 full-size "
                                                  "requests, at most a quarter of the free memory); a "
                                                  "request over it gets 503 with Retry-After.")] = None,
):
    """Serve a repository's ONNX models locally: Triton core via pytriton, ONNX Runtime on CPU."""

    def ready(handle):
        for w in handle.warnings:
            echo_err(f"warning: {w}")
        echo_err(f"serving {', '.join(handle.models)} at {handle.url} (Triton via pytriton, ONNX Runtime "
                 f"CPU; requests up to {handle.max_input_bytes / 2**20:.4g} MiB of inputs); stop with "
                 "Ctrl+C or SIGTERM")

    summary = api.serve_run(repository, host=host, port=port, models=model or None, threads=threads,
                            grpc_port=grpc_port, metrics_port=metrics_port, exit_timeout=exit_timeout,
                            log_file=log_file, on_ready=ready,
                            max_input_bytes=byte_size(max_input, "--http-max-input-size"),
                            in_flight_bytes=byte_size(in_flight, "--max-in-flight"),
                            on_start=lambda: echo_err(f"starting Triton on {host}:{port} ..."))
    if summary["skipped"]:
        echo_err(f"not served here (need their Triton backend): {', '.join(summary['skipped'])}")
    echo_err(f"stopped ({summary['signal'] or 'stop requested'}) after serving {summary['uptime_s']:.0f} s; "
             f"shutdown took {summary['shutdown_s']:.1f} s")


@_serve_command("query")
def query_cmd(
    url: Annotated[str, typer.Argument(help="Server, e.g. http://127.0.0.1:8000")],
    images: Annotated[list[Path], typer.Argument(help="Image files (JPEG, PNG, ...).")],
    model: Annotated[str | None, typer.Option("--model", help="Model name (default: the only "
                                                 "model the server has ready).")] = None,
    top: Annotated[int, typer.Option("--top", help="Classes to show per image.")] = 5,
    repeat: Annotated[int, typer.Option("--repeat", help="Send the request N times (latency "
                                        "percentiles).")] = 1,
    timeout: Annotated[float, typer.Option("--timeout", help="Network timeout, seconds.")] = 60.0,
    wait: Annotated[float, typer.Option("--wait", metavar="SECONDS", help="Wait up to this long for "
                                        "a server that is still starting to be ready (0: ask once).")
                    ] = 0.0,
    keep_rate: Annotated[float | None, typer.Option("--keep-rate", help="Keep rate of an elastic model "
                                                     "(`onnx --elastic`), sent with each request "
                                                     "(default: the model's own).")] = None,
    json_out: JsonOut = None,
):
    """Top-k classes and latency from a Triton server; preprocessing identical to `check`."""

    report = api.serve_query(url, images, model=model, top=top, repeat=repeat, timeout=timeout, wait=wait,
                             keep_rate=keep_rate)
    print_query(report, report_console(json_out))
    if json_out:
        write_json(report, json_out)


def print_query(report: dict, console) -> None:
    from rich.table import Table

    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    table = Table(title=f"{report['model']} at {report['url']}")
    for col in ("image", "#", "class", "label", "prob", "logit"):
        table.add_column(col, justify="left" if col in ("image", "label") else "right")
    for row in report["results"]:
        for rank, t in enumerate(row["top"], 1):
            table.add_row(Path(row["image"]).name if rank == 1 else "", str(rank), str(t["index"]),
                          t["label"] or "-", f"{t['prob']:.2%}", f"{t['logit']:.4f}")
        table.add_section()
    console.print(table)
    lat = report["latency_ms"]
    console.print(f"latency over {report['requests']} request(s): mean {lat['mean']:.1f} ms, "
                  f"p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms (client wall time)")
