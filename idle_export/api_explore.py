"""The exploring half of the public API (`idle_export.api` re-exports every name): `show` (which
tokens each idle layer keeps) and `sweep` (keep ratios against agreement, accuracy and speed).
Errors name the parameters as these functions spell them (`max_images=`); the CLI prints its
flags instead."""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from idle_export.api_export import CheckpointLike, PathLike, _checkpoint, _no_progress, default_onnx_path
from idle_export.errors import BadInputError
from idle_export.explore.choose import DEFAULT_RATIOS, check_choice_options, choose_ratio, parse_ratios
from idle_export.explore.pareto import import_matplotlib, mark_front, plot_sweep
from idle_export.explore.picture import render, write_png
from idle_export.explore.show import DEFAULT_MAX_IMAGES, run_show
from idle_export.explore.sweep import check_backend, run_sweep, sweep_images
from idle_export.fileio import check_output_path, mkdir_hint
from idle_export.hardware import check_threads
from idle_export.onnx.export import export_checkpoint
from idle_export.onnx.io import check_batch_sizes


def show(model: PathLike, images: Sequence[PathLike] | None = None, output: PathLike | None = None, *,
         layers: Sequence[int] | None = None, max_images: int = DEFAULT_MAX_IMAGES,
         arch: str | None = None, keep: float | None = None, schedule: str = "eval", ema: bool = False,
         threads: int | None = None) -> dict:
    """Which patch tokens each idle layer keeps, image by image (`idle-export show`).

    `model`: a checkpoint (run in PyTorch; `arch`, `keep`, `schedule`, `ema` as in `model_spec`)
    or an ONNX file exported with `emit_selection=True` (run on ONNX Runtime). `images`: files or
    folders (default: the photos scikit-image ships), the first `max_images`; `layers`: the idle
    layers to draw (default all). `output`: a PNG to write, one row per image, kept patches
    bright (None: none). Returns the report: `images`, `layers`, `runtime`, `model`,
    `predicted` (class and probability per image), `skipped` (unreadable files and why).
    """
    if output is not None:
        if Path(output).suffix.lower() != ".png":
            raise BadInputError(f"output={output} is not a .png file", "e.g. output=selection.png")
        check_output_path(Path(output), "output=")
    sel = run_show(Path(model), [Path(p) for p in images] if images else None,
                   layers=None if layers is None else [int(x) for x in layers], max_images=max_images,
                   arch=arch, keep=keep, schedule=schedule, ema=ema, threads=check_threads(threads))
    if output is not None:
        write_png(render(sel), Path(output))
    return {"output": None if output is None else str(output), "images": list(sel.names),
            "layers": list(sel.kept), "runtime": sel.runtime, "model": sel.spec.describe(),
            "predicted": [{"image": n, "label": label, "prob": p}
                          for n, (label, p) in zip(sel.names, sel.predicted(), strict=True)],
            "skipped": [[str(f), why] for f, why in sel.skipped]}


def _ratios(ratios: Sequence[float] | str | None) -> list[float] | None:
    if ratios is None:
        return None
    return parse_ratios(ratios if isinstance(ratios, str) else ",".join(repr(float(r)) for r in ratios),
                        "ratios")


def sweep(checkpoint: CheckpointLike, *, images: PathLike | None = None, num: int = 0,
          ratios: Sequence[float] | str | None = None, batches: Sequence[int] = (1, 64),
          backend: str = "ort", threads: int | None = None, runs: int = 3, warmup: int = 2,
          min_time: float = 0.5, optimize: bool = True, arch: str | None = None, schedule: str = "eval",
          idle_layers: Sequence[int] | None = None, ema: bool = False, latency_ms: float | None = None,
          min_agreement: float | None = None, output: PathLike | None = None,
          onnx_dir: PathLike | None = None, seed: int = 0, plot: PathLike | None = None,
          progress=None, on_ratio: Callable[[float, int, str], None] | None = None,
          on_row: Callable[[dict], None] | None = None, on_note: Callable[[str], None] | None = None) -> dict:
    """Keep ratios against top-1 agreement with dense, accuracy, GMACs and images/s
    (`idle-export sweep`); optionally pick one and export it.

    `images`: a folder (DIR/<class>/… adds accuracy) or a .txt list, `num` of them (0: all;
    default 100 views of the built-in photos). `ratios`: a list, or "start:stop:step" / "a,b,c"
    (default 0.5 to 1 by 0.1 and the checkpoint's own). `batches`: the batch sizes timed on
    `backend` (a runtime of `runtimes()` that runs ONNX files), `runs` timed runs of at least
    `min_time` s after `warmup` calls; `optimize` applies the backend target's passes in memory.
    Picking: `latency_ms` (with one batch size: the best agreement within the budget) and/or
    `min_agreement` (the fastest ratio that agrees enough); the pick is exported to `output`
    (default CHECKPOINT_idle_rR.onnx). `onnx_dir` keeps every export (and reuses them).
    `plot`: a PNG of agreement against images/s (the `plot` extra). Callbacks: `progress(message)`
    a context manager around loading and the pick's export; `on_ratio(done, total, message)` the
    ratios done (fractions within one; message "" as one finishes); `on_row(row)` each ratio's
    figures; `on_note(line)` skipped images.
    Returns the report: `results` (one row per ratio, `pareto` marked), `choice` (None without a
    constraint; `met` False when no ratio meets it, and then nothing is exported).
    """
    sizes = check_batch_sizes(batches, "batches", "1,64")
    choosing = latency_ms is not None or min_agreement is not None
    check_choice_options(sizes, latency_ms=latency_ms, min_agreement=min_agreement)
    if output is not None and not choosing:
        raise BadInputError("output= writes the picked ratio's ONNX, but nothing says how to pick",
                            "add latency_ms=X batches=N or min_agreement=A")
    if num < 0:
        raise BadInputError(f"num={num} must be ≥ 0", "e.g. num=200 (0: all images)")
    if not (math.isfinite(min_time) and min_time > 0) or runs < 1 or warmup < 0:
        raise BadInputError("runs= must be ≥ 1, warmup= ≥ 0, min_time= > 0", "e.g. runs=3")
    check_backend(backend)
    threads = check_threads(threads)
    wanted = _ratios(ratios)
    if output is not None:
        check_output_path(Path(output), "output=")
    if plot is not None:
        check_output_path(Path(plot), "plot=")
        import_matplotlib()  # missing: exit 3 now, not after the sweep
    if onnx_dir is not None and not Path(onnx_dir).is_dir():
        raise BadInputError(f"onnx_dir={onnx_dir} is not a folder", mkdir_hint(Path(onnx_dir)))
    step = progress or _no_progress
    name = Path(getattr(checkpoint, "path", checkpoint)).name
    with step(f"loading {name}"):
        ckpt = _checkpoint(checkpoint, ema)
        if choosing and output is None:  # the default CHECKPOINT_idle_rR.onnx goes beside it
            check_output_path(default_onnx_path(ckpt.path), "output=")
        layers = None if idle_layers is None else [int(x) for x in idle_layers]

        def spec_for(r: float):
            return ckpt.spec(arch=arch, keep_rate=r, schedule=schedule, idle_layers=layers)

        base = spec_for(1.0)
        if wanted is None:
            wanted = parse_ratios(DEFAULT_RATIOS)
            if ckpt.keep_rate is not None and 0 < ckpt.keep_rate <= 1:
                wanted = sorted(set(wanted) | {ckpt.keep_rate})
        for r in wanted:
            spec_for(r)  # a ratio too small for some idle layer fails here, before any export
        imgs, labels, note = sweep_images(None if images is None else Path(images), num, base, ckpt.classes,
                                          seed=seed)
    if imgs.skipped and on_note:
        on_note(f"warning: skipped {len(imgs.skipped)} unreadable file(s) in {imgs.source}, e.g. "
                f"{imgs.skipped[0][0]} ({imgs.skipped[0][1]})")
    told = None if on_ratio is None else (lambda done, message: on_ratio(done, len(wanted), message))
    report = _run(ckpt, spec_for, wanted, sizes, imgs, labels, note, backend, threads, runs, warmup,
                  min_time, optimize, None if onnx_dir is None else Path(onnx_dir), told, on_row)
    report["choice"] = None
    if choosing:
        choice = choose_ratio(report["results"], report["settings"]["batch"], latency_ms=latency_ms,
                              min_agreement=min_agreement)
        report["choice"] = choice.to_json()
        if choice.met:
            r = choice.row["keep_rate"]
            target = Path(output) if output is not None else ckpt.path.with_name(
                f"{ckpt.path.stem}_idle_r{r:g}.onnx")
            with step(f"exporting keep {r:g} to {target}"):  # the fixed-K file of the pick
                export_checkpoint(ckpt, spec_for(r), target)
            report["choice"]["file"] = str(target)
    if plot is not None:
        plot_sweep(report, Path(plot))
    return report


def _run(ckpt, spec_for, ratios, sizes, imgs, labels, note, backend, threads, runs, warmup, min_time,
         optimize, onnx_dir, on_ratio, on_row) -> dict:
    """The sweep in `onnx_dir` (else a temporary folder, removed after), the Pareto front marked."""
    workdir = onnx_dir or Path(tempfile.mkdtemp(prefix="idle-export-sweep-"))
    try:
        report = run_sweep(ckpt, spec_for, ratios, batches=sizes, images=imgs, labels=labels,
                           workdir=workdir, backend=backend, threads=threads, runs=runs,
                           warmup=warmup, min_time=min_time, optimize=optimize, label_note=note,
                           progress=on_ratio, on_row=on_row)
        mark_front(report)
        return report
    finally:
        if onnx_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
