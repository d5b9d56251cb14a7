"""`idle-export show`: a PNG of the patch tokens each idle layer keeps, image by image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export import api
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
from idle_export.explore.show import DEFAULT_MAX_IMAGES


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

    with status(f"running {model.name}"):
        report = api.show(model, images or None, output, layers=int_list(layers, "--layers"),
                          max_images=max_images, arch=arch, keep=keep, schedule=schedule, ema=ema,
                          threads=threads)
    predicted = ", ".join(f"{p['image']}: {p['label']}" for p in report["predicted"])
    echo_err(f"wrote {output} ({len(report['images'])} image(s) × {len(report['layers'])} idle layer(s), "
             f"{report['runtime']}; {report['model']})")
    echo_err(f"predicted: {predicted}")
    skipped = report["skipped"]
    if skipped:
        echo_err(f"warning: skipped {len(skipped)} unreadable file(s), e.g. {skipped[0][0]} "
                 f"({skipped[0][1]})")
