"""torch → ONNX: dynamic batch, opset ≥ 17, metadata, atomic write, optional external data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from idle_export import __version__
from idle_export.errors import BadInputError

MIN_OPSET = 17
DEFAULT_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


SELECTION_PREFIX = "selection_layer"  # + idle layer index: the int64 [B, K+1] kept-token outputs


def selection_output_names(spec) -> list[str]:
    return [f"{SELECTION_PREFIX}{i}" for i in spec.idle_layers]


def check_output_path(path: Path, option: str = "-o/--output") -> Path:
    """Fail before any work if the output cannot be written."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.exists() and path.is_dir():
        raise BadInputError(f"output {path} is a folder", "give a file name such as model.onnx")
    if not folder.exists():
        raise BadInputError(f"output folder {folder} does not exist", f"create it: mkdir -p {folder}")
    if not folder.is_dir():
        raise BadInputError(f"output folder {folder} is not a folder", "give a path inside a folder")
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".idle-export-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError:
        raise BadInputError(f"output folder {folder} is not writable",
                            f"choose another {option} or fix the folder's permissions") from None
    return path


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
        set_metadata(proto, {"idle_export.tool_version": __version__, "idle_export.opset": str(opset),
                             **(metadata or {})})
        proto.producer_name = "idle-export"
        proto.producer_version = __version__
        proto.doc_string = f"IdleViT {spec.describe()}{' (dense baseline)' if model.dense else ''}"
        install_onnx(proto, tmpdir, path, external_data=external_data, check=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def set_metadata(proto, props: dict[str, str]) -> None:
    """Replace the model's metadata_props with `props` (sorted by key)."""
    del proto.metadata_props[:]
    for key, value in sorted(props.items()):
        proto.metadata_props.add(key=key, value=value)


def install_onnx(proto, tmpdir: Path, path: Path, *, external_data: bool, check: bool = False) -> None:
    """Save `proto` in `tmpdir` (weights in `path.data` with external_data), optionally run the
    full ONNX checker on it, then rename it (and its data file) onto `path`. A stale `path.data`
    of an earlier external-data file is removed when the new file embeds its weights."""
    import onnx

    final = tmpdir / path.name
    data_name = path.name + ".data"
    if external_data:
        onnx.save_model(proto, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(final))
    if check:
        onnx.checker.check_model(str(final), full_check=True)
    if external_data:
        os.replace(tmpdir / data_name, path.parent / data_name)
    elif (path.parent / data_name).exists():
        os.remove(path.parent / data_name)
    os.replace(final, path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """metadata_props of an ONNX file, without loading its weights."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def export_checkpoint(ckpt, spec, output: str | Path, *, dense: bool = False,
                      emit_selection: bool = False, score_mode: str = "folded",
                      opset: int = DEFAULT_OPSET, external_data: bool = False) -> Path:
    """Checkpoint (already loaded) → ONNX with the full idle-export metadata."""
    import json

    from idle_export.model.vit import build_model

    output = check_output_path(Path(output))
    if dense:
        score_mode = "official"  # a dense layer computes every key: there is nothing to fold
    model = build_model(spec, ckpt.state_dict, dense=dense, emit_selection=emit_selection,
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


def onnx_summary(path: str | Path) -> dict:
    """Op counts and metadata of an exported file (for reports and tests)."""
    from collections import Counter

    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in proto.graph.node)
    return {
        "path": str(path),
        "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0),
        "ops": dict(sorted(ops.items())),
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "metadata": {p.key: p.value for p in proto.metadata_props},
        "external_data": any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer),
    }
