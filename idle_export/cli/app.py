"""The Typer app `idle-export`, its global options, and `command`: the decorator every command
uses, which turns errors into one line, a hint and the documented exit code."""

from __future__ import annotations

import functools
import os
import traceback
from pathlib import Path
from typing import Annotated

import typer

from idle_export import __version__
from idle_export.cli.options import echo_err
from idle_export.errors import EXIT_INTERNAL, IdleExportError
from idle_export.fileio import check_output_path

app = typer.Typer(
    name="idle-export",
    help="Deploy IdleViT models: ONNX export, parity checks, TensorRT engines, benchmarks, serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DEBUG = {"on": bool(os.environ.get("IDLE_EXPORT_DEBUG"))}


def command(*args, target: typer.Typer | None = None, **kwargs):
    """app.command (or `target`'s, for a sub-app) that turns IdleExportError into one line +
    exit code, and anything unexpected into 'internal error' (exit 4) unless --debug."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            try:
                if kw.get("json_out") not in (None, "-"):  # a report nobody can write: say so first
                    check_output_path(Path(kw["json_out"]), "--json")
                return fn(*a, **kw)
            except (typer.Exit, typer.Abort, KeyboardInterrupt):
                raise
            except IdleExportError as e:
                if _DEBUG["on"]:  # the traceback, but the documented exit code all the same
                    traceback.print_exc()
                echo_err(f"error: {e.one_line()}")
                raise typer.Exit(e.exit_code) from None
            except Exception as e:  # noqa: BLE001 - the last line of defence
                if _DEBUG["on"]:
                    raise
                first = (str(e).splitlines() or [""])[0][:200]
                echo_err(f"internal error: {type(e).__name__}: {first} (hint: rerun with --debug "
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


