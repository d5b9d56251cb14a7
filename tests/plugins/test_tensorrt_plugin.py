"""The thin TensorRT QDP layer, without TensorRT: a clear ImportError when it is missing,
and ``register()`` driven through a stand-in ``tensorrt.plugin`` that checks the decorated
functions the way tensorrt.plugin 10.12+ validates them (argument schema, real annotations,
return annotations) and then calls them as the builder would (dtype pass with fake shapes,
shape pass, aot_impl). The real API runs only on a GPU machine (gpu_check --trt).
"""

from __future__ import annotations

import inspect
import os
import sys
import types
import typing

import pytest

from tests.plugins import load_module

tp = load_module("tensorrt_plugin")


class Expr:
    """Stand-in ShapeExpr: a constant (value) or a symbolic extent (None)."""

    def __init__(self, value=None, fake=False):
        self.value, self.is_fake = value, fake

    @property
    def is_constant(self):
        if self.is_fake:
            raise RuntimeError("fake ShapeExpr")
        return self.value is not None

    def constant_value(self):
        return self.value


def fake_tensorrt(version="10.13.0.35"):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32, trt.float16, trt.int64, trt.int32 = "FLOAT", "HALF", "INT64", "INT32"
    trtp = types.ModuleType("tensorrt.plugin")
    registry: dict = {}

    class TensorDesc:
        def __init__(self, shape_expr=(), dtype=None, shape=None):
            self.shape_expr, self.dtype, self.shape = list(shape_expr), dtype, shape

        def like(self):
            return TensorDesc(self.shape_expr, self.dtype, self.shape)

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = block_y = block_z = 1
        shared_mem = 0

    class SymExprs(list):
        pass

    class SymIntExprs(SymExprs):
        @classmethod
        def from_tuple(cls, values):
            return cls(values)

    class SymInt32:
        def __init__(self, value):
            self.value = value

    def check_annotations(fn):
        for p in inspect.signature(fn).parameters.values():
            assert not isinstance(p.annotation, str), f"postponed annotation on {p.name}"

    def register(pid):
        def deco(fn):
            check_annotations(fn)
            sig = inspect.signature(fn)
            ret = sig.return_annotation
            assert ret is TensorDesc or (typing.get_origin(ret) is tuple and all(
                a is TensorDesc for a in typing.get_args(ret)))
            registry[pid] = {"register": fn, "tensors": [n for n, p in sig.parameters.items()
                                                         if p.annotation is TensorDesc],
                             "attrs": {n: p.annotation for n, p in sig.parameters.items()
                                       if p.annotation is not TensorDesc}}
            return fn
        return deco

    def aot_impl(pid):
        def deco(fn):
            check_annotations(fn)
            entry = registry[pid]
            sig = inspect.signature(fn)
            assert list(sig.parameters) == [*entry["tensors"], *entry["attrs"], "outputs",
                                            "tactic"]
            for name, annotation in entry["attrs"].items():
                assert sig.parameters[name].annotation is annotation
            ret = typing.get_args(sig.return_annotation)
            assert len(ret) == 4 and ret[2] is KernelLaunchParams and issubclass(ret[3], SymExprs)
            entry["aot_impl"] = fn
            return fn
        return deco

    for obj in (TensorDesc, KernelLaunchParams, SymExprs, SymIntExprs, SymInt32, register,
                aot_impl):
        setattr(trtp, obj.__name__, obj)
    trtp.from_shape_expr = lambda shape, dtype: TensorDesc(shape, dtype)
    trt.plugin = trtp
    return trt, trtp, registry


def test_missing_tensorrt_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(tp, "_REGISTERED", {})
    with pytest.raises(ImportError, match=r"tensorrt` >= 10\.12") as info:
        tp.register()
    assert isinstance(info.value, tp.TensorRTPluginUnavailable)


def test_old_tensorrt_is_refused(monkeypatch):
    trt, trtp, _ = fake_tensorrt("10.8.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    with pytest.raises(tp.TensorRTPluginUnavailable, match="too old"):
        tp.import_tensorrt()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="aot_impl compiles the kernels: needs TRITON_INTERPRET unset")
def test_register_with_stand_in_tensorrt(monkeypatch, tmp_path):
    trt, trtp, registry = fake_tensorrt()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(tp, "_REGISTERED", {})
    assert tp.register(sm=89, ptx_version=None) == ("idle_export::IdleSelect",
                                                    "idle_export::IdleScatter")
    assert tp.register() == ("idle_export::IdleSelect", "idle_export::IdleScatter")  # once
    sel, scat = registry["idle_export::IdleSelect"], registry["idle_export::IdleScatter"]
    assert sel["tensors"] == ["xn", "x", "w"] and sel["attrs"] == {"k": int}
    assert scat["tensors"] == ["x", "idx", "res"] and scat["attrs"] == {}

    # dtype pass: TensorRT calls the descriptor with fake shape expressions
    fake = [Expr(fake=True)] * 3
    outs = sel["register"](trtp.TensorDesc(fake, "HALF"), trtp.TensorDesc(fake, "FLOAT"),
                           trtp.TensorDesc(fake[:2], "FLOAT"), k=5)
    assert [o.dtype for o in outs] == ["INT64", "HALF", "FLOAT"]

    batch, n, c = Expr(), Expr(13), Expr(8)
    xn = trtp.TensorDesc([batch, n, c], "FLOAT", (-1, 13, 8))
    w = trtp.TensorDesc([batch, c], "FLOAT", (-1, 8))
    idx_d, xn_sel_d, x_sel_d = sel["register"](xn, xn, w, k=5)
    assert idx_d.shape_expr == [batch, 6] and xn_sel_d.shape_expr == [batch, 6, c]
    with pytest.raises(ValueError, match="K must"):
        sel["register"](xn, xn, w, k=13)

    name, ptx, params, extra = sel["aot_impl"](xn, xn, w, 5, (idx_d, xn_sel_d, x_sel_d), 0)
    assert name == "idle_select_kernel" and b".target sm_89" in ptx
    assert (params.grid_x, params.grid_y, params.grid_z) == (batch, 1, 1)
    assert params.block_x == 128 and params.shared_mem >= 0
    assert [a.value for a in extra] == [13, 8, 5]

    idx_in = trtp.TensorDesc([batch, Expr(6)], "INT64", (-1, 6))
    res = trtp.TensorDesc([batch, Expr(6), c], "FLOAT", (-1, 6, 8))
    out = scat["register"](xn, idx_in, res)
    assert out.shape_expr == xn.shape_expr and out.dtype == "FLOAT"
    with pytest.raises(ValueError, match="idx must be int64"):
        scat["register"](xn, trtp.TensorDesc([batch, Expr(6)], "INT32"), res)
    name, ptx, params, extra = scat["aot_impl"](xn, idx_in, res, (out,), 0)
    assert name == "idle_scatter_kernel" and b".entry idle_scatter_kernel(" in ptx
    assert (params.grid_x, params.grid_z) == (batch, 1) and params.grid_y >= 1
    assert [a.value for a in extra] == [13, 8, 6]

    dynamic_n = trtp.TensorDesc([batch, Expr(), c], "FLOAT", (-1, -1, 8))
    with pytest.raises(ValueError, match="static"):
        sel["aot_impl"](dynamic_n, dynamic_n, w, 5, (idx_d, xn_sel_d, x_sel_d), 0)
