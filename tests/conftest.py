"""Shared fixtures: tiny seeded checkpoints and their exports, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# shared/ lies beside the checkout (developers and CI); a shared/ inside it is accepted too.
SHARED_MODELS = next((p for p in (REPO.parent / "shared" / "models", REPO / "shared" / "models")
                      if p.is_dir()), REPO.parent / "shared" / "models")
PHOTOS10 = SHARED_MODELS / "photos10_deit_tiny.pth"

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """Seeded deit_tiny IdleViT r=0.7, official training-checkpoint format."""
    from idle_export.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "deit_tiny_r0.7.pth",
                                 arch="deit_tiny", keep_rate=0.7)


def _export(ckpt_path: Path, out: Path, **kwargs) -> Path:
    from idle_export.model.checkpoint import load_checkpoint
    from idle_export.onnx.export import export_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    return export_checkpoint(ckpt, ckpt.spec(), out, **kwargs)


@pytest.fixture(scope="session")
def tiny_idle_onnx(tiny_ckpt, tmp_path_factory) -> Path:
    """The paper's formulation (keys for every token): graph-structure tests count its ops."""
    return _export(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "tiny_idle.onnx", score_mode="official")


@pytest.fixture(scope="session")
def tiny_folded_onnx(tiny_ckpt, tmp_path_factory) -> Path:
    """The default export: folded scores (no keys for idle tokens)."""
    return _export(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "tiny_folded.onnx")


@pytest.fixture(scope="session")
def tiny_dense_onnx(tiny_ckpt, tmp_path_factory) -> Path:
    return _export(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "tiny_dense.onnx", dense=True)


@pytest.fixture(scope="session")
def tiny_elastic_onnx(tiny_ckpt, tmp_path_factory) -> Path:
    """The elastic form (`onnx --elastic`): a keep_rate input, default the checkpoint's 0.7."""
    return _export(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "tiny_elastic.onnx", elastic=True)


@pytest.fixture(scope="session")
def photos10_ckpt() -> Path:
    """The really trained deit_tiny (10 classes) from ../shared/models."""
    if not PHOTOS10.is_file():
        pytest.skip(f"trained test model not found at {PHOTOS10}")
    return PHOTOS10


@pytest.fixture(scope="session")
def photos10_idle_onnx(photos10_ckpt, tmp_path_factory) -> Path:
    """The default export (folded scores) of the trained model."""
    return _export(photos10_ckpt, tmp_path_factory.mktemp("onnx") / "photos10_idle.onnx")


PROGRESS_PREFIX = "· "  # cli.options: progress lines of steps over a second when stderr is not a terminal


def save_code_running_pickle(path: Path) -> Path:
    """A checkpoint whose unpickling would run `touch <folder>/pwned`: loaders must refuse it."""
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'pwned'}",))

    torch.save({"model": Evil()}, path)
    return path


def error_lines(stderr: str) -> list[str]:
    """stderr without the progress lines: what must be one line when a command fails."""
    return [line for line in stderr.strip().splitlines() if not line.startswith(PROGRESS_PREFIX)]


def write_huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grayscale PNG of width × height black pixels: a few KB on disk however many
    pixels it declares (14000×14000 is ~25 KB), for the decompression-bomb guard."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    block = row * 1000
    data = b"".join(z.compress(block) for _ in range(height // 1000)) + z.compress(row * (height % 1000))
    data += z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path
