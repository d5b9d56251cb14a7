"""Build a TensorRT engine from an ONNX file: TensorRT 10 (builder flags), TensorRT 11 and
TensorRT-RTX (strongly typed: the precision is written into the ONNX), plus its sidecar.

Flavours (trt/flavour.py), chosen in this order unless `flavour=` / IDLE_EXPORT_TRT says otherwise:
  tensorrt       TensorRT 10.x: FP32 ONNX + BuilderFlag.FP16/INT8; the score path is pinned to
                 FP32 with layer precision constraints. TensorRT 11+: strongly typed, like RTX.
                 Builds for the GPU in the machine (needs one).
  tensorrt_rtx   TensorRT-RTX: always strongly typed; builds without a GPU, for one target
                 (`target="sm89"`) or portable (all Ampere and later RTX GPUs).
Strongly typed FP16 builds take the graph of `onnx.fp16.convert_fp16` (written beside the engine
as NAME.fp16.onnx); INT8 takes an ONNX with Q/DQ nodes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from idle_export import __version__
from idle_export.errors import BadInputError, IdleExportError, MissingDependencyError
from idle_export.fileio import (
    atomic_write_bytes,
    check_free_space,
    check_output_path,
    output_folder,
    sha256_file,
)
from idle_export.hardware import gpu_info
from idle_export.onnx.elastic import PERMILLE, permille, to_integer_form
from idle_export.onnx.fp16 import fp16_onnx, score_path_nodes
from idle_export.onnx.io import SELECTION_PREFIX, load_onnx
from idle_export.trt import plugin as trt_plugin
from idle_export.trt.flavour import (
    PIP,
    PRECISIONS,
    Interruptible,
    TrtInfo,
    import_trt,
    make_logger,
    parse_target,
)
from idle_export.trt.inputs import check_batch, check_graph, default_engine_path, onnx_facts
from idle_export.trt.sidecar import SIDECAR_FORMAT, sidecar_path, trtexec_command

# ----------------------------------------------------------------------------- options


# ----------------------------------------------------------------------------- ONNX facts


# ----------------------------------------------------------------------------- build


def build_engine(onnx: str | Path, *, precision: str = "fp16", batch=(1, 32, 64), target: str | None = None,
                 timing_cache: str | Path | None = None, workspace: int | None = None,
                 verbose: bool = False, output: str | Path | None = None, flavour: str | None = None,
                 selection: bool = False, plugin: bool = False, echo: Callable[[str], None] | None = None,
                 keep_range: tuple[int, int, int] | None = None) -> dict:
    """Build ENGINE (+ ENGINE.json) from an ONNX file; returns the sidecar dict (with timings).

    precision: fp32 | fp16 | int8 (int8 needs Q/DQ nodes in the ONNX); batch: (min, opt, max);
    target: compute capability for a TensorRT-RTX cross-build ('sm89'); workspace in MiB;
    selection: also output each TopK's indices as selection_layer{L} (for parity checks);
    plugin: a plugin-form ONNX with the fused kernels as TensorRT AOT plugins (trt/plugin.py).
    keep_range: an elastic file (`onnx --elastic`) built with its rate as the int64 shape input
    keep_permille, profile (min, opt, max) in thousandths (onnx.elastic.to_integer_form; the
    graph the parser reads is written beside the engine as NAME.elastic.onnx).

    Polygraphy's loader chain (NetworkFromOnnxPath → CreateConfig → EngineBytesFromNetwork) has no
    compute-capability targets for TensorRT-RTX cross-builds and no FP32 pinning of the score path
    under TensorRT 10's FP16 flag, so the build stays ours; running an engine uses Polygraphy.
    """
    echo = echo or (lambda s: None)
    if precision not in PRECISIONS:
        raise BadInputError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}",
                            "pass precision=fp32, precision=fp16 or precision=int8")
    batch = check_batch(batch)
    onnx = Path(onnx)
    output = Path(output) if output is not None else default_engine_path(onnx, precision)
    if output.resolve() == onnx.resolve():
        raise BadInputError("the engine would overwrite the ONNX file", "pass output=NAME.engine")
    check_output_path(output, stream_ok=False)  # the sidecar ENGINE.json goes beside it
    if timing_cache is not None:  # read and written: it must be a writable file
        check_output_path(Path(timing_cache), "timing_cache=")
    if workspace is not None and workspace < 1:
        raise BadInputError(f"workspace={workspace} MiB must be at least 1", "e.g. workspace=4096")
    model, flavour, inlined = trt_plugin.prepare(onnx, load_onnx(onnx), plugin, precision, target, flavour)
    source = onnx
    if keep_range is not None:
        model = to_integer_form(model)
        source = output.with_name(f"{output.name.removesuffix('.engine')}.elastic.onnx")
    facts = onnx_facts(model)
    check_graph(onnx, model, facts, precision, batch)
    check_free_space(output_folder(output), _space_needed(onnx, precision, facts), output)
    trt, target, gpu = _choose_trt(flavour, target, echo)
    # a failed or interrupted build leaves nothing behind, not even the graph it wrote for the
    # parser (FP16, inlined, plugin copy or elastic integer form), nor an engine without its sidecar
    written: list[Path] = []
    try:
        parsed, fp16_report, strongly_typed, plugin_info = trt_plugin.graph_to_parse(
            _graph_to_parse, trt, model, facts, source, output, precision, selection, plugin, inlined, echo)
        if parsed == source != onnx:  # the elastic integer form, parsed as it is
            echo(f"elastic: writing {source.name} (keep_permille, an int64 shape input)")
            atomic_write_bytes(source, model.SerializeToString())
        fp32_layers = sorted(score_path_nodes(model)) if precision == "fp16" and not strongly_typed else []

        if parsed != onnx:
            written.append(parsed)
        with Interruptible(trt) as interrupt:
            data, network, config, name, chw, seconds, cache_note, selection_outputs, _parser = _build(
                trt, parsed, facts, batch, precision, strongly_typed, fp32_layers, target, workspace,
                timing_cache, selection, verbose, echo, interrupt, plugin_info, keep_range)
        if timing_cache is not None and trt.flavour == "tensorrt":
            atomic_write_bytes(Path(timing_cache), bytes(config.get_timing_cache().serialize()))
        io = [_tensor_desc(network.get_input(i)) for i in range(network.num_inputs)] + \
             [_tensor_desc(network.get_output(i)) for i in range(network.num_outputs)]
        sidecar = {
            "format": SIDECAR_FORMAT,
            "engine": output.name,
            "engine_sha256": hashlib.sha256(data).hexdigest(),
            "engine_bytes": len(data),
            "flavour": trt.flavour,
            "trt_version": trt.version,
            "strongly_typed": bool(strongly_typed),
            "compute_capability": target or (gpu["compute_capability"] if gpu else "portable"),
            "gpu": gpu["name"] if gpu else None,
            "precision": precision,
            "profiles": [{"input": name, "min": [batch[0], *chw], "opt": [batch[1], *chw],
                          "max": [batch[2], *chw]}],
            "elastic": keep_range and {"input": facts["shape_input"], "scale": PERMILLE,
                                       "min": keep_range[0], "opt": keep_range[1], "max": keep_range[2],
                                       "default": permille(facts["metadata"].elastic["default"])},
            "io": io,
            "onnx": {"path": onnx.name, "sha256": sha256_file(onnx)},
            "built_from": {"path": parsed.name, "sha256": sha256_file(parsed)} if parsed != onnx else None,
            "fp16_pass": fp16_report and {k: v for k, v in fp16_report.items() if k != "path"},
            "fp32_layers": fp32_layers,
            "selection_outputs": selection_outputs,
            "plugin": plugin_info,
            "workspace_mib": workspace,
            "timing_cache": cache_note,
            "build_seconds": round(seconds, 2),
            "tool_version": __version__,
            "model": facts["metadata"].ours(),
        }
        sidecar["trtexec"] = trtexec_command(sidecar, parsed, output, trt, timing_cache, verbose)
        atomic_write_bytes(output, data)
        written.append(output)
        atomic_write_bytes(sidecar_path(output), (json.dumps(sidecar, indent=2) + "\n").encode())
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return sidecar


def _build(trt: TrtInfo, parsed: Path, facts: dict, batch, precision: str, strongly_typed: bool,
           fp32_layers: list[str], target: str | None, workspace: int | None, timing_cache,
           selection: bool, verbose: bool, echo, interrupt: Interruptible, plugin_info: dict | None,
           keep_range: tuple[int, int, int] | None = None):
    """Parse and build; returns the plan bytes and what the sidecar records about the build."""
    mod = trt.module
    logger = make_logger(trt, verbose, echo)
    builder = mod.Builder(logger)
    t0 = time.perf_counter()
    network, _parser = _parse(trt, builder, logger, parsed, strongly_typed)  # the parser owns weights
    selection_outputs = (plugin_info["selection_outputs"] if plugin_info else
                         _mark_selection(mod, network, facts)) if selection else []
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    chw = tuple(facts["shape"][1:])
    profile.set_shape(name, (batch[0], *chw), (batch[1], *chw), (batch[2], *chw))
    if keep_range is not None:  # a scalar shape input: one value each
        profile.set_shape_input(facts["shape_input"], [keep_range[0]], [keep_range[1]], [keep_range[2]])
    config.add_optimization_profile(profile)
    _set_precision(trt, network, config, precision, strongly_typed, fp32_layers)
    if workspace is not None:
        config.set_memory_pool_limit(mod.MemoryPoolType.WORKSPACE, int(workspace) << 20)
    if target is not None:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(mod.ComputeCapability, target.upper()), 0)
    cache_note = _load_timing_cache(trt, config, timing_cache)
    monitor = interrupt.monitor()
    if monitor is not None:
        config.progress_monitor = monitor
    try:
        plan = builder.build_serialized_network(network, config)
        interrupt.check()
    except BaseException:
        # TensorRT's objects call back into the Python logger and progress monitor: release them
        # now, in dependency order, not whenever the traceback's frame is torn down
        del config, profile, network, _parser, builder
        raise
    if plan is None:
        errs = logger.errors()
        raise IdleExportError(f"{trt.label} could not build {parsed.name}: "
                              f"{errs[-1] if errs else 'no error message'}",
                              "rerun with -v for the builder log; check `idle-export lint`")
    return (bytes(plan), network, config, name, chw, time.perf_counter() - t0, cache_note,
            selection_outputs, _parser)


def _choose_trt(flavour: str | None, target: str | None, echo) -> tuple[TrtInfo, str | None, dict | None]:
    """The TensorRT to build with, the checked target, and the GPU (TensorRT builds for it)."""
    if flavour is None and target is not None and not os.environ.get("IDLE_EXPORT_TRT"):
        if importlib.util.find_spec("tensorrt_rtx") is not None:
            flavour = "tensorrt_rtx"  # --target means a cross-build: only RTX does that
    trt = import_trt(flavour)
    echo(f"using {trt.label} ({'strongly typed' if trt.strongly_typed else 'builder flags'})")
    target = parse_target(target, trt)
    gpu = None
    if trt.flavour == "tensorrt":
        if target is not None:
            raise BadInputError(f"target={target}: {trt.label} builds only for the GPU in this machine",
                                f"cross-build with TensorRT-RTX: {PIP['tensorrt_rtx']}")
        gpu = gpu_info()
        if gpu is None:
            raise MissingDependencyError(f"{trt.label} needs an NVIDIA GPU to build engines; none found",
                                         f"build without a GPU with TensorRT-RTX: {PIP['tensorrt_rtx']} "
                                         "and pass target=sm89 (or your GPU's)")
    return trt, target, gpu


def _space_needed(onnx: Path, precision: str, facts: dict) -> int:
    """About the bytes a build writes: the engine (about the ONNX weights' size: TensorRT-RTX's
    FP16 engine of DeiT-Tiny is as large as its FP32 ONNX) and, for a strongly typed FP16 build
    of an FP32 file, the FP16 graph beside it."""
    size = onnx.stat().st_size + sum(p.stat().st_size for p in onnx.parent.glob(onnx.name + ".data"))
    engine = 0.5 if precision == "int8" else 1.0
    fp16_graph = 0.5 if precision == "fp16" and not facts["fp16"] else 0.0
    return int(size * (engine + fp16_graph))


def _graph_to_parse(trt: TrtInfo, model, facts: dict, onnx: Path, output: Path, precision: str,
                    echo) -> tuple[Path, dict | None, bool]:
    """The file the parser reads (a strongly typed FP16 build gets the FP16 pass's graph, written
    beside the engine), the FP16 pass report, and whether the network is strongly typed."""
    strongly_typed = trt.strongly_typed or (precision == "fp16" and facts["fp16"])
    if not (precision == "fp16" and strongly_typed and not facts["fp16"]):
        return onnx, None, strongly_typed
    stem = output.name[:-7] if output.name.endswith(".engine") else output.name
    parsed = output.with_name(stem + (".onnx" if stem.endswith(".fp16") else ".fp16.onnx"))
    if parsed.resolve() == onnx.resolve():  # never overwrite the source
        parsed = output.with_name(stem + ".typed.onnx")
    echo(f"strongly typed FP16: writing {parsed.name} (scores/TopK FP32, indices INT64)")
    return parsed, fp16_onnx(model, parsed), strongly_typed  # the model loaded above, not the file again


def _parse(trt: TrtInfo, builder, logger, parsed: Path, strongly_typed: bool):
    mod = trt.module
    flags = 0
    if strongly_typed and trt.flavour == "tensorrt" and hasattr(mod.NetworkDefinitionCreationFlag,
                                                                 "STRONGLY_TYPED"):
        flags = 1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = mod.OnnxParser(network, logger)
    if not parser.parse_from_file(str(parsed)):
        errs = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errs[0] if errs else None
        where = f"node {first.node_name()} ({first.node_operator()}): " if first and first.node_name() else ""
        desc = first.desc() if first else (logger.errors() or ["unknown error"])[0]
        raise BadInputError(f"{trt.label}'s ONNX parser rejected {parsed.name}: {where}{desc}",
                            f"run `idle-export lint {parsed}`; rerun with -v for the parser log")
    return network, parser


def _set_precision(trt: TrtInfo, network, config, precision: str, strongly_typed: bool,
                   fp32_layers: list[str]) -> None:
    mod = trt.module
    if precision == "fp32" and hasattr(mod.BuilderFlag, "TF32"):
        config.clear_flag(mod.BuilderFlag.TF32)  # FP32 means FP32 (trtexec: --noTF32)
    if strongly_typed:
        return
    if precision == "fp16":
        config.set_flag(mod.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(mod.BuilderFlag.INT8)
    if fp32_layers:
        _pin_fp32(mod, network, config, set(fp32_layers))


def _mark_selection(mod, network, facts: dict) -> list[str]:
    """Make each TopK's index tensor an engine output named selection_layer{L} (idle layer L)."""
    topk = [network.get_layer(i) for i in range(network.num_layers)
            if network.get_layer(i).type == mod.LayerType.TOPK]
    layers = facts["metadata"].idle_layers or []
    if len(layers) != len(topk):
        layers = list(range(len(topk)))
    names = []
    for layer_index, layer in zip(layers, topk, strict=True):
        tensor = layer.get_output(1)
        tensor.name = f"{SELECTION_PREFIX}{layer_index}"
        network.mark_output(tensor)
        names.append(tensor.name)
    return names


def _pin_fp32(mod, network, config, node_names: set[str]) -> int:
    """TensorRT 10 with BuilderFlag.FP16: keep the layers of the score path in FP32."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in node_names or layer.type == mod.LayerType.TOPK:  # parser: layer = node name
            layer.precision = mod.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (mod.float32, mod.float16):
                    layer.set_output_type(j, mod.float32)
            pinned += 1
    if pinned:
        config.set_flag(mod.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    return pinned


def _load_timing_cache(trt: TrtInfo, config, path) -> str | None:
    if path is None:
        return None
    if trt.flavour == "tensorrt_rtx":
        return "not used: timing caches are no-ops in TensorRT-RTX (it compiles kernels at run time)"
    path = Path(path)
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None:
        raise BadInputError(f"timing_cache={path} is not a TensorRT timing cache",
                            "delete it (a new one is written) or pass another path")
    config.set_timing_cache(cache, False)  # ignore_mismatch=False
    return f"{'reused' if blob else 'created'} {path}"


def _tensor_desc(t) -> dict:
    return {"name": t.name, "dtype": str(t.dtype).split(".")[-1].lower(), "shape": list(t.shape),
            "mode": "input" if t.is_network_input else "output"}


