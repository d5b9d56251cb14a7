"""TensorRT Quickly Deployable Plugins (QDP) for IdleSelect and IdleScatter, AOT only.

``register()`` defines ``idle_export::IdleSelect`` (inputs xn, x, w; int attribute k) and
``idle_export::IdleScatter`` (inputs x, idx, res) with ``tensorrt.plugin.register`` (shapes
and dtypes from :mod:`.spec`) and ``tensorrt.plugin.aot_impl`` (PTX from :mod:`.aot`, launch
grid from :mod:`.spec`). The engine embeds the kernel, so it runs in trtexec or Triton
Inference Server's TensorRT backend without Python or this package. In ONNX, a node with
op_type ``IdleSelect``/``IdleScatter`` and the attributes of ``spec.trt_onnx_attributes``
(``plugin_namespace="idle_export"``, ``aot=1``) selects them; N and C must be static.

Needs ``tensorrt`` >= 10.12 (``tensorrt.plugin.aot_impl``; tensorrt_rtx has no plugins).
Importing this module imports no TensorRT; :func:`register` does. No
``from __future__ import annotations`` here: tensorrt.plugin inspects real annotations.
"""

import os
from typing import Any, Union

from .aot import compile_scatter, compile_select, loadable_ptx_version
from .spec import (
    OP_SCATTER,
    OP_SELECT,
    plugin_id,
    scatter_block_sizes,
    scatter_grid,
    scatter_output_dtype,
    scatter_output_shape,
    select_grid,
    select_output_dtypes,
    select_output_shapes,
)

MIN_TENSORRT = (10, 12)
SELECT_ID = plugin_id(OP_SELECT)
SCATTER_ID = plugin_id(OP_SCATTER)
_REGISTERED: dict = {}


class TensorRTPluginUnavailable(ImportError):
    """tensorrt (>= 10.12, with tensorrt.plugin.aot_impl) is not installed."""


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in str(text).split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def import_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, tensorrt.plugin), or TensorRTPluginUnavailable saying what is missing."""
    need = ".".join(map(str, MIN_TENSORRT))
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTPluginUnavailable(
            f"the IdleSelect/IdleScatter TensorRT plugins need `tensorrt` >= {need} "
            "(pip install tensorrt); TensorRT-RTX has no plugin layers") from exc
    if _version(getattr(trt, "__version__", "0")) < MIN_TENSORRT:
        raise TensorRTPluginUnavailable(
            f"tensorrt {trt.__version__} is too old: the AOT plugins need >= {need}")
    try:
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise TensorRTPluginUnavailable("tensorrt.plugin is missing from this tensorrt") from exc
    if not hasattr(trtp, "aot_impl"):
        raise TensorRTPluginUnavailable("this tensorrt.plugin has no aot_impl")
    return trt, trtp


def _dtype_name(trt: Any, dtype: Any) -> str:
    names = {trt.float32: "float32", trt.float16: "float16", trt.int64: "int64",
             trt.int32: "int32"}
    if dtype not in names:
        raise ValueError(f"unsupported TensorRT dtype {dtype}")
    return names[dtype]


def _const(expr: Any) -> int | None:
    """The value of a build-time-constant ShapeExpr, else None."""
    try:
        if getattr(expr, "is_fake", False) or not expr.is_constant:
            return None
        return int(expr.constant_value())
    except (RuntimeError, AttributeError, ValueError, TypeError):
        return None


def _static_dim(desc: Any, dim: int, what: str) -> int:
    value = _const(desc.shape_expr[dim])
    if value is None:
        try:
            value = int(desc.shape[dim])
        except (ValueError, AttributeError, TypeError, IndexError):
            value = -1
    if value < 0:
        raise ValueError(f"{what} must be a static dimension for the fused idle kernels")
    return value


def target_sm(sm: int | None = None) -> int:
    """Compute capability to compile for: ``sm``, $IDLE_EXPORT_PLUGIN_SM, else the current
    CUDA device's (through torch)."""
    if sm is None and os.environ.get("IDLE_EXPORT_PLUGIN_SM"):
        sm = int(os.environ["IDLE_EXPORT_PLUGIN_SM"])
    if sm is None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device to compile for: pass register(sm=...) or set "
                               "IDLE_EXPORT_PLUGIN_SM")
        major, minor = torch.cuda.get_device_capability()
        sm = major * 10 + minor
    return int(sm)


def _ptx_version(sm: int, ptx_version: Union[int, str, None]) -> int | None:
    return loadable_ptx_version(sm) if ptx_version == "driver" else ptx_version


def register(sm: int | None = None, ptx_version: Union[int, str, None] = "driver"
             ) -> tuple[str, str]:
    """Register both plugins with TensorRT (once per process); returns their ids.

    sm: compute capability of the engine's GPU (default: see :func:`target_sm`, resolved
    when a kernel is compiled). ptx_version: PTX ISA to emit; "driver" (default) caps it to
    what the local driver loads, None keeps triton's.
    """
    if _REGISTERED:
        return SELECT_ID, SCATTER_ID
    trt, trtp = import_tensorrt()

    def trt_dtype(name: str) -> Any:
        return {"float32": trt.float32, "float16": trt.float16, "int64": trt.int64}[name]

    @trtp.register(SELECT_ID)
    def idle_select_desc(xn: trtp.TensorDesc, x: trtp.TensorDesc, w: trtp.TensorDesc, k: int
                         ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        dtypes = select_output_dtypes(*(_dtype_name(trt, t.dtype) for t in (xn, x, w)))
        shapes = select_output_shapes(xn.shape_expr[0], _const(xn.shape_expr[1]),
                                      xn.shape_expr[2], k)
        return tuple(trtp.from_shape_expr(s, dtype=trt_dtype(d)) for s, d in zip(shapes, dtypes))

    @trtp.aot_impl(SELECT_ID)
    def idle_select_aot(xn: trtp.TensorDesc, x: trtp.TensorDesc, w: trtp.TensorDesc, k: int,
                        outputs: tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc],
                        tactic: int
                        ) -> tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                                   trtp.SymExprs]:
        n, c = _static_dim(xn, 1, "N"), _static_dim(xn, 2, "C")
        arch = target_sm(sm)
        kb = compile_select(arch, n, c, int(k), *(_dtype_name(trt, t.dtype) for t in (xn, x, w)),
                            ptx_version=_ptx_version(arch, ptx_version))
        return kb.name, kb.ptx, _launch(trtp, select_grid(xn.shape_expr[0]), kb), \
            trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in (n, c, int(k))])

    @trtp.register(SCATTER_ID)
    def idle_scatter_desc(x: trtp.TensorDesc, idx: trtp.TensorDesc, res: trtp.TensorDesc
                          ) -> trtp.TensorDesc:
        scatter_output_dtype(*(_dtype_name(trt, t.dtype) for t in (x, idx, res)))
        n, s = _const(x.shape_expr[1]), _const(idx.shape_expr[1])
        if n is not None and s is not None:
            scatter_output_shape(x.shape_expr[0], n, x.shape_expr[2], s)
        return x.like()

    @trtp.aot_impl(SCATTER_ID)
    def idle_scatter_aot(x: trtp.TensorDesc, idx: trtp.TensorDesc, res: trtp.TensorDesc,
                         outputs: tuple[trtp.TensorDesc], tactic: int
                         ) -> tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                                    trtp.SymExprs]:
        n, c = _static_dim(x, 1, "N"), _static_dim(x, 2, "C")
        s = _static_dim(idx, 1, "K+1")
        arch = target_sm(sm)
        kb = compile_scatter(arch, n, c, s, _dtype_name(trt, x.dtype),
                             ptx_version=_ptx_version(arch, ptx_version))
        grid = scatter_grid(x.shape_expr[0], n, scatter_block_sizes(n, c, s))
        return kb.name, kb.ptx, _launch(trtp, grid, kb), \
            trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in (n, c, s)])

    _REGISTERED.update(sm=sm, ptx_version=ptx_version)
    return SELECT_ID, SCATTER_ID


def _launch(trtp: Any, grid: tuple, kb: Any) -> Any:
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = grid
    params.block_x = kb.threads
    params.shared_mem = kb.shared
    return params


def build_engine(b: int, n: int, c: int, k: int, dtype: str = "float32") -> bytes:
    """A serialized strongly typed engine: IdleSelect(xn, x, w; k) -> idx, xn_sel, x_sel, then
    IdleScatter(x, idx, xn_sel) -> out (the GPU acceptance check of both AOT plugins)."""
    trt, trtp = import_tensorrt()
    register()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    dt = {"float32": trt.float32, "float16": trt.float16}[dtype]
    xn = network.add_input("xn", dt, (b, n, c))
    x = network.add_input("x", dt, (b, n, c))
    w = network.add_input("w", dt, (b, c))
    sel = network.add_plugin(trtp.op.idle_export.IdleSelect(xn, x, w, k=int(k)), aot=True)
    scat = network.add_plugin(trtp.op.idle_export.IdleScatter(x, sel.get_output(0),
                                                              sel.get_output(1)), aot=True)
    for i, name in enumerate(("idx", "xn_sel", "x_sel")):
        sel.get_output(i).name = name
        network.mark_output(sel.get_output(i))
    scat.get_output(0).name = "out"
    network.mark_output(scat.get_output(0))
    blob = builder.build_serialized_network(network, builder.create_builder_config())
    if blob is None:
        raise RuntimeError("TensorRT failed to build the plugin test engine (see its log)")
    return bytes(blob)


def run_engine(blob: bytes, feeds: dict) -> dict:
    """Run a serialized engine on torch CUDA tensors; returns the outputs by name."""
    import torch

    trt, _ = import_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(blob)
    ctx = engine.create_execution_context()
    torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64}
    outputs, inputs = {}, {name: t.contiguous() for name, t in feeds.items()}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            ctx.set_tensor_address(name, inputs[name].data_ptr())
        else:
            out = torch.empty(tuple(ctx.get_tensor_shape(name)),
                              dtype=torch_dtype[engine.get_tensor_dtype(name)], device="cuda")
            ctx.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
    stream = torch.cuda.current_stream()
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return outputs
