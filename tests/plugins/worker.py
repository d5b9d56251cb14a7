"""Subprocess body of the kernel and AOT tests: ``python -m tests.plugins.worker MODE``.

Run by :func:`tests.plugins.run_worker` in a fresh interpreter so that TRITON_INTERPRET is
set (mode ``kernels``) or unset (mode ``aot``) before triton is first imported, whatever the
pytest process imported already. Prints one JSON object: case name -> result (``ok`` + detail).
Importing this module imports neither torch nor triton (the tests read the case names).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import traceback

# name: (B, N, C, K, dtype, inputs); "int": small integers (every score exact in fp32)
SELECT_CASES = {
    "int_b3_n13": (3, 13, 8, 5, "float32", "int"),
    "int_b1_n7": (1, 7, 5, 3, "float32", "int"),
    "k1_b3_n7": (3, 7, 5, 1, "float32", "int"),
    "kmax_b3_n7": (3, 7, 5, 6, "float32", "int"),
    "kmax_b1_n13": (1, 13, 6, 12, "float32", "int"),
    "k1_b1_n2": (1, 2, 3, 1, "float32", "int"),
    "odd_c_b3_n13": (3, 13, 17, 4, "float32", "int"),
    "randn_b3_n13": (3, 13, 24, 6, "float32", "randn"),
    "randn_b2_n37": (2, 37, 20, 25, "float32", "randn"),
    "fp16_int_b2_n13": (2, 13, 8, 5, "float16", "int"),
    "fp16_kmax_b3_n7": (3, 7, 4, 6, "float16", "int"),
    "ties_all_equal": (3, 13, 8, 5, "float32", "zeros"),
    "ties_few_values": (3, 13, 8, 7, "float32", "few"),
    "ties_signed_zero": (2, 7, 4, 3, "float32", "signed_zero"),
    "ties_fp16_few": (2, 13, 8, 4, "float16", "few"),
}
# hand-written ties: patch scores [1, 3, 3, 2, 3, 1] (tokens 1..6), K = 4
MANUAL_SCORES, MANUAL_K, MANUAL_IDX = [1.0, 3.0, 3.0, 2.0, 3.0, 1.0], 4, [0, 2, 3, 5, 4]
OTHER_CASES = ("ties_manual", "scatter_duplicates", "scatter_all_rows", "scatter_one_row", "wrapper_errors",
               "gpu_check_smoke")
AOT_SM = (80, 86, 89, 90)
AOT_CASES = tuple(f"sm{sm}" for sm in AOT_SM) + ("sm80_fp16_ptx80", "sm89_deit_s")


def _inputs(b, n, c, dtype, kind, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n, c)).astype(dtype)
    if kind == "randn":
        return rng.standard_normal((b, n, c)).astype(dtype), x, rng.standard_normal((b, c)).astype(dtype)
    if kind == "int":
        return rng.integers(-4, 5, (b, n, c)).astype(dtype), x, rng.integers(-3, 4, (b, c)).astype(dtype)
    w = np.zeros((b, c), dtype)
    w[:, 0] = 1.0
    xn = rng.standard_normal((b, n, c)).astype(dtype)
    if kind == "zeros":
        xn[:, :, 0] = 0.0
        w[:] = 0.0
    elif kind == "few":
        xn[:, :, 0] = rng.integers(0, 3, (b, n))
        xn[:, :, 1:] = 0.0
    elif kind == "signed_zero":
        xn[:, :, :] = 0.0
        xn[:, 1::2, 0] = -0.0
        xn[:, 2, 0] = 1.0
    return xn, x, w


def _check_select(kern, ref, b, n, c, k, dtype, kind, seed):
    import numpy as np
    import torch

    xn, x, w = _inputs(b, n, c, np.dtype(dtype), kind, seed)
    idx, xn_sel, x_sel = (t.numpy() for t in kern.idle_select(
        torch.from_numpy(xn), torch.from_numpy(x), torch.from_numpy(w), k))
    r_idx, r_xn, r_x = ref.idle_select_reference(xn, x, w, k)
    res = np.random.default_rng(seed + 1).standard_normal((b, k + 1, c)).astype(dtype)
    out = kern.idle_scatter(torch.from_numpy(x), torch.from_numpy(idx), torch.from_numpy(res))
    detail = {"idx": idx.tolist(), "ref_idx": r_idx.tolist(), "idx_dtype": str(idx.dtype),
              "xn_sel_dtype": str(xn_sel.dtype)}
    ok = (idx.dtype == np.int64 and np.array_equal(idx, r_idx) and np.array_equal(xn_sel, r_xn)
          and np.array_equal(x_sel, r_x) and xn_sel.dtype == xn.dtype
          and np.array_equal(out.numpy(), ref.scatter_reference(x, r_idx, res)))
    return ok, detail


def _check_scatter(kern, ref, name):
    import numpy as np
    import torch

    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 7, 5)).astype(np.float32)
    if name == "scatter_duplicates":
        idx = np.array([[0, 2, 2, 5], [6, 6, 6, 6], [1, 3, 1, 0]], np.int64)
    elif name == "scatter_all_rows":
        idx = np.stack([rng.permutation(7) for _ in range(3)]).astype(np.int64)
    else:
        idx = np.array([[0], [6], [3]], np.int64)
    res = rng.standard_normal((*idx.shape, 5)).astype(np.float32)
    out = kern.idle_scatter(torch.from_numpy(x), torch.from_numpy(idx), torch.from_numpy(res))
    expect = ref.scatter_reference(x, idx, res)
    return bool(np.array_equal(out.numpy(), expect)), {"max_err": float(abs(out.numpy() - expect).max())}


def _check_manual(kern):
    import torch

    xn = torch.zeros(2, 7, 3)
    xn[:, 1:, 1] = torch.tensor(MANUAL_SCORES)
    w = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    idx = kern.idle_select(xn, torch.randn(2, 7, 3), w, MANUAL_K)[0]
    return idx.tolist() == [MANUAL_IDX, MANUAL_IDX], {"idx": idx.tolist()}


def _check_errors(kern):
    import torch

    xn = torch.zeros(2, 7, 4)
    w = torch.zeros(2, 4)
    bad = {"k0": lambda: kern.idle_select(xn, xn, w, 0),
           "k_eq_n": lambda: kern.idle_select(xn, xn, w, 7),
           "w_shape": lambda: kern.idle_select(xn, xn, torch.zeros(2, 5), 3),
           "int_input": lambda: kern.idle_select(xn.long(), xn, w, 3),
           "idx_int32": lambda: kern.idle_scatter(xn, torch.zeros(2, 3, dtype=torch.int32),
                                                  torch.zeros(2, 3, 4)),
           "res_dtype": lambda: kern.idle_scatter(xn, torch.zeros(2, 3, dtype=torch.int64),
                                                  torch.zeros(2, 3, 4, dtype=torch.float16))}
    raised = {}
    for name, fn in bad.items():
        try:
            fn()
            raised[name] = None
        except ValueError as exc:
            raised[name] = str(exc)
    return all(raised.values()), raised


def run_kernels() -> dict:
    from tests.plugins import load_module

    kern, ref = load_module("kernels"), load_module("reference")
    results = {}
    for seed, (name, case) in enumerate(SELECT_CASES.items()):
        results[name] = lambda case=case, seed=seed: _check_select(kern, ref, *case, seed)
    results["ties_manual"] = lambda: _check_manual(kern)
    for name in OTHER_CASES[1:4]:
        results[name] = lambda name=name: _check_scatter(kern, ref, name)
    results["wrapper_errors"] = lambda: _check_errors(kern)

    def smoke():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = load_module("gpu_check").main(["--interpret-smoke"])
        report = json.loads(buf.getvalue().strip().splitlines()[-1])
        return rc == 0 and report["ok"], {"rc": rc, "cases": len(report["cases"])}

    results["gpu_check_smoke"] = smoke
    return results


def _entry_params(ptx: str, name: str) -> list[str]:
    """Parameter types of the PTX entry, e.g. ["u64", "u32", ...]."""
    head = ptx[ptx.index(f".entry {name}("):]
    head = head[:head.index(")")]
    return [line.split()[1].lstrip(".") for line in head.splitlines()[1:] if ".param" in line]


def run_aot() -> dict:
    from tests.plugins import load_module

    aot = load_module("aot")

    def one(sm, **kw):
        t0 = time.time()
        kernels = aot.compile_kernels(sm, **kw)
        detail = {"seconds": round(time.time() - t0, 2)}
        for key, kb in kernels.items():
            ptx = kb.ptx.decode()
            detail[key] = {"name": kb.name, "ptx_bytes": len(kb.ptx), "cubin_bytes": len(kb.cubin),
                           "target": kb.ptx_target, "version": kb.ptx_version,
                           "has_version": ".version" in ptx,
                           "has_entry": f".entry {kb.name}(" in ptx, "elf": kb.cubin[:4] == b"\x7fELF",
                           "threads": kb.threads, "shared": kb.shared,
                           "params": _entry_params(ptx, kb.name)}
        return detail

    results = {f"sm{sm}": (lambda sm=sm: (True, one(sm, n=13, c=8, k=5))) for sm in AOT_SM}
    results["sm80_fp16_ptx80"] = lambda: (True, one(80, n=13, c=8, k=5, dtype="float16",
                                                    ptx_version=80))
    results["sm89_deit_s"] = lambda: (True, one(89))
    return results


def main(mode: str) -> int:
    cases = {"kernels": run_kernels, "aot": run_aot}[mode]()
    out = {}
    for name, fn in cases.items():
        try:
            ok, detail = fn()
            out[name] = {"ok": bool(ok), "detail": detail}
        except Exception:  # noqa: BLE001 - reported to the test
            out[name] = {"ok": False, "detail": traceback.format_exc()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
