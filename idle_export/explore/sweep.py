"""`idle-export sweep`: one checkpoint at many keep ratios, measured on the user's images.

One elastic ONNX (`onnx --elastic`: K computed in the graph from a keep_rate input, the
checkpoint's schedule) is exported once, with the dense twin; each ratio runs that one file at
its rate, on the images: top-1 agreement with the dense model (the same weights exported dense, on
the same runtime), accuracy where the images carry labels, the FLOP model's GMACs (folded scores,
as exported), and images/s per batch size. Timing is bench's loop (bench.timing.bench_batch):
each ratio is timed interleaved with the dense model, so drift of a shared machine hits both; the
dense figures reported are the medians over those pairings.

Labels: an ImageFolder layout (every image in DIR/<class>/, <class> one of args.classes) or the
built-in photos when the checkpoint's classes name them; a class folder that is not one of the
checkpoint's classes is an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from idle_export import __version__
from idle_export.bench.timing import bench_batch
from idle_export.bench.variants import Variant
from idle_export.data.images import CalibrationImages, ImagesSkippedWarning, load_images
from idle_export.data.inputs import PHOTO_NAMES
from idle_export.errors import BadInputError
from idle_export.hardware import default_threads, environment
from idle_export.model.families import family_of
from idle_export.onnx.export import export_checkpoint
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.parity.compare import labels_from_folders
from idle_export.runtime import registry

DEFAULT_BUILTIN = 100  # views of the built-in photos when no --images is given
CHUNK = 32  # images per call when measuring agreement


def sweep_images(source: Path | None, num: int, spec, classes: list[str] | None, *, seed: int = 0
                 ) -> tuple[CalibrationImages, np.ndarray | None, str]:
    """The images, their labels (or None) and a note on where the labels came from."""
    if source is None:
        n = num or DEFAULT_BUILTIN
        images = load_images(None, n, spec, seed=seed)
        if classes and all(name in classes for name in PHOTO_NAMES):  # view i shows photo i % 10
            labels = np.asarray([classes.index(PHOTO_NAMES[i % len(PHOTO_NAMES)]) for i in range(n)])
            return images, labels, "built-in photos, labelled by the checkpoint's classes"
        return images, None, "built-in photos; the checkpoint's classes do not name them"
    with warnings.catch_warnings():  # unreadable files are in images.skipped (and the report)
        warnings.simplefilter("ignore", ImagesSkippedWarning)
        images = load_images(source, num, spec, seed=seed, what="images=")
    root = Path(source)
    if not root.is_dir():
        return images, None, "not an image folder: no labels"
    parents = {Path(f).parent for f in images.files}
    if not all(p.parent == root for p in parents):  # images in DIR itself or deeper: not ImageFolder
        return images, None, "not an ImageFolder layout (DIR/<class>/image): no labels"
    if not classes:
        return images, None, "the checkpoint has no class names (args.classes): no accuracy"
    unknown = sorted(p.name for p in parents if p.name not in classes)
    if unknown:
        shown = ", ".join(classes[:6]) + (", …" if len(classes) > 6 else "")
        raise BadInputError(f"class folder {root / unknown[0]} is not one of the checkpoint's "
                            f"{len(classes)} classes" + (f" (nor are {len(unknown) - 1} more)"
                                                        if len(unknown) > 1 else ""),
                            f"name the class folders after args.classes ({shown}), or put the images "
                            "directly in the folder to measure agreement only")
    return images, labels_from_folders(images.files, classes), "ImageFolder labels"


def check_backend(backend: str) -> str:
    """The backend name, checked before any work: a runtime of runtime.registry that runs ONNX
    files (exit 2 otherwise), installed and usable here (exit 3 otherwise)."""
    return registry.get(backend, runs=registry.ONNX).require().name


def make_runner(backend: str, path: Path, *, threads: int | None, optimize: bool,
                keep_rate: float | None = None):
    """A Runner for an ONNX file on the sweep's backend (an elastic file at `keep_rate`);
    `optimize`: the passes of the backend's export target the file lacks, in memory."""
    return registry.get(backend, runs=registry.ONNX).runner(path, threads=threads, optimize=optimize,
                                                            keep_rate=keep_rate)


def export_or_reuse(ckpt, spec, path: Path, *, dense: bool = False, elastic: bool = False) -> Path:
    """Export the checkpoint at `spec` to `path`, unless `path` already holds that very export
    (an earlier sweep's --onnx-dir): same checkpoint weights, spec, dense flag, score mode, FP32,
    and form (elastic or fixed K)."""
    if path.is_file():
        try:
            meta = OnnxMetadata.read(path)
            same = (meta.has_spec and meta.spec == spec and meta.dense == dense
                    and meta.get("checkpoint_sha256") == ckpt.sha256
                    and meta.get("checkpoint_weights") == ckpt.source
                    and meta.score_mode == ("official" if dense else family_of(spec.arch).scores(None))
                    and meta.precision == "fp32"
                    and (meta.elastic is not None) == elastic)
        except BadInputError:  # not an ONNX file, or unreadable metadata: export over it
            same = False
        if same:
            return path
    return export_checkpoint(ckpt, spec, path, dense=dense, elastic=elastic)


def predict(runner, images: np.ndarray) -> np.ndarray:
    """Logits of every image, CHUNK at a time."""
    return np.concatenate([runner.infer({"images": images[i:i + CHUNK]})["logits"]
                           for i in range(0, len(images), CHUNK)])


def _feed(images: np.ndarray, batch: int) -> dict:
    """A batch of `batch` images (the set repeated when it is smaller)."""
    return {"images": np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))}


def run_sweep(ckpt, spec_for: Callable[[float], object], ratios: list[float], *, batches: list[int],
              images: CalibrationImages, labels: np.ndarray | None, workdir: Path,
              backend: str = "ort", threads: int | None = None, runs: int = 3, warmup: int = 2,
              min_time: float = 0.5, optimize: bool = True, label_note: str = "",
              progress: Callable[[float, str], None] | None = None,
              on_row: Callable[[dict], None] | None = None) -> dict:
    """Run and time the checkpoint at every ratio; the report (see the module docstring).
    `spec_for(r)` is the ModelSpec at keep ratio r; the two ONNX files (elastic, dense) go to
    `workdir`, where identical exports from an earlier sweep are reused (export_or_reuse).
    `progress(done, message)`: `done` ratios finished (fractions within one), message "" when a
    ratio has just finished; `on_row(row)` gets each ratio's figures when they are known."""
    if not batches or min(batches) < 1:
        raise BadInputError(f"batches={batches} needs positive sizes", "e.g. batches=1,64")
    if runs < 1 or warmup < 0 or min_time <= 0:
        raise BadInputError("runs= must be ≥ 1, warmup= ≥ 0, min_time= > 0", "e.g. runs=3")
    batches = list(dict.fromkeys(batches))
    threads = threads or default_threads()
    step = progress or (lambda done, msg: None)
    base = spec_for(1.0)  # the dense export's spec (its K are unused)
    stem = Path(ckpt.path).stem
    x = images.array
    env = environment(threads)
    with contextlib.ExitStack() as stack:
        step(0, "exporting the dense model")
        dense_path = export_or_reuse(ckpt, base, workdir / f"{stem}_dense.onnx", dense=True)
        dense_runner = stack.enter_context(make_runner(backend, dense_path, threads=threads,
                                                       optimize=optimize))
        dense_logits = predict(dense_runner, x)
        dense_top1 = dense_logits.argmax(1)
        dense_runs: dict[int, list[dict]] = {b: [] for b in batches}
        rows = []
        default = ckpt.keep_rate if ckpt.keep_rate is not None and 0 < ckpt.keep_rate <= 1 else max(ratios)
        elastic = family_of(base.arch).elastic  # else (EViT, DynamicViT) one fixed-K file per ratio
        path = None
        if elastic:
            step(0, "exporting the elastic model (every ratio runs it)")
            path = export_or_reuse(ckpt, spec_for(default), workdir / f"{stem}_idle_elastic.onnx",
                                   elastic=True)
        for i, r in enumerate(ratios):
            spec = spec_for(r)
            step(i, f"keep {r:g}: K {','.join(map(str, spec.keep_k))}")
            if not elastic:
                path = export_or_reuse(ckpt, spec, workdir / f"{stem}_idle_r{r:g}.onnx")
            with make_runner(backend, path, threads=threads, optimize=optimize,
                             keep_rate=r if elastic else None) as runner:
                step(i + 0.3, f"keep {r:g}: {len(x)} images")
                logits = predict(runner, x)
                row = {
                    "keep_rate": r,
                    "k_per_layer": {str(layer): k for layer, k in spec.k_by_layer.items()},
                    "gmacs": spec.macs(folded_scores=True) / 1e9,
                    "agreement": float(np.mean(logits.argmax(1) == dense_top1)),
                    "accuracy": None if labels is None else float(np.mean(logits.argmax(1) == labels)),
                    "max_abs_logit_diff": float(np.max(np.abs(logits.astype(np.float64) - dense_logits))),
                    "images_per_s": {}, "latency_ms": {}, "speedup_vs_dense": {}, "spread": {},
                    "file": path.name,
                }
                for j, bs in enumerate(batches):
                    step(i + 0.4 + 0.6 * j / len(batches), f"keep {r:g}: timing batch {bs} (with dense)")
                    idle_v = Variant(backend, f"keep {r:g}", runner=runner)
                    dense_v = Variant(backend, "dense", dense=True, runner=dense_runner)
                    bench_batch([idle_v, dense_v], _feed(x, bs), bs, runs=runs, warmup=warmup,
                                min_time=min_time)
                    got, ref = idle_v.results[bs], dense_v.results[bs]
                    row["images_per_s"][str(bs)] = got["images_per_s"]
                    row["latency_ms"][str(bs)] = got["latency_ms"]["p50"]
                    row["speedup_vs_dense"][str(bs)] = got["images_per_s"] / ref["images_per_s"]
                    row["spread"][str(bs)] = got["spread"]  # (max - min) / median of the runs
                    if "cpu_ms_per_image" in got:  # CPU time: steadier than wall time on a busy machine
                        row.setdefault("cpu_ms_per_image", {})[str(bs)] = got["cpu_ms_per_image"]
                    dense_runs[bs].append(ref)
            rows.append(row)
            if on_row:
                on_row(row)
            step(i + 1, "")  # ratio i done
    def median(pick) -> dict:
        return {str(b): float(np.median([pick(d) for d in dense_runs[b]])) for b in batches}

    dense = {
        "gmacs": base.macs(dense=True) / 1e9,
        "accuracy": None if labels is None else float(np.mean(dense_top1 == labels)),
        "images_per_s": median(lambda d: d["images_per_s"]),
        "latency_ms": median(lambda d: d["latency_ms"]["p50"]),
        "spread": median(lambda d: d["spread"]),
        "file": dense_path.name,
    }
    if all("cpu_ms_per_image" in d for runs_ in dense_runs.values() for d in runs_):
        dense["cpu_ms_per_image"] = median(lambda d: d["cpu_ms_per_image"])
    with contextlib.suppress(OSError):
        env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "tool": f"idle-export {__version__} sweep",
        "model": f"{base.arch}, idle layers {','.join(map(str, base.idle_layers))}",
        "checkpoint": {"path": str(ckpt.path), "sha256": ckpt.sha256, "keep_rate": ckpt.keep_rate,
                       "classes": ckpt.classes is not None},
        "spec": {k: json.loads(v) for k, v in base.to_metadata().items()
                 if k.split(".", 1)[1] not in ("keep_rate", "keep_k")},
        "backend": backend,
        "images": {**images.summary(), "labels": labels is not None, "labels_from": label_note},
        "settings": {"ratios": ratios, "batch": batches, "runs": runs, "warmup": max(warmup, 1),
                     "min_time_s": min_time, "threads": threads,
                     "optimize": optimize,
                     "score_mode": "folded", "timing": "bench.timing.bench_batch, interleaved with dense",
                     "elastic": path.name if elastic else None},
        "environment": env,
        "results": rows,
        "dense": dense,
        "choice": None,
    }

