"""Calibration and check images: folder / file-list readers, the built-in set, a tensor cache.

`load_images(source, num, spec)` turns what the user passed to `--images` into preprocessed
float32 tensors [num, 3, H, W] (timm's eval transform for the model's data config):

- a folder: every file below it (recursively, sorted), a seeded sample of them so that a
  class-sorted folder (ImageNet-style) does not give one class only;
- a file list (.txt): one image path per line, relative to the list's folder; '#' comments;
- a single image file, or a Python list of paths;
- None: the built-in set (`builtin_photos`: ten photos shipped with scikit-image in
  `skimage.data` — astronaut, hubble_deep_field and rocket are public domain (NASA/SpaceX),
  brick, camera, chelsea, coffee and gravel CC0, coins and immunohistochemistry "no known
  copyright restrictions" — whole photos first, then seeded crops of them).

Files PIL cannot decode (corrupt JPEG/PNG, text files, ...) are skipped with a warning and
counted. Grayscale, palette, CMYK, RGBA and 16-bit images are converted to 8-bit RGB (alpha is
dropped) and counted as converted. Fewer usable images than `num` is an error (BadInputError)
naming how many there are: a smaller calibration set than asked for changes the INT8 result,
so we never shrink it silently. `num=0` means "all usable images". An image over MAX_PIXELS
(~89.5 Mpx) is an error naming it, not a file to skip (`open_rgb`, the one decoder).

Cache: preprocessed tensors are stored as .npy (plus a small .json report) under
`cache_dir` (default $IDLE_EXPORT_CACHE or ~/.cache/idle-export/calib), keyed by the sha256 of
the file list (path, size, mtime), num, seed and the spec's preprocessing. Loaded with
allow_pickle=False.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from idle_export.data.inputs import builtin_photos, eval_transform
from idle_export.errors import BadInputError
from idle_export.fileio import atomic_open, atomic_write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
LIST_SUFFIXES = (".txt", ".lst")
CACHE_VERSION = 1
# The most pixels an image may have (Pillow's default MAX_IMAGE_PIXELS, ~89.5 Mpx: 1 GiB at 4 bytes
# per pixel / 3): a larger one is refused before it is decoded (a "decompression bomb" — a few KB of
# PNG can declare 14000×14000 pixels and take gigabytes to decode); the models see ~224 px anyway.
MAX_PIXELS = 89_478_485


class ImagesSkippedWarning(UserWarning):
    """Some files of an image folder or list could not be decoded and were skipped."""


@dataclass
class CalibrationImages:
    """Preprocessed images and what it took to get them."""

    array: np.ndarray  # float32 [n, 3, H, W]
    source: str  # "builtin" or the folder / list / file given
    files: list[str] = field(default_factory=list)  # the images used, in order (empty: built-in)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    converted: int = 0  # grayscale / RGBA / palette / 16-bit images converted to RGB
    cache: str = "off"  # "hit", "miss" or "off"

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("array")
        d["num"] = len(self)
        d["files"] = len(self.files)
        d["skipped_count"] = len(self.skipped)
        d["skipped"] = [f"{f}: {r}" for f, r in self.skipped[:20]]
        return d


# ----------------------------------------------------------------------------- reading files
def list_image_files(source: str | Path | list) -> list[Path]:
    """The candidate files of a folder, a list file, one image or a list of paths (sorted,
    de-duplicated for folders; list order kept for lists)."""
    if isinstance(source, (list, tuple)):
        files = [Path(p) for p in source]
        _require_files(files, "image file not found", "check the paths")
        return files
    path = Path(source)
    if not path.exists():
        raise BadInputError(f"images={path} does not exist", "pass a folder of JPEG/PNG images "
                            "or a .txt file with one image path per line")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise BadInputError(f"image folder {path} is empty",
                                "put JPEG/PNG images into it (subfolders are searched too)")
        return files
    if path.suffix.lower() in LIST_SUFFIXES:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise BadInputError(f"cannot read the image list {path} ({type(e).__name__})",
                                "pass a UTF-8 text file with one image path per line") from None
        entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not entries:
            raise BadInputError(f"image list {path} names no images", "write one image path per line")
        files = [p if p.is_absolute() else path.parent / p for p in map(Path, entries)]
        _require_files(files, f"{path.name} names a missing file",
                       "paths in the list are relative to the list's folder")
        return files
    return [path]  # a single image


def _require_files(files: list[Path], message: str, hint: str) -> None:
    """BadInputError naming the first missing file (and how many more) if any is missing."""
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BadInputError(f"{message}: {missing[0]}{more}", hint)


def open_rgb(path: Path):
    """(PIL RGB image, converted?) — the one decoder of every command that reads images. An image
    over MAX_PIXELS is a BadInputError (before decoding; no DecompressionBombWarning printed);
    raises OSError/ValueError when PIL cannot decode the file."""
    from PIL import Image

    with warnings.catch_warnings():  # Pillow warns above its limit and refuses above twice it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:  # says the pixel count, not the size
            m = re.search(r"\((\d+) pixels\)", str(e))
            raise _too_large(path, int(m.group(1)) if m else None, "") from None
        with im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise _too_large(path, width * height, f" ({width}×{height})")
            return _to_rgb(im)


def _too_large(path: Path, pixels: int | None, size: str) -> BadInputError:
    many = f"{pixels / 1e6:.0f} million pixels" if pixels else "too many pixels"
    return BadInputError(f"image {path} has {many}{size}, over the limit of {MAX_PIXELS / 1e6:.1f} million "
                         "(a decompression-bomb guard)",
                         "downscale it or leave it out; the model sees a few hundred pixels anyway")


def _to_rgb(im):
    from PIL import Image

    im.load()  # decode now: truncated / corrupt files fail here, not later
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grayscale: scale to 8 bit
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max()
        arr = arr / (65535.0 if mode.startswith("I;16") or hi > 255 else max(hi, 1.0)) * 255.0
        im8 = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
        return im8.convert("RGB"), True
    if mode == "RGB":
        return im.copy(), False
    return im.convert("RGB"), True


def _select(files: list[Path], num: int, seed: int, spec, shuffle: bool):
    """Decode files (a seeded order for folders) until `num` usable ones: (arrays, used,
    skipped, converted)."""

    transform = eval_transform(spec)
    order = list(range(len(files)))
    if shuffle:
        np.random.default_rng(seed).shuffle(order)
    arrays, used, skipped, converted = [], [], [], 0
    for i in order:
        if num and len(arrays) >= num:
            break
        f = files[i]
        try:
            img, conv = open_rgb(f)
        except BadInputError:  # too large: an error, not a file to skip
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for undecodable files
            detail = (str(e).splitlines() or [""])[0][:80]
            reason = "not an image" if f.suffix.lower() not in IMAGE_SUFFIXES else \
                f"cannot decode ({type(e).__name__}{': ' + detail if detail else ''})"
            skipped.append((str(f), reason))
            continue
        converted += int(conv)
        arrays.append(transform(img).numpy())
        used.append(str(f))
    return arrays, used, skipped, converted


# ----------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    env = os.environ.get("IDLE_EXPORT_CACHE")
    if env:
        return Path(env) / "calib"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "idle-export" / "calib"


def preprocessing_key(spec) -> dict:
    """The parts of a ModelSpec that change the preprocessed tensors."""
    return {"img_size": spec.img_size, "crop_pct": spec.crop_pct, "interpolation": spec.interpolation,
            "mean": list(spec.mean), "std": list(spec.std)}


def cache_key(files: list[Path], num: int, seed: int, spec) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "num": num, "seed": seed,
                         "prep": preprocessing_key(spec)}, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _cache_read(folder: Path, key: str) -> tuple[np.ndarray, dict] | None:
    npy, meta = folder / f"{key}.npy", folder / f"{key}.json"
    if not (npy.is_file() and meta.is_file()):
        return None
    try:
        return np.load(npy, allow_pickle=False), json.loads(meta.read_text())
    except (OSError, ValueError):
        return None  # a damaged cache entry is ignored and rewritten


def _cache_write(folder: Path, key: str, array: np.ndarray, info: dict) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_open(folder / f"{key}.npy") as f:  # streamed: no second copy of the array
            np.save(f, array, allow_pickle=False)
        atomic_write_text(folder / f"{key}.json", json.dumps(info))
        return True
    except (OSError, BadInputError):
        return False  # the cache is an optimisation: an unwritable cache folder is not an error


# ----------------------------------------------------------------------------- entry point
def load_images(source, num: int, spec, *, seed: int = 0, cache_dir: str | Path | None | bool = None,
                what: str = "images=", at_most: bool = False) -> CalibrationImages:
    """Preprocessed images for calibration or checks. `source`: None (built-in set), a folder,
    a .txt list, an image file, a list of paths, or an already preprocessed [n,3,H,W] array.
    `num=0`: all usable images; `at_most=True`: up to `num` (fewer usable images are fine; the
    user did not ask for a number). `cache_dir=False` turns the cache off."""
    if num is None or int(num) < 0:
        raise BadInputError(f"num={num} must be ≥ 0", "e.g. num=512 (0: all images)")
    num = int(num)
    if source is None:

        n = num or 64
        return CalibrationImages(builtin_photos(n, spec, seed=seed), source="builtin")
    if isinstance(source, np.ndarray):
        arr = np.asarray(source, dtype=np.float32)
        expected = (3, spec.img_size, spec.img_size)
        if arr.ndim != 4 or arr.shape[1:] != expected:
            raise BadInputError(f"image array has shape {arr.shape}, expected [n, 3, {spec.img_size}, "
                                f"{spec.img_size}]",
                                "pass preprocessed images or a folder")
        if num and arr.shape[0] < num and not at_most:
            raise BadInputError(f"{arr.shape[0]} images given, fewer than num={num}",
                                f"pass num={arr.shape[0]}")
        return CalibrationImages(arr[:num] if num else arr, source="array")
    files = list_image_files(source)
    label = str(source) if not isinstance(source, (list, tuple)) else f"{len(files)} files"
    shuffle = not isinstance(source, (list, tuple)) and Path(source).is_dir()
    key = folder = None
    if cache_dir is not False:
        folder = Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir()
        key = cache_key(files, num, seed, spec)
        hit = _cache_read(folder, key)
        if hit is not None:
            arr, info = hit
            result = CalibrationImages(arr, source=label, files=info["files"],
                                       skipped=[tuple(s) for s in info["skipped"]],
                                       converted=info["converted"], cache="hit")
            _warn_skipped(result, what)
            return result
    arrays, used, skipped, converted = _select(files, num, seed, spec, shuffle)
    if not arrays:
        example = f" ({skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise BadInputError(f"{what} {label}: none of its {len(files)} files is a readable image{example}",
                            "pass JPEG or PNG images")
    if num and len(arrays) < num and not at_most:
        raise BadInputError(f"{what} {label} has {len(arrays)} usable images, fewer than num={num}"
                            + (f" ({len(skipped)} files skipped)" if skipped else ""),
                            f"pass num={len(arrays)} (or num=0 for all) or add images")
    result = CalibrationImages(np.stack(arrays).astype(np.float32), source=label, files=used,
                               skipped=skipped, converted=converted,
                               cache="off" if folder is None else "miss")
    if folder is not None and key is not None:
        info = {"files": used, "skipped": skipped, "converted": converted}
        if not _cache_write(folder, key, result.array, info):
            result.cache = "off"
    _warn_skipped(result, what)
    return result


def _warn_skipped(result: CalibrationImages, what: str) -> None:
    if result.skipped:
        first = result.skipped[0]
        warnings.warn(f"{what}: skipped {len(result.skipped)} unreadable file(s) in {result.source}, "
                      f"e.g. {first[0]} ({first[1]})", ImagesSkippedWarning, stacklevel=3)
