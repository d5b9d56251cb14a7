"""`idle-export show`: a PNG of the patch tokens each idle layer keeps, image by image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export.cli.app import command
from idle_export.cli.options import (
    Arch,
    Ema,
    Keep,
    Schedule,
    Threads,
    echo_err,
    int_list,
    status,
)
from idle_export.errors import BadInputError
from idle_export.explore.picture import render, write_png
from idle_export.explore.show import DEFAULT_MAX_IMAGES, run_show
from idle_export.fileio import check_output_path
from idle_export.hardware import check_threads


@command("show")
def show_cmd(
    model: Annotated[Path, typer.Argument(help="A checkpoint (run in PyTorch), or an ONNX file "
                                          "exported with --emit-selection (run on ONNX Runtime).")],
    images: Annotated[list[Path] | None, typer.Argument(help="Image files or folders (default: the "
                                                        "photos that scikit-image ships).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG to write.")] = Path("selection.png"),
    layers: Annotated[str | None, typer.Option("--layers", metavar="L,L,...", help="Idle layers to "
                                               "draw, e.g. 3,6,9 (default: all).")] = None,
    max_images: Annotated[int, typer.Option("--max-images", help="Rows: the first N images.")
                          ] = DEFAULT_MAX_IMAGES,
    arch: Arch = None,
    keep: Keep = None,
    schedule: Schedule = "eval",
    ema: Ema = False,
    threads: Threads = None,
):
    """Draw which patch tokens each idle layer keeps: one row per image, kept patches bright."""

    if output.suffix.lower() != ".png":
        raise BadInputError(f"-o {output} is not a .png file", "e.g. -o selection.png")
    check_output_path(output)
    wanted = int_list(layers, "--layers")
    with status(f"running {model.name}"):
        sel = run_show(model, images or None, layers=wanted, max_images=max_images, arch=arch, keep=keep,
                       schedule=schedule, ema=ema, threads=check_threads(threads))
        write_png(render(sel), output)
    predicted = ", ".join(f"{name}: {label}" for name, (label, _) in zip(sel.names, sel.predicted()))
    echo_err(f"wrote {output} ({len(sel.names)} image(s) × {len(sel.kept)} idle layer(s), "
             f"{sel.runtime}; {sel.spec.describe()})")
    echo_err(f"predicted: {predicted}")
    if sel.skipped:
        echo_err(f"warning: skipped {len(sel.skipped)} unreadable file(s), e.g. {sel.skipped[0][0]} "
                 f"({sel.skipped[0][1]})")
