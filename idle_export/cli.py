"""`idle-export`: thin Typer commands over the library. Heavy imports live inside commands."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import EXIT_INTERNAL, BadInputError, IdleExportError
from .fileio import atomic_write_text

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
                    from .export import check_output_path

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


# ----------------------------------------------------------------------------- commands
@command("onnx")
def onnx_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="IdleViT checkpoint (.pth or .safetensors).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="ONNX file to write "
                                                   "(default: CHECKPOINT_idle.onnx / _dense.onnx).")] = None,
    arch: Arch = None,
    keep: Keep = None,
    schedule: Schedule = "eval",
    idle_layers: IdleLayers = None,
    keep_k: KeepK = None,
    ema: Ema = False,
    dense: Annotated[bool, typer.Option("--dense", help="Export the dense baseline (every token "
                                        "in every layer) from the same weights.")] = False,
    emit_selection: Annotated[bool, typer.Option("--emit-selection", help="Add the kept token "
                                                 "indices of each idle layer as outputs.")] = False,
    scores: Annotated[str, typer.Option("--scores", help="folded (default): rank by xn·(Wkᵀq), "
                                        "keys only for kept tokens, the same top-K; official: keys "
                                        "for every token, as in the paper's code.")] = "folded",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (≥17).")] = 18,
    external_data: Annotated[bool, typer.Option("--external-data", help="Write weights to "
                                                "OUTPUT.data instead of embedding them.")] = False,
    json_out: JsonOut = None,
):
    """Export a checkpoint to ONNX with the idle path (TopK + GatherElements + ScatterElements)."""
    from .checkpoint import load_checkpoint
    from .config import SCORE_MODES
    from .export import check_output_path, export_checkpoint, onnx_summary

    if scores not in SCORE_MODES:
        raise BadInputError(f"--scores {scores!r} is not one of {', '.join(SCORE_MODES)}",
                            "use --scores official or --scores folded")
    if output is None:
        output = checkpoint.with_name(f"{checkpoint.stem}_{'dense' if dense else 'idle'}.onnx")
    check_output_path(output)
    with _status(f"loading {checkpoint.name}"):
        ckpt = load_checkpoint(checkpoint, ema=ema)
        spec = _spec(ckpt, arch, keep, schedule, idle_layers, keep_k)
    with _status(f"exporting {spec.describe()}{' dense' if dense else ''} to {output}"):
        export_checkpoint(ckpt, spec, output, dense=dense, emit_selection=emit_selection,
                          score_mode=scores, opset=opset, external_data=external_data)
    summary = onnx_summary(output)
    what = (f"dense baseline of {spec.arch}" if dense else
            f"{spec.describe()}; {scores} scores, {summary['ops'].get('TopK', 0)} TopK")
    _err(f"wrote {output} ({what}; opset {summary['opset']}"
         f"{'; weights in ' + output.name + '.data' if external_data else ''})")
    if json_out:
        write_json({"spec": spec.describe(), "dense": dense, **summary}, json_out)


@command("check")
def check_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX file written by `idle-export onnx` (or "
                                          "`idle-export calibrate`), or a TensorRT engine (GPU).")],
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="Compare against torch built "
                                                 "from this checkpoint.")] = None,
    against: Annotated[Path | None, typer.Option("--against", help="Compare against another "
                                                    "ONNX file (the reference).")] = None,
    ema: Ema = False,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes to test.")] = "1,7,32",
    inputs: Annotated[str | None, typer.Option("--inputs", help="Input sets: noise (seeded), photos "
                                                  "(skimage.data photos, timm eval transform). Default: "
                                                  "noise,photos; none with --images.")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Real images (folder, .txt list "
                                                   "or file; timm eval transform), all run at each "
                                                   "batch size. DIR/<class>/x.png with the model's "
                                                   "class names also reports accuracy.")] = None,
    num: Annotated[int, typer.Option("--num", help="How many of --images (0: all).")] = 0,
    max_abs: Annotated[float | None, typer.Option("--max-abs", help="Logit tolerance (default "
                                                     "from the model's precision: fp32 1e-4, fp16 "
                                                     "5e-2, int8 none; int8 needs top-1 ≥ 99%).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Threads = None,
    json_out: JsonOut = None,
):
    """Parity of an ONNX file against torch or another ONNX: exit 1 when outside tolerance."""
    from .parity import check_onnx

    sizes = _int_list(batch, "--batch") or []
    if not sizes or min(sizes) < 1:
        raise BadInputError(f"--batch {batch!r} needs positive sizes", "e.g. --batch 1,7,32")
    if inputs is None:
        inputs = "" if images is not None else "noise,photos"
    sets = [s for s in inputs.replace(" ", "").split(",") if s]
    unknown = [s for s in sets if s not in ("noise", "photos")]
    if unknown or (not sets and images is None):
        raise BadInputError(f"--inputs {inputs!r}: unknown set {', '.join(unknown) or '(none)'}",
                            "use noise, photos or noise,photos (or --images DIR)")
    if model.suffix in (".engine", ".plan"):
        from .engine import check_engine_against

        if against is None or ckpt is not None or images is not None:
            raise BadInputError(f"{model.name} is a TensorRT engine: it is checked against the ONNX "
                                "it was built from", f"idle-export check {model.name} --against MODEL.onnx")
        with _status(f"checking {model.name} against {against.name}"):
            report = check_engine_against(model, against, batch_sizes=sizes, input_sets=sets or ["noise"],
                                          seed=seed, threads=_threads(threads))
    else:
        with _status(f"checking {model.name}"):
            report = check_onnx(model, ckpt_path=ckpt, against=against, ema=ema, batch_sizes=sizes,
                                input_sets=sets, seed=seed, threads=_threads(threads), images=images,
                                num=num, max_abs=max_abs)
    console = report_console(json_out)
    print_check(report, console)
    print_check_details(report, console)
    if json_out:
        write_json(report, json_out)
    if not report["passed"]:
        raise typer.Exit(1)


def print_check_details(report: dict, console) -> None:
    """Token-selection agreement per idle layer, and accuracy where labels are known."""
    from rich.table import Table

    cases = [c for c in report["cases"] if c.get("selection_per_layer")]
    if cases:
        layers = list(cases[0]["selection_per_layer"])
        table = Table(title="token-selection agreement per idle layer (same kept set, ties counted)")
        table.add_column("inputs")
        table.add_column("batch", justify="right")
        for layer in layers:
            table.add_column(f"L{layer}", justify="right")
        for c in cases:
            table.add_row(c["inputs"], str(c["batch"]),
                          *[f"{c['selection_per_layer'].get(k, float('nan')):.1%}" for k in layers])
            if "selection_overlap_per_layer" in c:
                table.add_row("  kept-token overlap", "",
                              *[f"{c['selection_overlap_per_layer'].get(k, float('nan')):.1%}"
                                for k in layers])
        console.print(table)
    for c in report["cases"]:
        acc = c.get("accuracy")
        if acc:
            console.print(f"accuracy on {c.get('images', '?')} labelled {c['inputs']} (batch {c['batch']}): "
                          f"candidate {acc['candidate']:.2%}, reference {acc['reference']:.2%}, "
                          f"drop {acc['drop'] * 100:+.2f} points")


def print_check(report: dict, console) -> None:
    from rich.table import Table

    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    table = Table(title=f"{report['a']}  vs  {report['b']}  ({report.get('model', '')})")
    for col in ("inputs", "batch", "max abs", "max rel", "cos min", "top-1", "top-5", "selection",
                "ties", "verdict"):
        table.add_column(col, justify="right" if col not in ("inputs", "verdict") else "left")
    for c in report["cases"]:
        sel = f"{c['selection']:.2%}" if "selection" in c else "-"
        table.add_row(c["inputs"], str(c["batch"]), f"{c['max_abs']:.2e}", f"{c['max_rel']:.2e}",
                      f"{c['cosine_min']:.7f}", f"{c['top1']:.0%}", f"{c['top5']:.0%}", sel,
                      str(c.get("selection_ties", "-")),
                      "[green]ok[/]" if c["passed"] else "[red]" + "; ".join(c["failures"]) + "[/]")
    console.print(table)
    console.print("[green]PASSED[/]" if report["passed"] else "[red]FAILED[/]")


@command("demo")
def demo_cmd(
    output: Annotated[Path, typer.Option("-o", "--output",
                                         help="Folder for the demo files.")] = Path("demo_out"),
    arch: Annotated[str, typer.Option("--arch", help="Architecture of the demo model.")] = "deit_small",
    keep: Annotated[float, typer.Option("--keep", help="Keep rate of the demo model.")] = 0.7,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes to check.")] = "1,7,32",
    json_out: JsonOut = None,
):
    """Seeded IdleViT checkpoint (official training format) → idle and dense ONNX → checks."""
    from .demo import run_demo

    sizes = _int_list(batch, "--batch") or [1]
    report = run_demo(output, arch=arch, keep_rate=keep, batch_sizes=sizes, status=_status)
    print_demo(report, report_console(json_out))
    if json_out:
        write_json(report, json_out)
    if not report["passed"]:
        raise typer.Exit(1)


def print_demo(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"idle-export demo: {report['model']}")
    for col in ("file", "TopK", "GMACs", "max abs", "top-1", "selection", "check"):
        table.add_column(col)
    for row in report["rows"]:
        sel = "-" if row["selection"] is None else f"{row['selection']:.0%}"
        table.add_row(Path(row["file"]).name, str(row["topk"]), f"{row['gmacs']:.2f}",
                      f"{row['max_abs']:.1e}", f"{row['top1']:.0%}", sel,
                      "[green]ok[/]" if row["passed"] else "[red]FAILED[/]")
    console.print(table)
    console.print(f"K per idle layer: {report['keep_k']}; {report['scores']} scores; FLOP ideal "
                  f"speed-up {report['ideal']:.2f}x; files in {report['folder']}")


# Commands of the later pipeline steps live in idle_export/commands/ (one module each).
from . import commands  # noqa: E402,F401  (registers them on `app`)


def run():
    """Console-script entry point."""
    app()

