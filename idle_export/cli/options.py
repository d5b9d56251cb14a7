"""What the commands share: option types spelled the same everywhere, their parsers, and the
console/JSON output helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from idle_export.errors import BadInputError
from idle_export.fileio import atomic_write_text
from idle_export.model.families import ARCH_NAMES, METHODS
from idle_export.numerics import json_safe
from idle_export.onnx.io import check_batch_sizes


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


def batch_list(text: str, what: str = "--batch") -> list[int]:
    """Batch sizes to run, from "1,8,64" (onnx.io.check_batch_sizes; errors name `batch=`, which
    cli.app prints as the command's --batch)."""
    return check_batch_sizes(int_list(text, what) or [], "batch")


def finite(value: float | None, what: str, *, low: float = 0.0, high: float = float("inf"),
           open_low: bool = False, example: str = "") -> float | None:
    """A number option that must be finite and in range (NaN and inf switch checks off)."""
    import math

    if value is None:
        return None
    bad_low = value <= low if open_low else value < low
    if not math.isfinite(value) or bad_low or value > high:
        bound = f"{'>' if open_low else '≥'} {low:g}" + (f" and ≤ {high:g}" if math.isfinite(high) else "")
        raise BadInputError(f"{what} {value} must be a finite number {bound}", example or f"e.g. {what} 1")
    return value


def byte_size(text: str | None, what: str) -> int | None:
    """Bytes from `67108864`, `64MiB`, `64M`, `512k`, `1G` (k/M/G are powers of 1024, as Triton's
    sizes are counted)."""
    import re

    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d{1,15})\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*", text, re.IGNORECASE)
    if not m:
        raise BadInputError(f"{what} {text!r} is not a size in bytes",
                            f"e.g. {what} 64MiB or {what} 67108864")
    unit = (m.group(2) or "b")[0].lower()
    return int(m.group(1)) * 1024 ** "bkmg".index(unit)




def write_json(report: dict, target: str) -> None:
    """`--json -` prints to stdout; `--json FILE` writes FILE atomically (a stream such as
    /dev/stdout or a FIFO is written through). Strict JSON: a NaN or inf figure is written as
    null and listed under "nonfinite_fields"."""
    found: list[str] = []
    report = json_safe(report, found=found)
    if found:
        report["nonfinite_fields"] = found
    text = json.dumps(report, indent=2, default=str, allow_nan=False)
    if target == "-":
        typer.echo(text)
        return
    atomic_write_text(Path(target), text + "\n")


Arch = Annotated[str | None, typer.Option("--arch", help=f"{'|'.join(ARCH_NAMES)}; default: "
                                             "args.arch of the checkpoint, else its shapes.")]


FamilyOpt = Annotated[str | None, typer.Option("--family", metavar="|".join(METHODS), help="Read the "
                                               "checkpoint as this token-reduction family. Default: "
                                               "what its keys and training args say (EViT: args "
                                               "model *_shrink*, base_keep_rate, drop_loc; DynamicViT: "
                                               "score_predictor.* weights; else IdleViT).")]


Keep = Annotated[float | None, typer.Option("--keep", help="Keep rate r in (0, 1]; default: "
                                               "args.base_rate of the checkpoint.")]


Schedule = Annotated[str, typer.Option("--schedule", help="eval: idle layers 3..11 with "
                                       "r,r,r,r²,r²,r²,r³,r³,r³ (official eval script); train: 4..11 "
                                       "(official training script). DeiT only: LV-ViT has one "
                                       "(S: 4..15, M: 5..19).")]


IdleLayers = Annotated[str | None, typer.Option("--idle-layers", metavar="L,L,...", help="Explicit "
                                                   "idle layers, e.g. 3,4,5; they keep r, r, r, r², r², "
                                                   "r², … of the tokens (groups of three, as in the "
                                                   "official scripts; LV-ViT-S/M: four/five).")]


KeepK = Annotated[str | None, typer.Option("--keep-k", metavar="K,K,...", help="Explicit patch "
                                              "tokens kept per idle layer, e.g. 137,137,96.")]


Ema = Annotated[bool, typer.Option("--ema", help="Use the checkpoint's EMA weights (model_ema).")]


JsonOut = Annotated[str | None, typer.Option("--json", metavar="FILE", help="Write the report as "
                                                "JSON to FILE ('-': stdout, and progress lines off).")]


Threads = Annotated[int | None, typer.Option("--threads", metavar="N", help="CPU threads for torch "
                                                "and ONNX Runtime (default: all usable cores).")]


QUIET = {"on": False}  # --quiet, or --json - (stdout is the report): no progress lines
PIPED_WIDTH = 200  # tables printed to a file or pipe: wide enough that no number is cut


def _console(stderr: bool):
    import os

    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(stderr=stderr, width=PIPED_WIDTH)
    return console


def report_console(json_out: str | None):
    """The console a command prints its tables to: stderr when `--json -` makes stdout the JSON
    report (so stdout stays pure JSON), else stdout; never narrower than the tables when piped."""
    return _console(stderr=json_out == "-")


class _LineStatus:
    """Progress where stderr is not a terminal (a log, CI): a step that lasts over a second gets
    a line, and then so does each update (bench's "run 2/5", ...) that lasts over half a second,
    so no counter seems to jump; quicker updates get one at most every few seconds, so it is never
    silent; a quick step (or one that fails at once) prints nothing, so errors stay one line."""

    AFTER_S = 1.0
    UPDATE_AFTER_S = 0.5
    EVERY_S = 5.0

    def __init__(self, console, message: str):
        import threading

        self.console, self.message, self.last, self.timer = console, message, None, None
        self.lock, self.shown, self.step = threading.Lock(), False, 0

    def __enter__(self):
        import time

        self.start = time.monotonic()
        self._arm(self.AFTER_S)
        return self

    def __exit__(self, *exc):
        with self.lock:
            self.timer.cancel()
            self.shown = True  # a timer already past its cancel point prints nothing
        return False

    def _arm(self, after_s: float) -> None:
        """The current message gets its line if nothing replaces it within `after_s`."""
        import threading

        if self.timer is not None:
            self.timer.cancel()
        self.step += 1
        self.timer = threading.Timer(after_s, self._due, args=(self.step,))
        self.timer.daemon = True
        self.timer.start()

    def _due(self, step: int) -> None:
        with self.lock:
            if step == self.step and not self.shown:
                self._print()

    def _print(self) -> None:
        import time

        self.console.print(f"· {self.message}", highlight=False)
        self.last, self.shown = time.monotonic(), True

    def update(self, message: str) -> None:
        import time

        with self.lock:
            self.message, self.shown = message, False
            now = time.monotonic()
            if now - self.start >= self.AFTER_S and (self.last is None or now - self.last >= self.EVERY_S):
                self._print()
            else:
                self._arm(max(self.UPDATE_AFTER_S, self.AFTER_S - (now - self.start)))


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, message: str) -> None:
        pass


def status(message: str):
    """Progress on stderr for a step that may take more than a second: a spinner on a terminal,
    plain lines otherwise, nothing with --quiet or --json -."""
    if QUIET["on"]:
        return _Silent()
    console = _console(stderr=True)
    return console.status(message) if console.is_terminal else _LineStatus(console, message)
