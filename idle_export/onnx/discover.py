"""The files a command takes when the user names none: `idle-export onnx ckpt.pth` then
`idle-export trt --fp16` or `idle-export bench` in the same folder, as the project card types them.

A candidate is an ONNX file with idle-export metadata; only metadata is read (no weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from idle_export.errors import BadInputError
from idle_export.fileio import sha256_file
from idle_export.onnx.metadata import OnnxMetadata

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class Export:
    """One ONNX file of the folder and what its metadata says it is."""

    path: Path
    meta: OnnxMetadata

    @property
    def is_fp32_idle(self) -> bool:
        """The standard FP32 idle export (a plugin-form twin of it is not a second candidate)."""
        return not self.meta.dense and self.meta.precision == "fp32" and self.meta.form != "plugin"

    @property
    def is_dense(self) -> bool:
        return self.meta.dense and self.meta.precision == "fp32"


def exports_in(folder: Path) -> list[Export]:
    """The idle-export ONNX files in `folder` (others are ignored), sorted by name."""
    found = []
    for path in sorted(Path(folder).glob("*.onnx")):
        try:
            meta = OnnxMetadata.read(path)
        except BadInputError:
            continue
        if meta.has_spec:
            found.append(Export(path, meta))
    return found


def pick_idle_onnx(folder: Path, command: str) -> Path:
    """The one FP32 idle export in `folder`; a one-line error when there is none or several."""
    candidates = [e.path for e in exports_in(folder) if e.is_fp32_idle]
    if len(candidates) == 1:
        return candidates[0]
    where = "this folder" if Path(folder) == Path(".") else str(folder)
    if not candidates:
        raise BadInputError(f"no idle ONNX file in {where} to take for `idle-export {command}`",
                            "export one first (idle-export onnx CKPT.pth) or name the file")
    names = ", ".join(p.name for p in candidates)
    raise BadInputError(f"{len(candidates)} idle ONNX files in {where} ({names}): which one?",
                        f"name it: idle-export {command} {candidates[0].name}")


def dense_twin(idle: Path) -> Path | None:
    """The dense export of the same checkpoint beside `idle` (same checkpoint sha256), if any."""
    sha = OnnxMetadata.read(idle).get("checkpoint_sha256")
    twins = [e.path for e in exports_in(idle.parent)
             if e.is_dense and sha and e.meta.get("checkpoint_sha256") == sha]
    return twins[0] if twins else None


def source_checkpoint(onnx: Path) -> Path | None:
    """The checkpoint beside `onnx` that it was exported from (sha256 from its metadata)."""
    sha = OnnxMetadata.read(onnx).get("checkpoint_sha256")
    if not sha:
        return None
    stem = onnx.name.rsplit("_idle", 1)[0] if "_idle" in onnx.name else None
    files = sorted(p for p in onnx.parent.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
    # the name `idle-export onnx` derives (CKPT_idle.onnx) first: hashing is the slow part
    files.sort(key=lambda p: p.stem != stem)
    return next((p for p in files if p.is_file() and sha256_file(p) == sha), None)
