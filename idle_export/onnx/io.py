"""ONNX files in and out: the exported graph's names, loading with one-line errors, saving
atomically (embedded or external weights), and a summary of a file's ops and metadata."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from idle_export.errors import BadInputError
from idle_export.fileio import is_stream, mapped_disk_full, resolve_output
from idle_export.numerics import nonfinite_counts

MIN_OPSET = 17


DEFAULT_OPSET = 18


INPUT_NAME = "images"


OUTPUT_NAME = "logits"
MAX_BATCH = 4096  # the bound of the exported graphs' dynamic batch dimension


SELECTION_PREFIX = "selection_layer"  # + idle layer index: the int64 [B, K+1] kept-token outputs


def check_opset(opset: int) -> int:
    """An opset the export can write: ≥ MIN_OPSET (LayerNormalization as one op, needed for FP16)
    and no newer than the installed onnx knows."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise BadInputError(f"opset {opset} is too old", f"use opset={MIN_OPSET} or newer "
                            "(LayerNormalization stays one op, needed for FP16)")
    if opset > newest:
        raise BadInputError(f"opset {opset} is newer than the installed onnx knows ({newest})",
                            f"use opset={DEFAULT_OPSET} (any of {MIN_OPSET}..{newest})")
    return opset


def selection_output_names(spec) -> list[str]:
    return [f"{SELECTION_PREFIX}{i}" for i in spec.idle_layers]




def install_onnx(proto, tmpdir: Path, path: Path, *, external_data: bool, check: bool = False) -> None:
    """Save `proto` in `tmpdir` (weights in `path.data` with external_data), optionally run the
    full ONNX checker on it, then rename it (and its data file) onto `path` (a symlink's target;
    a stream such as /dev/null gets the bytes written through). A stale `path.data` of an earlier
    external-data file is removed when the new file embeds its weights."""
    import onnx

    stream = is_stream(path)
    if stream and external_data:
        raise BadInputError(f"output={path} is not a regular file; external_data=True writes "
                            f"{path.name}.data "
                            "beside it", "give output= a file path, or drop external_data=True")
    target = path if stream else resolve_output(path)
    final = tmpdir / target.name
    data_name = target.name + ".data"
    with mapped_disk_full(path, proto.ByteSize()):
        if external_data:
            onnx.save_model(proto, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, str(final))
    if check:
        onnx.checker.check_model(str(final), full_check=True)
    if stream:
        with open(final, "rb") as src, open(path, "ab") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return
    umask = os.umask(0)
    os.umask(umask)
    for written in (final, tmpdir / data_name):  # the usual file mode (onnx writes its data 0600)
        if written.exists():
            os.chmod(written, 0o666 & ~umask)
    if external_data:
        os.replace(tmpdir / data_name, target.parent / data_name)
    elif (target.parent / data_name).exists():
        os.remove(target.parent / data_name)
    os.replace(final, target)


def nonfinite_initializers(proto) -> list[tuple[str, int, int, int]]:
    """numerics.nonfinite_counts of a loaded model's float weights (initializers and Constants)."""
    from onnx import numpy_helper

    tensors = [(t.name, t) for t in proto.graph.initializer]
    tensors += [(n.output[0], a.t) for n in proto.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value" and a.t.data_type in (1, 10, 11, 16)]
    return nonfinite_counts((name, numpy_helper.to_array(t)) for name, t in tensors
                            if t.data_type in (1, 10, 11, 16))  # float, float16, double, bfloat16


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


def load_onnx_header(path: str | Path):
    """onnx.ModelProto without its weights (graph, metadata); bad files give a one-line error."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"ONNX file not found: {path}", "check the path")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - DecodeError and friends
        raise BadInputError(f"{path.name} is not an ONNX model ({type(e).__name__})",
                            "pass a file written by `idle-export onnx`") from None


def load_onnx(path: str | Path):
    """onnx.ModelProto with external data resolved; bad files give a one-line error."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise BadInputError(f"ONNX file not found: {path}", "check the path")
    if not path.is_file():
        raise BadInputError(f"{path} is not a file", "pass the .onnx file itself")
    try:
        proto = onnx.load(str(path))
    except FileNotFoundError as e:
        raise BadInputError(f"{path.name} refers to external weights that are missing ({e.filename})",
                            "keep the .onnx.data file next to the .onnx file") from None
    except Exception as e:  # onnx raises DecodeError and friends
        raise BadInputError(f"{path.name} is not an ONNX model ({type(e).__name__})",
                            "pass a file written by `idle-export onnx` or torch.onnx.export") from None
    if not proto.graph.node or not proto.graph.output:  # an empty file parses as an empty model
        raise BadInputError(f"{path.name} is not an ONNX model (no graph: {path.stat().st_size} bytes)",
                            "pass a file written by `idle-export onnx` or torch.onnx.export")
    return proto


def check_batch_sizes(values, name: str = "batch_sizes", example: str = "1,8,64") -> list[int]:
    """Batch sizes to run: at least one, positive, at most MAX_BATCH (the exported graphs' batch
    bound). Errors name the parameter `name=` (the CLI prints its flag)."""
    sizes = [int(b) for b in values]
    if not sizes or min(sizes) < 1:
        raise BadInputError(f"{name}={sizes} needs positive sizes", f"e.g. {name}={example}")
    if max(sizes) > MAX_BATCH:
        raise BadInputError(f"{name}={sizes}: {max(sizes)} is above {MAX_BATCH}, the largest batch an "
                            "exported graph takes", f"e.g. {name}={example}")
    return sizes
