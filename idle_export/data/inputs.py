"""The image pipeline shared by `check`, calibration and serving clients.

Preprocessing is timm's eval transform for the model's data config (DeiT: resize the shorter
side to img_size / crop_pct with bicubic interpolation, centre crop, ImageNet mean/std).

Built-in photos: ten photos that scikit-image ships in `skimage.data` (public domain or
CC0/CC-BY, see scikit-image's data/README; the names are in PHOTO_NAMES). `builtin_photos(n)`
returns n deterministic views of them: first each whole photo, then seeded crops.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PHOTO_NAMES = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "gravel",
               "hubble_deep_field", "immunohistochemistry", "rocket")


def eval_transform(spec):
    """timm's eval transform (PIL image → normalised float tensor) for the spec."""
    from timm.data import create_transform

    return create_transform(input_size=(3, spec.img_size, spec.img_size), is_training=False,
                            interpolation=spec.interpolation, crop_pct=spec.crop_pct,
                            mean=spec.mean, std=spec.std)


def to_rgb_pil(array_or_image):
    """PIL RGB image from a PIL image or an HxW / HxWxC uint8 array (gray, RGBA converted)."""
    from PIL import Image

    img = array_or_image
    if not isinstance(img, Image.Image):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    return img.convert("RGB")


@lru_cache(maxsize=1)
def _photos():
    from skimage import data

    return tuple(to_rgb_pil(getattr(data, name)()) for name in PHOTO_NAMES)


def builtin_photos(n: int, spec, *, seed: int = 0) -> np.ndarray:
    """n preprocessed views [n, 3, H, W] float32 of the built-in photos, deterministic."""
    photos = _photos()
    transform = eval_transform(spec)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        if i >= len(photos):  # a seeded crop covering 20..80% of the photo
            w, h = img.size
            scale = np.sqrt(rng.uniform(0.2, 0.8))
            cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                img = img.transpose(0)  # FLIP_LEFT_RIGHT
        out.append(transform(img).numpy())
    return np.stack(out).astype(np.float32)


def seeded_noise(n: int, spec, *, seed: int = 0) -> np.ndarray:
    """n standard-normal inputs (already in normalised space), deterministic."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, spec.img_size, spec.img_size), dtype=np.float32)


def input_set(name: str, n: int, spec, *, seed: int = 0) -> np.ndarray:
    """The synthetic input set `check` and `bench` call by name: "noise" (seeded_noise) or
    "photos" (builtin_photos)."""
    return {"noise": seeded_noise, "photos": builtin_photos}[name](n, spec, seed=seed)
