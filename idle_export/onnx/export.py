"""torch → ONNX: dynamic batch, opset ≥ 17, metadata, atomic write, optional external data."""

from __future__ import annotations

from pathlib import Path

from idle_export import __version__
from idle_export.errors import BadInputError
from idle_export.fileio import check_free_space, check_output_path, mapped_disk_full, output_folder, work_dir
from idle_export.lazy import lazy_module
from idle_export.model.families import FAMILIES, family_of
from idle_export.numerics import describe_nonfinite
from idle_export.onnx.elastic import check_elastic_spec, to_elastic
from idle_export.onnx.io import (
    DEFAULT_OPSET,
    INPUT_NAME,
    MAX_BATCH,
    OUTPUT_NAME,
    check_opset,
    install_onnx,
    selection_output_names,
)
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.onnx.plugin_form import to_plugin_form
from idle_export.onnx.targets import DEFAULT_TARGET, apply_target, check_target

build = lazy_module("idle_export.model.build")  # torch


def export_onnx(model, path: str | Path, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                external_data: bool = False, metadata: dict[str, str] | None = None,
                plugin: bool = False, target: str = DEFAULT_TARGET, elastic: bool = False) -> Path:
    """Export a model of model.build.build_model (IdleViT, LV-ViT, EViT, DynamicViT, or its dense
    twin; with a ModelSpec, or an EViTSpec/DynamicViTSpec of their own modules) and
    write `path` (+ `path.data`) atomically. plugin: rewrite each idle layer's selection into
    IdleSelect/IdleScatter nodes that are also model-local functions (onnx.plugin_form).
    target: the graph passes of where the file runs (onnx.targets; portable writes none).
    elastic: K computed in the graph from a keep_rate input (onnx.elastic)."""
    import onnx
    import torch

    check_opset(opset)
    check_target(target)
    if plugin and target not in ("portable", "tensorrt"):
        raise BadInputError(f"plugin=True writes the plugin form for TensorRT; target={target} tunes "
                            "the standard form", "drop plugin=True, or use target=portable")
    path = check_output_path(Path(path), stream_ok=not external_data)
    spec = model.spec
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    check_free_space(output_folder(path), needed, path)
    dummy = torch.zeros(2, 3, spec.img_size, spec.img_size)
    outputs = [OUTPUT_NAME] + (selection_output_names(spec) if model.emit_selection else [])
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}
    with work_dir(output_folder(path), "onnx") as tmpdir, mapped_disk_full(path, needed):
        raw = tmpdir / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(model.eval(), (dummy,), str(raw), dynamo=True, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=outputs,
                              dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
                              optimize=True)
        proto = onnx.load(str(raw))
        raw.unlink()  # the final file takes its place on disk
        OnnxMetadata({"idle_export.tool_version": __version__, "idle_export.opset": str(opset),
                      **(metadata or {})}).write(proto)
        proto.producer_name = "idle-export"
        proto.producer_version = __version__
        title = FAMILIES[spec.family].title  # ModelSpec, EViTSpec and DynamicViTSpec name theirs
        proto.doc_string = f"{title} {spec.describe()}{' (dense baseline)' if model.dense else ''}"
        if plugin:
            proto = to_plugin_form(proto)
        if elastic:
            proto = to_elastic(proto)
        proto = apply_target(proto, target)
        install_onnx(proto, tmpdir, path, external_data=external_data, check=True)
    return path


def export_checkpoint(ckpt, spec, output: str | Path, *, dense: bool = False,
                      emit_selection: bool = False, score_mode: str | None = None,
                      opset: int = DEFAULT_OPSET, external_data: bool = False,
                      plugin: bool = False, target: str = DEFAULT_TARGET, elastic: bool = False,
                      allow_nonfinite: bool = False) -> Path:
    """Checkpoint (already loaded) → ONNX with the full idle-export metadata; plugin: the
    plugin form (IdleSelect/IdleScatter, folded scores only); elastic: one file for every keep
    rate (a keep_rate input, onnx.elastic). score_mode None: the family's default (folded for
    IdleViT). Weights with NaN or inf are refused unless `allow_nonfinite`. What a family
    cannot do (EViT and DynamicViT: plugin, elastic) is refused first."""
    import json

    output = check_output_path(Path(output), stream_ok=not external_data)
    family = family_of(spec.arch)
    if plugin:
        family.refuse("plugin=True", "drop plugin=True")
    if elastic:
        family.refuse("elastic=True", "drop elastic=True (export one file per keep=)")
    score_mode = family.scores(score_mode)
    if plugin and dense:
        raise BadInputError("plugin=True fuses the idle layers' token selection; the dense baseline "
                            "has none", "drop plugin=True (or dense=True)")
    if plugin and score_mode != "folded":
        raise BadInputError(f"plugin=True computes folded scores (xn·w); scores={score_mode} "
                            "computes keys for every token", "use scores=folded (the default)")
    bad = ckpt.nonfinite()
    if bad and not allow_nonfinite:
        raise BadInputError(f"{ckpt.path.name} has non-finite weights: {describe_nonfinite(bad)}",
                            "fix the checkpoint (a diverged run?), or export it as it is with "
                            "allow_nonfinite=True")
    if elastic:
        check_elastic_spec(spec, dense=dense, plugin=plugin)
    if dense:
        score_mode = "official"  # a dense layer computes every key: there is nothing to fold
    # LV-ViT: the stem's BatchNorms folded into its convs (no BatchNormalization in the graph)
    model = build.build_model(spec, ckpt.state_dict, dense=dense, emit_selection=emit_selection,
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
    return export_onnx(model, output, opset=opset, external_data=external_data, metadata=metadata,
                       plugin=plugin, target=target, elastic=elastic)


