"""The Typer app `idle-export`, its global options, and `command`: the decorator every command
uses, which turns errors into one line, a hint and the documented exit code."""

from __future__ import annotations

import functools
import os
import re
import traceback
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from idle_export import __version__
from idle_export.cli.options import QUIET, echo_err
from idle_export.errors import EXIT_INTERNAL, BadInputError, IdleExportError
from idle_export.fileio import check_output_path, is_disk_full, is_stream


def _tidy(param) -> None:
    """Help text a user can read: no <bool> after flags, a word for what a value is (N, PATH…)
    instead of a Python type, argument names in capitals."""
    if isinstance(param, TyperArgument):
        name = param.metavar or param.name.upper()
        name += "..." if param.nargs != 1 and not name.endswith("...") else ""
        usage = name if param.required or name.startswith("[") else f"[{name}]"
        param.metavar = name
        # Typer writes a required argument as {NAME} (which reads like a choice set) and adds a
        # Python type column; the usage line says NAME / [NAME] and the help says what it is
        param._usage_display_name = lambda: usage
        param.display_type_rich = lambda ctx: None
        return
    if param.metavar is not None:
        return
    if getattr(param, "is_flag", False):
        param.metavar = ""
    else:
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        param.metavar = {int: "N", float: "X", Path: "PATH"}.get(annotation, "TEXT")


class _TidyHelp:
    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            _tidy(param)
        return params


class Command(_TidyHelp, TyperCommand):
    """Every idle-export command (see `command`)."""


class Group(_TidyHelp, TyperGroup):
    """The idle-export app and its sub-apps."""


app = typer.Typer(
    cls=Group,
    name="idle-export",
    help="Deploy IdleViT models: ONNX export, parity checks, TensorRT engines, benchmarks, serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DEBUG = {"on": bool(os.environ.get("IDLE_EXPORT_DEBUG"))}


OUTPUT_OPTIONS = {"output": "-o/--output", "json_out": "--json", "plot": "--plot", "log_file": "--log-file",
                  "save_outputs": "--save-outputs"}
STDOUT_PATHS = ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1")
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}  # the shell's 128 + signal number


def check_distinct_paths(kw: dict) -> None:
    """Before any work: no file a command writes is a file it reads or another file it writes
    (resolved, symlinks followed), so no input is ever replaced by an output or a report."""
    import os

    outputs, inputs = [], []
    for name, value in kw.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if name in OUTPUT_OPTIONS and v not in (None, "-") and not is_stream(v):
                outputs.append((OUTPUT_OPTIONS[name], Path(v)))
            elif isinstance(v, Path):
                inputs.append((name.upper() if name not in ("ckpt", "against", "images", "onnx", "calib",
                                                                "load_outputs")
                               else f"--{name.replace('_', '-')}", v))
    seen: dict[str, str] = {}
    for flag, path in outputs:
        real = os.path.realpath(path)
        if real in seen:
            raise BadInputError(f"{flag} and {seen[real]} name the same file {path}",
                                f"give {flag} another path")
        seen[real] = flag
    for what, path in inputs:
        real = os.path.realpath(path)
        if real in seen:
            raise BadInputError(f"{seen[real]} {path} is the input {what}: writing it would replace "
                                "the input", f"give {seen[real]} another path")


def _sigterm_as_interrupt():
    """SIGTERM (timeout, docker stop, a CI cancel) unwinds like Ctrl+C, so the same cleanup runs:
    temporary folders are removed and no output is left half-written. Returns the old handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    return signal.signal(signal.SIGTERM, on_term)


def in_flag_terms(text: str | None, flags: dict[str, str]) -> str | None:
    """An error text of the library, which names parameters as the API spells them (`backend=`,
    `max_abs=`), with each parameter the command has as a flag named as the flag (`--backend `,
    `--max-abs `): `name=True` is the bare switch, `name=` alone (before a space, a comma or the
    end) the bare flag, and a key `name=value` (from `api_names`, e.g. `precision=int8`) a flag
    that stands for that value (`--int8`)."""
    if not text:
        return text
    for name, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
        if "=" in name:  # a value that is a flag of its own: precision=int8 → --int8
            text = re.sub(rf"(?<![\w.-]){re.escape(name)}\b", flag, text)
            continue
        text = re.sub(rf"(?<![\w.-]){re.escape(name)}=True\b", flag, text)  # a switch
        text = re.sub(rf"(?<![\w.-]){re.escape(name)}=(?=[\s,;:)]|$)", flag, text)  # the option itself
        text = re.sub(rf"(?<![\w.-]){re.escape(name)}= ?", f"{flag} ", text)
    return text


def _command_flags(fn, api_names: dict[str, str]) -> dict[str, str]:
    """API parameter → the command's flag: its options by their Python names (from the
    `typer.Option` declarations of `fn`; arguments as NAME), and `api_names` (API name → the
    command's parameter name) where the two differ; a key `name=value` maps an API value to a
    switch of the command (`{"precision=int8": "int8"}`)."""
    import typing

    flags = {}
    for name, hint in typing.get_type_hints(fn, include_extras=True).items():
        for info in getattr(hint, "__metadata__", ()):
            # in Annotated[…, typer.Option("--flag")] Typer holds the first name in `default`
            names = [getattr(info, "default", None), *(getattr(info, "param_decls", None) or ())]
            decls = [d for d in names if isinstance(d, str) and d.startswith("--")]
            if isinstance(info, typer.models.OptionInfo) and decls:
                flag = max(decls, key=len)
                if "/" in flag:  # --ir/--no-ir: ir=True is --ir, ir=False --no-ir
                    flag, flags[f"{name}=False"] = flag.split("/", 1)
                flags[name] = flag
            elif isinstance(info, typer.models.ArgumentInfo):
                flags[name] = name.upper()
    flags.update({api: flags[cli] for api, cli in api_names.items() if cli in flags})
    flags.update({f"{api}=False": flags[f"{cli}=False"] for api, cli in api_names.items()
                  if f"{cli}=False" in flags})
    return flags


def command(*args, target: typer.Typer | None = None, api_names: dict[str, str] | None = None, **kwargs):
    """app.command (or `target`'s, for a sub-app) that turns IdleExportError into one line +
    exit code, anything unexpected into 'internal error' (exit 4) unless --debug, and Ctrl+C or
    SIGTERM into a clean stop (exit 130/143, nothing written). Errors name parameters as the API
    does (`max_abs=`); they are printed with the command's flags instead (`--max-abs`), the
    command's options matched by name, plus `api_names` (API name → the command's parameter)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            import signal

            previous = _sigterm_as_interrupt()
            try:
                if kw.get("json_out") in STDOUT_PATHS:  # the report alone on stdout, as with -
                    kw["json_out"] = "-"
                if kw.get("json_out") not in (None, "-"):  # a report nobody can write: say so first
                    check_output_path(Path(kw["json_out"]), "--json")
                if kw.get("json_out") == "-":
                    QUIET["on"] = True
                check_distinct_paths(kw)
                return fn(*a, **kw)
            except (typer.Exit, typer.Abort):
                raise
            except KeyboardInterrupt as e:
                which = "SIGTERM" if str(e) == "SIGTERM" else "SIGINT"
                echo_err(f"interrupted ({which}): stopped, no output written")
                raise typer.Exit(EXIT_SIGNAL[which]) from None
            except IdleExportError as e:
                if _DEBUG["on"]:  # the traceback, but the documented exit code all the same
                    traceback.print_exc()
                flags = _command_flags(fn, api_names or {})
                e.message, e.hint = in_flag_terms(e.message, flags), in_flag_terms(e.hint, flags)
                echo_err(f"error: {e.one_line()}")
                raise typer.Exit(e.exit_code) from None
            except Exception as e:  # noqa: BLE001 - the last line of defence
                if is_disk_full(e) and not _DEBUG["on"]:  # a write no atomic helper made
                    where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
                    echo_err(f"error: no space left on device{where} (hint: free some space or write "
                             "to another folder)")
                    raise typer.Exit(BadInputError.exit_code) from None
                if _DEBUG["on"]:
                    raise
                first = (str(e).splitlines() or [""])[0][:200]
                echo_err(f"internal error: {type(e).__name__}: {first} (hint: rerun with --debug "
                         "for the traceback and report it)")
                raise typer.Exit(EXIT_INTERNAL) from None
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)

        kwargs.setdefault("cls", Command)
        return (target or app).command(*args, **kwargs)(wrapper)

    return decorate


def _version(value: bool):
    if value:
        typer.echo(f"idle-export {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback with an error (the exit "
                                        "code stays the documented one); also accepted after the "
                                        "command.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr (results "
                                        "and errors still print).")] = False,
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
):
    _DEBUG["on"] = debug or bool(os.environ.get("IDLE_EXPORT_DEBUG"))
    QUIET["on"] = quiet


# ----------------------------------------------------------------------------- shared options


