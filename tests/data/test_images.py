"""Calibration images: folder / list readers, conversions, skipped files, errors, cache, built-in set."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from idle_export.data.images import ImagesSkippedWarning, cache_key, list_image_files, load_images
from idle_export.errors import BadInputError
from idle_export.model.config import ModelSpec


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Preprocessed-image cache in the test's folder, not in ~/.cache."""
    monkeypatch.setenv("IDLE_EXPORT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def spec():
    return ModelSpec.create("deit_tiny", 0.7)


def _rgb(seed: int, size=(40, 30)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _folder(tmp_path, n_rgb=3):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i in range(n_rgb):
        Image.fromarray(_rgb(i)).save(d / f"rgb{i}.png")
    Image.fromarray(_rgb(10)).save(d / "sub" / "photo.jpg", quality=90)
    return d


def test_folder_reads_converts_and_skips(tmp_path, spec):
    d = _folder(tmp_path)
    Image.fromarray(_rgb(20)[..., 0]).save(d / "gray.png")  # L
    Image.fromarray(np.dstack([_rgb(21), np.full((30, 40), 128, np.uint8)])).save(d / "rgba.png")
    Image.fromarray(_rgb(22)).convert("P").save(d / "palette.png")
    (d / "notes.txt").write_text("not an image\n")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.warns(ImagesSkippedWarning, match="skipped 2"):
        got = load_images(d, 0, spec, cache_dir=False)
    assert got.array.shape == (7, 3, 224, 224) and got.array.dtype == np.float32
    assert got.converted == 3
    reasons = dict((str(f).rsplit("/", 1)[-1], r) for f, r in got.skipped)
    assert reasons["notes.txt"] == "not an image"
    assert reasons["broken.jpg"].startswith("cannot decode (OSError")  # a JPEG header, then garbage
    assert len(got.skipped) == 2 and got.summary()["skipped_count"] == 2
    # the grayscale image became three equal channels (after per-channel normalisation)
    gray = got.array[got.files.index(str(d / "gray.png"))]
    std = np.asarray(spec.std)[:, None, None]
    mean = np.asarray(spec.mean)[:, None, None]
    pixels = gray * std + mean
    assert np.allclose(pixels[0], pixels[1], atol=1e-5) and np.allclose(pixels[1], pixels[2], atol=1e-5)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path, spec):
    arr = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    got = load_images([path], 1, spec, cache_dir=False)
    pixels = got.array[0, 0] * spec.std[0] + spec.mean[0]
    assert 0.3 < pixels.mean() < 0.7  # clipping at 255 would make it almost white (≈1.0)
    assert got.converted == 1


def test_empty_folder_and_only_junk(tmp_path, spec):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="is empty"):
        load_images(empty, 8, spec, cache_dir=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello")
    with pytest.raises(BadInputError, match="none of its 1 files is a readable image"):
        load_images(junk, 8, spec, cache_dir=False)
    with pytest.raises(BadInputError, match="does not exist"):
        load_images(tmp_path / "nope", 8, spec, cache_dir=False)


def test_fewer_images_than_num_is_an_error_naming_the_count(tmp_path, spec):
    d = _folder(tmp_path)
    (d / "junk.bin").write_bytes(b"\x00" * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImagesSkippedWarning)
        with pytest.raises(BadInputError) as e:
            load_images(d, 10, spec, cache_dir=False)
    assert "has 4 usable images, fewer than num=10 (1 files skipped)" in e.value.message
    assert "num=4" in e.value.hint


def test_num_draws_a_seeded_sample_of_a_folder(tmp_path, spec):
    d = _folder(tmp_path, n_rgb=6)
    a = load_images(d, 3, spec, seed=0, cache_dir=False)
    b = load_images(d, 3, spec, seed=0, cache_dir=False)
    c = load_images(d, 3, spec, seed=5, cache_dir=False)
    assert a.files == b.files and np.array_equal(a.array, b.array)
    assert len(a) == 3 and a.files != c.files


def test_file_list_relative_paths_and_missing(tmp_path, spec):
    d = _folder(tmp_path)
    lst = d / "calib.txt"
    lst.write_text("# calibration images\nrgb0.png\n\nsub/photo.jpg\n")
    files = list_image_files(lst)
    assert files == [d / "rgb0.png", d / "sub" / "photo.jpg"]
    got = load_images(lst, 0, spec, cache_dir=False)
    assert len(got) == 2 and got.files[1].endswith("photo.jpg")
    lst.write_text("rgb0.png\nmissing.png\n")
    with pytest.raises(BadInputError, match="missing file"):
        load_images(lst, 0, spec, cache_dir=False)


def test_cache_hit_and_key(tmp_path, spec):
    d = _folder(tmp_path)
    cache = tmp_path / "cache"
    first = load_images(d, 3, spec, cache_dir=cache)
    second = load_images(d, 3, spec, cache_dir=cache)
    assert (first.cache, second.cache) == ("miss", "hit")
    assert np.array_equal(first.array, second.array) and first.files == second.files
    assert len(list(cache.glob("*.npy"))) == 1
    files = list_image_files(d)
    other = ModelSpec(**{**spec.__dict__, "crop_pct": 1.0})
    assert cache_key(files, 3, 0, spec) != cache_key(files, 3, 0, other)
    assert cache_key(files, 3, 0, spec) != cache_key(files, 2, 0, spec)
    Image.fromarray(_rgb(99)).save(d / "rgb0.png")  # a changed file invalidates the entry
    assert load_images(d, 3, spec, cache_dir=cache).cache == "miss"


def test_cache_write_failure_leaves_nothing(tmp_path, spec, monkeypatch):
    """A cache entry that fails half-way (disk full, say) is no error and leaves no file behind."""
    from idle_export.data import images as data

    def broken_save(f, *a, **k):
        f.write(b"half an array")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.np, "save", broken_save)
    cache = tmp_path / "cache"
    got = load_images(_folder(tmp_path), 3, spec, cache_dir=cache)
    assert got.array.shape == (3, 3, 224, 224)
    assert list(cache.iterdir()) == []


def test_builtin_set_is_deterministic(spec):
    a = load_images(None, 12, spec)
    b = load_images(None, 12, spec)
    assert a.source == "builtin" and a.array.shape == (12, 3, 224, 224)
    assert np.array_equal(a.array, b.array)
    assert not np.allclose(a.array[0], a.array[10])  # photo 0 whole vs a crop of photo 0


def test_preprocessed_array_passthrough(spec):
    x = np.zeros((5, 3, 224, 224), np.float32)
    assert len(load_images(x, 4, spec)) == 4
    with pytest.raises(BadInputError, match="fewer than num=8"):
        load_images(x, 8, spec)
    with pytest.raises(BadInputError, match="shape"):
        load_images(np.zeros((2, 3, 32, 32), np.float32), 0, spec)


def test_images_over_the_pixel_limit_are_an_error_not_a_skip_nor_a_warning(tmp_path, spec):
    """One limit for every command (open_rgb): over it, Pillow only warns, over twice it, Pillow
    raises; both are the same one-line error naming the file, before any decoding, and a folder
    with one such image among good ones fails too (it is not silently left out)."""
    from idle_export.data.images import MAX_PIXELS, open_rgb
    from tests.conftest import write_huge_png

    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # Pillow's default, the limit we chose
    d = _folder(tmp_path, n_rgb=1)
    big = write_huge_png(d / "big.png", 10_000, 10_000)
    bomb = write_huge_png(tmp_path / "bomb.png", 14_000, 14_000)
    small = write_huge_png(tmp_path / "small.png", 300, 200)  # the same kind of file, decodable
    assert open_rgb(small)[0].size == (300, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        for path, words in ((big, "has 100 million pixels (10000×10000), over the limit of 89.5 million"),
                            (bomb, "has 196 million pixels, over the limit of 89.5 million")):
            with pytest.raises(BadInputError) as e:
                open_rgb(path)
            assert words in e.value.message and str(path) in e.value.message
            assert "downscale it" in e.value.hint
        with pytest.raises(BadInputError, match="100 million pixels"):
            load_images(d, 0, spec, cache_dir=False)
