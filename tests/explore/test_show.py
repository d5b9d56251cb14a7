"""`idle-export show` through the real CLI on the trained photos10 model: the PNG's panel grid, and
every patch of every panel dimmed exactly where the ONNX file's own selection output says the
layer did not keep it (checked against ONNX Runtime run here, not through idle-export)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from idle_export.explore.picture import DIM, canvas_size, panel_origin
from tests.explore.conftest import error_line, run_cli

runner = CliRunner()
LAYERS = (3, 6, 9)


@pytest.fixture(scope="module")
def selection_onnx(photos10_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("show") / "photos10_sel.onnx"
    result = run_cli("onnx", photos10_ckpt, "--emit-selection", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def model_view(images: np.ndarray, spec) -> np.ndarray:
    """What the model sees, as uint8 HxWx3 pictures (normalisation undone)."""
    mean = np.asarray(spec.mean).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std).reshape(1, 3, 1, 1)
    return np.clip(np.rint((images * std + mean) * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def panel(png: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    x, y = panel_origin(row, col, size)
    return png[y:y + size, x:x + size]


@pytest.fixture(scope="module")
def onnx_picture(selection_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("show_png") / "selection.png"
    result = run_cli("show", selection_onnx, "--layers", ",".join(map(str, LAYERS)), "--max-images", "3",
                     "-o", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_onnx_picture_dims_exactly_the_unselected_patches(selection_onnx, onnx_picture):
    import onnxruntime as ort

    from idle_export.data.inputs import builtin_photos
    from idle_export.onnx.metadata import OnnxMetadata

    path, result = onnx_picture
    spec = OnnxMetadata.read(selection_onnx).spec
    png = np.asarray(Image.open(path).convert("RGB"))
    size, side, p = spec.img_size, spec.img_size // spec.patch_size, spec.patch_size
    assert png.shape[1::-1] == canvas_size(3, 1 + len(LAYERS), size)  # 3 rows × (image + 3 layers)
    images = builtin_photos(3, spec)
    sess = ort.InferenceSession(str(selection_onnx), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {"images": images}), strict=True))
    seen = model_view(images, spec)
    for row in range(3):
        assert np.array_equal(panel(png, row, 0, size), seen[row])  # the image as the model sees it
        for col, layer in enumerate(LAYERS, start=1):
            sel = outs[f"selection_layer{layer}"][row]
            assert sel[0] == 0  # CLS first, then patch j as token j + 1
            kept = set((sel[1:] - 1).tolist())
            assert len(kept) == spec.k_by_layer[layer] < spec.num_patches
            tile = panel(png, row, col, size)
            for j in range(spec.num_patches):
                r, c = divmod(j, side)
                got = tile[r * p:(r + 1) * p, c * p:(c + 1) * p]
                orig = seen[row, r * p:(r + 1) * p, c * p:(c + 1) * p]
                want = orig if j in kept else np.floor(orig * DIM).astype(np.uint8)
                assert np.array_equal(got, want), (row, layer, j, j in kept)
    # the predicted class (from the file's class names) of each photo is printed
    assert "astronaut: astronaut, brick: brick, camera: camera" in result.stderr


def test_checkpoint_in_torch_keeps_the_same_patches_as_the_onnx_file(photos10_ckpt, onnx_picture, tmp_path):
    out = tmp_path / "ckpt.png"
    result = run_cli("show", photos10_ckpt, "--layers", "3,6,9", "--max-images", "3", "-o", out)
    assert result.exit_code == 0, result.output
    assert "torch" in result.stderr
    a = np.asarray(Image.open(out).convert("RGB"))
    b = np.asarray(Image.open(onnx_picture[0]).convert("RGB"))
    assert a.shape == b.shape
    for row in range(3):
        for col in range(1 + len(LAYERS)):
            assert np.array_equal(panel(a, row, col, 224), panel(b, row, col, 224)), (row, col)


def test_own_images_and_a_lower_keep_rate(photos10_ckpt, tmp_path):
    from skimage import data

    from idle_export.data.inputs import eval_transform
    from idle_export.model.checkpoint import load_checkpoint

    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray(data.chelsea()).save(folder / "cat.png")
    Image.fromarray(data.coffee()).save(folder / "cup.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"not a png")  # skipped, with one warning line
    out = tmp_path / "mine.png"
    result = run_cli("show", photos10_ckpt, folder, "--keep", "0.5", "--layers", "11", "-o", out)
    assert result.exit_code == 0, result.output
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[1::-1] == canvas_size(2, 2, 224)
    spec = load_checkpoint(photos10_ckpt).spec(keep_rate=0.5)
    first = eval_transform(spec)(Image.open(folder / "cat.png").convert("RGB")).numpy()[None]
    assert np.array_equal(panel(png, 0, 0, 224), model_view(first, spec)[0])
    # keep 0.5 at layer 11 (r³): 24 of 196 patches at full brightness, the rest dimmed
    bright = [np.array_equal(panel(png, 0, 1, 224)[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16],
                             panel(png, 0, 0, 224)[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16])
              for r in range(14) for c in range(14)]
    assert sum(bright) == spec.k_by_layer[11] == 24
    assert "cat.png: chelsea, cup.jpg: coffee" in result.stderr
    assert "warning: skipped 1 unreadable file(s), e.g. " in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", ["no selection outputs", "not an idle layer", "empty folder",
                                  "keep on onnx", "not png"])
def test_bad_input_one_line_exit_2_no_png(case, photos10_ckpt, photos10_idle_onnx, selection_onnx, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "x.png"
    args, message = {
        "no selection outputs": ([photos10_idle_onnx], "--emit-selection"),
        "not an idle layer": ([photos10_ckpt, "--layers", "2,3"], "layer 2 is not an idle layer"),
        "empty folder": ([photos10_ckpt, empty], "is empty"),
        "keep on onnx": ([selection_onnx, "--keep", "0.5"], "apply to checkpoints"),
        "not png": ([photos10_ckpt, "-o", tmp_path / "x.jpg"], "is not a .png file"),
    }[case]
    result = run_cli("show", *args, *(["-o", out] if "-o" not in args else []))
    assert result.exit_code == 2, result.output
    assert message in error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no PNG, no temp file


def test_lvvit_checkpoint(lvvit_ckpt, tmp_path):
    """LV-ViT (16 blocks, idle layers 4..15 in groups of four): K bright patches per panel."""
    from idle_export.data.inputs import builtin_photos
    from idle_export.model.checkpoint import load_checkpoint

    out = tmp_path / "lvvit.png"
    result = run_cli("show", lvvit_ckpt, "--layers", "4,8,15", "--max-images", "2", "-o", out)
    assert result.exit_code == 0, result.output
    spec = load_checkpoint(lvvit_ckpt).spec()
    assert spec.family == "lvvit" and spec.k_by_layer[4] == 137 and spec.k_by_layer[15] == 67
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[1::-1] == canvas_size(2, 4, 224)
    seen = model_view(builtin_photos(2, spec), spec)
    for row in range(2):
        assert np.array_equal(panel(png, row, 0, 224), seen[row])
        for col, layer in enumerate((4, 8, 15), start=1):
            kept = dimmed = either = 0
            for r in range(14):
                for c in range(14):
                    got = panel(png, row, col, 224)[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]
                    orig = seen[row, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]
                    bright = np.array_equal(got, orig)
                    dark = np.array_equal(got, np.floor(orig * DIM).astype(np.uint8))
                    assert bright or dark
                    kept, dimmed, either = kept + (bright and not dark), dimmed + (dark and not bright), \
                        either + (bright and dark)  # an all-black patch looks the same either way
            k = spec.k_by_layer[layer]
            assert kept <= k <= kept + either and dimmed <= 196 - k <= dimmed + either
