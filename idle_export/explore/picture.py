"""The `show` picture: one row per image — the image as the model sees it (after the eval
transform), then one panel per idle layer with the unselected patches dimmed and the kept ones
at full brightness — titled with the layer and K, the predicted class under the image.

Drawn with Pillow at one image pixel per screen pixel, so each panel holds the model's input
exactly (kept patches) or scaled by DIM (unselected ones): `panel_origin` gives where.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from idle_export.explore.show import Selection
from idle_export.fileio import atomic_write_bytes

DIM = 0.3  # unselected patches: pixel value × DIM (rounded down)
MARGIN = 10  # around the whole picture
GAP = 8  # between panels
HEADER_H = 24  # the model line at the top
TITLE_H = 20  # above each row's panels: image name, "layer L · K=k/N"
FOOTER_H = 22  # under each row: the predicted class
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def display_images(images: np.ndarray, spec) -> np.ndarray:
    """uint8 [n, H, W, 3] pictures of preprocessed images (the normalisation undone)."""
    mean = np.asarray(spec.mean, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float64).reshape(1, 3, 1, 1)
    pixels = (images.astype(np.float64) * std + mean) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def kept_mask(kept: np.ndarray, spec) -> np.ndarray:
    """bool [H, W]: True on the pixels of kept patches (patch j is row j // side, column j % side);
    an index past the patches (EViT's fused token) is no patch."""
    side = spec.img_size // spec.patch_size
    grid = np.zeros(side * side, dtype=bool)
    kept = np.asarray(kept, dtype=np.int64)
    grid[kept[kept < grid.size]] = True
    mask = np.zeros((spec.img_size, spec.img_size), dtype=bool)
    full = np.kron(grid.reshape(side, side), np.ones((spec.patch_size, spec.patch_size), dtype=bool))
    mask[: full.shape[0], : full.shape[1]] = full
    return mask


def dimmed(picture: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The picture with every pixel outside `mask` scaled by DIM."""
    out = picture.copy()
    out[~mask] = np.floor(out[~mask].astype(np.float64) * DIM).astype(np.uint8)
    return out


def canvas_size(rows: int, cols: int, panel: int) -> tuple[int, int]:
    """(width, height) of a picture of `rows` images and `cols` panels per row."""
    width = 2 * MARGIN + cols * panel + (cols - 1) * GAP
    height = 2 * MARGIN + HEADER_H + rows * (TITLE_H + panel + FOOTER_H) + (rows - 1) * GAP
    return width, height


def panel_origin(row: int, col: int, panel: int) -> tuple[int, int]:
    """(x, y) of the top-left pixel of panel `col` (0: the image) in row `row`."""
    x = MARGIN + col * (panel + GAP)
    y = MARGIN + HEADER_H + row * (TITLE_H + panel + FOOTER_H + GAP) + TITLE_H
    return x, y


def _font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render(sel: Selection, layers: list[int] | None = None):
    """The picture (a PIL RGB image) of a Selection; `layers` defaults to every layer it holds."""
    from PIL import Image, ImageDraw

    spec = sel.spec
    layers = list(sel.kept) if layers is None else layers
    panel, n = spec.img_size, spec.num_patches
    rows, cols = len(sel.images), 1 + len(layers)
    canvas = Image.new("RGB", canvas_size(rows, cols, panel), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    width = canvas.size[0] - 2 * MARGIN
    rate = "explicit K" if spec.keep_rate is None else f"keep rate {spec.keep_rate:g}"
    header = f"{sel.model_name} ({sel.runtime}): {spec.arch}, {rate}; bright: computed, dimmed: idle"
    draw.text((MARGIN, MARGIN + 4), _fit(draw, header, font, width), fill=TEXT, font=font)
    pictures = display_images(sel.images, spec)
    k_by_layer = spec.k_by_layer
    for row, ((label, prob), name) in enumerate(zip(sel.predicted(), sel.names, strict=True)):
        for col in range(cols):
            x, y = panel_origin(row, col, panel)
            if col == 0:
                tile, title = pictures[row], name
            else:
                layer = layers[col - 1]
                tile = dimmed(pictures[row], kept_mask(sel.kept[layer][row], spec))
                title = f"layer {layer} · K={k_by_layer[layer]}/{n}"
            canvas.paste(Image.fromarray(tile), (x, y))
            draw.text((x, y - TITLE_H + 3), _fit(draw, title, font, panel), fill=TEXT, font=font)
        x, y = panel_origin(row, 0, panel)
        draw.text((x, y + panel + 4), _fit(draw, f"predicted: {label} ({prob:.0%})", font, panel), fill=TEXT,
                  font=font)
    return canvas


def write_png(image, path: Path) -> Path:
    """Save a PIL image as PNG atomically (no partial file on failure)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
