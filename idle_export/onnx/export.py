"""torch → ONNX: dynamic batch, opset ≥ 17, metadata, atomic write, optional external data."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from idle_export import __version__
from idle_export.errors import BadInputError
from idle_export.fileio import check_output_path
from idle_export.lazy import lazy_module
from idle_export.onnx.io import (
    DEFAULT_OPSET,
    INPUT_NAME,
    MIN_OPSET,
    OUTPUT_NAME,
    install_onnx,
    selection_output_names,
)
from idle_export.onnx.metadata import OnnxMetadata

vit = lazy_module("idle_export.model.vit")  # torch


def export_onnx(model, path: str | Path, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                external_data: bool = False, metadata: dict[str, str] | None = None) -> Path:
    """Export an IdleViT (or its dense twin) and write `path` (+ `path.data`) atomically."""
    import onnx
    import torch

    if opset < MIN_OPSET:
        raise BadInputError(f"opset {opset} is too old", f"use --opset {MIN_OPSET} or newer "
                            "(LayerNormalization stays one op, needed for FP16)")
    path = check_output_path(Path(path))
    spec = model.spec
    dummy = torch.zeros(2, 3, spec.img_size, spec.img_size)
    outputs = [OUTPUT_NAME] + (selection_output_names(spec) if model.emit_selection else [])
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}
    tmpdir = Path(tempfile.mkdtemp(prefix=".idle-export-", dir=path.parent))
    try:
        raw = tmpdir / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(model.eval(), (dummy,), str(raw), dynamo=True, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=outputs,
                              dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
                              optimize=True)
        proto = onnx.load(str(raw))
        OnnxMetadata({"idle_export.tool_version": __version__, "idle_export.opset": str(opset),
                      **(metadata or {})}).write(proto)
        proto.producer_name = "idle-export"
        proto.producer_version = __version__
        proto.doc_string = f"IdleViT {spec.describe()}{' (dense baseline)' if model.dense else ''}"
        install_onnx(proto, tmpdir, path, external_data=external_data, check=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path




def export_checkpoint(ckpt, spec, output: str | Path, *, dense: bool = False,
                      emit_selection: bool = False, score_mode: str = "folded",
                      opset: int = DEFAULT_OPSET, external_data: bool = False) -> Path:
    """Checkpoint (already loaded) → ONNX with the full idle-export metadata."""
    import json

    output = check_output_path(Path(output))
    if dense:
        score_mode = "official"  # a dense layer computes every key: there is nothing to fold
    model = vit.build_model(spec, ckpt.state_dict, dense=dense, emit_selection=emit_selection,
                        score_mode=score_mode)
    metadata = {
        **spec.to_metadata(),
        "idle_export.dense": json.dumps(dense),
        "idle_export.score_mode": json.dumps(score_mode),
        "idle_export.checkpoint_sha256": json.dumps(ckpt.sha256),
        "idle_export.checkpoint_weights": json.dumps(ckpt.source),
    }
    if ckpt.classes:
        metadata["idle_export.classes"] = json.dumps(ckpt.classes)
    return export_onnx(model, output, opset=opset, external_data=external_data, metadata=metadata)


