"""What the commands share: option types spelled the same everywhere, their parsers, and the
console/JSON output helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from idle_export.errors import BadInputError
from idle_export.fileio import atomic_write_text


def echo_err(message: str) -> None:
    typer.echo(message, err=True)


def int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise BadInputError(f"{what} {text!r} is not a comma-separated list of integers",
                            f"e.g. {what} 3,4,5") from None


def check_threads(threads: int | None) -> int | None:
    if threads is not None and threads < 1:
        raise BadInputError(f"--threads {threads} must be at least 1", "pass --threads 2")
    return threads


def write_json(report: dict, target: str) -> None:
    """`--json -` prints to stdout; `--json FILE` writes FILE atomically."""
    text = json.dumps(report, indent=2, default=str)
    if target == "-":
        typer.echo(text)
        return
    atomic_write_text(Path(target), text + "\n")


Arch = Annotated[str | None, typer.Option("--arch", help="deit_tiny|deit_small|deit_base; "
                                             "default: args.arch of the checkpoint, else its shapes.")]


Keep = Annotated[float | None, typer.Option("--keep", help="Keep rate r in (0, 1]; default: "
                                               "args.base_rate of the checkpoint.")]


Schedule = Annotated[str, typer.Option("--schedule", help="eval: idle layers 3..11 with "
                                       "r,r,r,r²,r²,r²,r³,r³,r³ (official eval script); train: 4..11 "
                                       "(official training script).")]


IdleLayers = Annotated[str | None, typer.Option("--idle-layers", help="Explicit idle layers, "
                                                   "e.g. 3,4,5 (keep r**(p//3+1) for the p-th).")]


KeepK = Annotated[str | None, typer.Option("--keep-k", help="Explicit patch tokens kept per "
                                              "idle layer, e.g. 137,137,96.")]


Ema = Annotated[bool, typer.Option("--ema", help="Use the checkpoint's EMA weights (model_ema).")]


JsonOut = Annotated[str | None, typer.Option("--json", help="Write the report as JSON to FILE "
                                                "('-' for stdout).")]


Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads for torch and "
                                                "ONNX Runtime (default: all cores).")]


def spec_from_options(ckpt, arch, keep, schedule, idle_layers, keep_k):
    return ckpt.spec(arch=arch, keep_rate=keep, schedule=schedule,
                     idle_layers=int_list(idle_layers, "--idle-layers"),
                     keep_k=int_list(keep_k, "--keep-k"))


def report_console(json_out: str | None):
    """The console a command prints its tables to: stderr when `--json -` makes stdout the JSON
    report (so stdout stays pure JSON), else stdout."""
    from rich.console import Console

    return Console(stderr=json_out == "-")


def status(message: str):
    from rich.console import Console

    return Console(stderr=True).status(message)
