"""`idle-export show`: which patch tokens each idle layer keeps, image by image.

MODEL is a checkpoint or an ONNX file exported with `--emit-selection`:
  * a checkpoint runs in eager PyTorch (the paper's score formulation, keys for every token);
  * an ONNX file runs on ONNX Runtime, and its own `selection_layer{L}` outputs ([B, K+1], CLS
    first) say what was kept: the picture shows what the deployed file does.
EViT and DynamicViT drop tokens: their outputs are [B, K] positions in the sequence the previous
drop layer left, mapped to patch numbers here (parity.compare.to_patch_ids; EViT's fused token
is no patch and is not drawn).
The result is a `Selection` (predictions and kept patch indices per idle layer); picture.py
draws it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from idle_export.data.images import ImagesSkippedWarning, list_image_files, load_images
from idle_export.data.inputs import PHOTO_NAMES, builtin_photos
from idle_export.errors import BadInputError
from idle_export.lazy import lazy_module
from idle_export.model.checkpoint import load_checkpoint
from idle_export.model.config import ModelSpec
from idle_export.onnx.io import SELECTION_PREFIX
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.parity.compare import to_patch_ids
from idle_export.runtime import registry

build = lazy_module("idle_export.model.build")  # torch

DEFAULT_MAX_IMAGES = 10
CHUNK = 16  # images per forward pass


@dataclass
class Selection:
    """What one model kept on some images."""

    images: np.ndarray  # preprocessed float32 [n, 3, H, W]
    names: list[str]  # one label per image (file name, or the photo's name)
    logits: np.ndarray  # [n, classes]
    kept: dict[int, np.ndarray]  # idle layer → int64 [n, K]: kept patch indices (0-based, CLS excluded)
    spec: ModelSpec
    classes: list[str] | None
    runtime: str  # "torch" or "onnxruntime"
    model_name: str
    skipped: list = field(default_factory=list)  # (file, reason) of images PIL could not read

    def predicted(self) -> list[tuple[str, float]]:
        """(class name, softmax probability) of each image's top-1 class."""
        z = self.logits.astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top = p.argmax(1)
        names = self.classes if self.classes and len(self.classes) == z.shape[1] else None
        return [(names[i] if names else f"class {i}", float(p[row, i])) for row, i in enumerate(top)]


def is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def show_images(paths: list[Path] | None, spec: ModelSpec,
                max_images: int = DEFAULT_MAX_IMAGES) -> tuple[np.ndarray, list[str], list]:
    """Preprocessed images, their names and the (file, reason) of unreadable ones: the files and
    folders given (folders searched, sorted; the first `max_images` files), or the scikit-image
    photos when none are given."""
    if max_images < 1:
        raise BadInputError(f"max_images={max_images} must be at least 1", "e.g. max_images=4")
    if not paths:
        n = min(max_images, len(PHOTO_NAMES))
        return builtin_photos(n, spec), list(PHOTO_NAMES[:n]), []
    files: list[Path] = []
    for p in paths:
        files += list_image_files(p)
    files = files[:max_images]
    with warnings.catch_warnings():  # unreadable files are reported with the result
        warnings.simplefilter("ignore", ImagesSkippedWarning)
        loaded = load_images([str(f) for f in files], 0, spec, cache_dir=False, what="IMAGES")
    return loaded.array, [Path(f).name for f in loaded.files], loaded.skipped


def check_layers(layers: list[int] | None, spec: ModelSpec) -> list[int]:
    """The idle layers to draw (all when None), each one checked against the model's."""
    idle = list(spec.idle_layers)
    if not idle:
        raise BadInputError("the model has no idle layers (it is the dense baseline)",
                            "show an idle model: a checkpoint, or an idle export made with "
                            "`idle-export onnx CKPT --emit-selection`")
    if layers is None:
        return idle
    if not layers:
        raise BadInputError(f"layers={layers} names no layer", f"e.g. layers={','.join(map(str, idle[::3]))}")
    bad = [layer for layer in layers if layer not in idle]
    if bad:
        raise BadInputError(f"layer {bad[0]} is not an idle layer of this model "
                            f"(idle layers: {','.join(map(str, idle))})",
                            f"choose layers= among {','.join(map(str, idle))}")
    return list(dict.fromkeys(layers))


def _patch_indices(raw: np.ndarray, k: int, name: str) -> np.ndarray:
    """Kept patch indices [n, K] from a selection output: [n, K+1] with CLS (0) first."""
    raw = np.asarray(raw, dtype=np.int64)
    if raw.ndim != 2 or raw.shape[1] != k + 1 or np.any(raw[:, 0] != 0):
        raise BadInputError(f"the output {name} has shape {list(raw.shape)}, not [batch, {k + 1}] with "
                            "the CLS token first",
                            "re-export the model with `idle-export onnx CKPT --emit-selection`")
    return raw[:, 1:] - 1


def _kept_patches(spec: ModelSpec, outputs: list, names: list[str]) -> list[np.ndarray]:
    """Kept patch indices [n, K] per idle layer from the selection outputs named `names`:
    IdleViT's [n, K+1] (CLS first), or a dropping family's positions as patch numbers."""
    if spec.drops_tokens:
        raw = {n: np.asarray(o, dtype=np.int64) for n, o in zip(names, outputs, strict=True)}
        mapped, _ = to_patch_ids(raw, None, spec)
        return [mapped[n] for n in names]
    return [_patch_indices(o, k, n) for o, k, n in zip(outputs, spec.keep_k, names, strict=True)]


def select_checkpoint(ckpt, spec: ModelSpec, images: np.ndarray) -> tuple[np.ndarray, dict]:
    """Logits and kept patches of the checkpoint's model in eager PyTorch."""
    import torch

    model = build.build_model(spec, ckpt.state_dict, emit_selection=True, score_mode="official")
    names = [f"{SELECTION_PREFIX}{layer}" for layer in spec.idle_layers]
    logits, kept = [], {layer: [] for layer in spec.idle_layers}
    with torch.inference_mode():
        for i in range(0, len(images), CHUNK):
            out = model(torch.from_numpy(np.ascontiguousarray(images[i:i + CHUNK])))
            logits.append(out[0].numpy())
            kept_now = _kept_patches(spec, [o.numpy() for o in out[1:]], names)
            for layer, idx in zip(spec.idle_layers, kept_now, strict=True):
                kept[layer].append(idx)
    return np.concatenate(logits), {layer: np.concatenate(v) for layer, v in kept.items()}


def onnx_selection_names(path: Path, meta: OnnxMetadata) -> list[str]:
    """The selection outputs the file declares, one per idle layer; a one-line error naming
    `--emit-selection` when it has none."""
    import onnx

    spec = meta.spec
    if meta.dense or not spec.idle_layers:
        raise BadInputError(f"{path.name} is the dense baseline: it has no idle layers to show",
                            "export the idle model with `idle-export onnx CKPT --emit-selection`")
    outputs = {o.name for o in onnx.load(str(path), load_external_data=False).graph.output}
    wanted = [f"{SELECTION_PREFIX}{layer}" for layer in spec.idle_layers]
    missing = [n for n in wanted if n not in outputs]
    if missing:
        raise BadInputError(f"{path.name} has no token-selection outputs ({missing[0]} is missing)",
                            "export it with `idle-export onnx CKPT --emit-selection`, or pass the checkpoint")
    return wanted


def select_onnx(path: Path, meta: OnnxMetadata, images: np.ndarray, threads: int | None = None
                ) -> tuple[np.ndarray, dict]:
    """Logits and kept patches from the file's own selection outputs, on ONNX Runtime (CPU)."""
    spec = meta.spec
    names = onnx_selection_names(path, meta)
    logits, kept = [], {layer: [] for layer in spec.idle_layers}
    with registry.get(registry.ORT_CPU).runner(path, threads=threads) as runner:
        for i in range(0, len(images), CHUNK):
            values = runner.session.run(["logits", *names], {runner.input_name: images[i:i + CHUNK]})
            logits.append(values[0])
            for layer, idx in zip(spec.idle_layers, _kept_patches(spec, values[1:], names), strict=True):
                kept[layer].append(idx)
    return np.concatenate(logits), {layer: np.concatenate(v) for layer, v in kept.items()}


def run_show(model: Path, images: list[Path] | None = None, *, layers: list[int] | None = None,
             max_images: int = DEFAULT_MAX_IMAGES, arch: str | None = None, keep: float | None = None,
             schedule: str = "eval", ema: bool = False, threads: int | None = None) -> Selection:
    """Run MODEL (checkpoint or ONNX with selection outputs) on the images; only `layers` kept."""
    model = Path(model)
    if is_onnx(model):
        if arch is not None or keep is not None or ema or schedule != "eval":
            raise BadInputError("arch=, keep=, schedule= and ema=True apply to checkpoints; an ONNX "
                                "file's idle layers and K are fixed at export",
                                "drop them, or pass the checkpoint")
        if not model.is_file():
            raise BadInputError(f"ONNX file not found: {model}", "check the path")
        meta = OnnxMetadata.read(model)
        spec = meta.spec
        wanted = check_layers(layers, spec)
        onnx_selection_names(model, meta)  # the error before any image is read
        array, names, skipped = show_images(images, spec, max_images)
        logits, kept = select_onnx(model, meta, array, threads)
        classes, runtime = meta.classes, "onnxruntime"
    else:
        ckpt = load_checkpoint(model, ema=ema)
        spec = ckpt.spec(arch=arch, keep_rate=keep, schedule=schedule)
        wanted = check_layers(layers, spec)
        array, names, skipped = show_images(images, spec, max_images)
        if threads:
            import torch

            torch.set_num_threads(threads)
        logits, kept = select_checkpoint(ckpt, spec, array)
        classes, runtime = ckpt.classes, "torch"
    return Selection(images=array, names=names, logits=logits,
                     kept={layer: kept[layer] for layer in wanted}, spec=spec, classes=classes,
                     runtime=runtime, model_name=model.name, skipped=skipped)
