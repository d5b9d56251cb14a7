"""`idle-export`: thin Typer commands over the library. Heavy imports live inside commands."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from idle_export import __version__
from idle_export.errors import EXIT_INTERNAL, BadInputError, IdleExportError
from idle_export.fileio import atomic_write_text

app = typer.Typer(
    name="idle-export",
    help="Deploy IdleViT models: ONNX export, parity checks, TensorRT engines, benchmarks, serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DEBUG = {"on": bool(os.environ.get("IDLE_EXPORT_DEBUG"))}


def _err(message: str) -> None:
    typer.echo(message, err=True)


def command(*args, target: typer.Typer | None = None, **kwargs):
    """app.command (or `target`'s, for a sub-app) that turns IdleExportError into one line +
    exit code, and anything unexpected into 'internal error' (exit 4) unless --debug."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            try:
                if kw.get("json_out") not in (None, "-"):  # a report nobody can write: say so first
                    from idle_export.onnx.export import check_output_path

                    check_output_path(Path(kw["json_out"]), "--json")
                return fn(*a, **kw)
            except (typer.Exit, typer.Abort, KeyboardInterrupt):
                raise
            except IdleExportError as e:
                if _DEBUG["on"]:
                    raise
                _err(f"error: {e.one_line()}")
                raise typer.Exit(e.exit_code) from None
            except Exception as e:  # noqa: BLE001 - the last line of defence
                if _DEBUG["on"]:
                    raise
                first = (str(e).splitlines() or [""])[0][:200]
                _err(f"internal error: {type(e).__name__}: {first} (hint: rerun with --debug "
                     "for the traceback and report it)")
                raise typer.Exit(EXIT_INTERNAL) from None

        return (target or app).command(*args, **kwargs)(wrapper)

    return decorate


def _version(value: bool):
    if value:
        typer.echo(f"idle-export {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line "
                                        "errors.")] = False,
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
):
    if debug:
        _DEBUG["on"] = True


# ----------------------------------------------------------------------------- shared options
def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise BadInputError(f"{what} {text!r} is not a comma-separated list of integers",
                            f"e.g. {what} 3,4,5") from None


def _threads(threads: int | None) -> int | None:
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


def _spec(ckpt, arch, keep, schedule, idle_layers, keep_k):
    return ckpt.spec(arch=arch, keep_rate=keep, schedule=schedule,
                     idle_layers=_int_list(idle_layers, "--idle-layers"),
                     keep_k=_int_list(keep_k, "--keep-k"))


def report_console(json_out: str | None):
    """The console a command prints its tables to: stderr when `--json -` makes stdout the JSON
    report (so stdout stays pure JSON), else stdout."""
    from rich.console import Console

    return Console(stderr=json_out == "-")


def _status(message: str):
    from rich.console import Console

    return Console(stderr=True).status(message)
