"""GPU acceptance of the fused idle kernels: correctness against the numpy reference and
timing against the torch equivalent (folded scores + topk + gathers; torch.scatter).

    python -m idle_export.plugins.gpu_check [--trt] [--engine-dir DIR] [--repeats 50]
    python -m idle_export.plugins.gpu_check --interpret-smoke   # CPU, TRITON_INTERPRET=1

Prints one JSON line (also written to --json PATH). Exit status: 0 every check passed, 1 a
check failed, 3 no CUDA device (without --interpret-smoke). ``--trt`` also builds a TensorRT
engine with both AOT plugins (needs tensorrt >= 10.12) and checks it the same way.

Selection check: the kernel ranks fp32 scores, the reference float64 ones, so two tokens
whose scores differ by rounding only may swap; the check compares the reference scores of
the two selections rank by rank (``score_gap``) and reports exact agreement separately.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from . import reference as ref
from . import tensorrt_plugin as tp

DEIT_S = [(64, 197, 384, 137), (64, 197, 384, 96), (64, 197, 384, 67)]
EXTRA = [(8, 577, 384, 403), (3, 13, 40, 5), (5, 50, 72, 49)]
SMOKE = [(3, 13, 8, 5), (1, 7, 5, 1), (2, 7, 5, 6), (2, 13, 6, 12)]


def torch_select(xn, x, w, k):
    """The unfused torch path of model.IdleBlock.select (folded, in the input dtype) and its
    two gathers."""
    import torch

    scores = torch.bmm(xn[:, 1:], w.unsqueeze(-1)).squeeze(-1)
    top = torch.topk(scores, k, dim=1, largest=True, sorted=True).indices + 1
    idx = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)
    g = idx.unsqueeze(-1).expand(-1, -1, xn.shape[2])
    return idx, torch.gather(xn, 1, g), torch.gather(x, 1, g)


def torch_scatter(x, idx, res):
    import torch

    return torch.scatter(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]), res)


def _inputs(b: int, n: int, c: int, dtype: Any, device: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    xn = torch.randn(b, n, c, generator=g)
    x = torch.randn(b, n, c, generator=g)
    w = torch.randn(b, c, generator=g) / c**0.5
    return tuple(t.to(dtype).to(device) for t in (xn, x, w))


def compare(xn, x, w, k: int, idx, xn_sel, x_sel, res=None, out=None) -> dict:
    """Checks of one select (and optionally scatter) result against the reference."""
    import numpy as np

    xn_np, x_np, w_np = (t.cpu().numpy() for t in (xn, x, w))
    idx_np = idx.cpu().numpy()
    r_idx = ref.idle_select_reference(xn_np, x_np, w_np, k)[0]
    scores = ref.folded_scores(xn_np, w_np)
    rows_ok = bool((idx_np[:, 0] == 0).all()) and all(
        len(set(r[1:])) == k and r[1:].min() >= 1 and r[1:].max() < xn.shape[1] for r in idx_np)
    gap = ref.rank_score_gap(scores, idx_np, r_idx) if rows_ok else float("inf")
    tol = 1e-4 * (1.0 + float(np.abs(scores).max()))  # fp32 accumulation vs float64
    rec = {"idx_valid": rows_ok, "score_gap": gap, "score_tol": tol,
           "idx_exact_rows": float((idx_np == r_idx).all(axis=1).mean()),
           "gather_exact": bool(np.array_equal(xn_sel.cpu().numpy(), ref.gather_rows(xn_np, idx_np))
                                and np.array_equal(x_sel.cpu().numpy(), ref.gather_rows(x_np, idx_np)))}
    if res is not None:
        rec["scatter_exact"] = bool(np.array_equal(
            out.cpu().numpy(), ref.scatter_reference(x_np, idx_np, res.cpu().numpy())))
    rec["ok"] = rows_ok and gap <= tol and rec["gather_exact"] and rec.get("scatter_exact", True)
    return rec


def time_us(fn, repeats: int) -> float:
    """Median CUDA-event time of one call, microseconds."""
    import torch

    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return sorted(times)[len(times) // 2]


def run_case(kern: Any, b: int, n: int, c: int, k: int, dtype: Any, device: str,
             repeats: int) -> dict:
    import torch

    xn, x, w = _inputs(b, n, c, dtype, device, seed=b * 100003 + n * 101 + k)
    idx, xn_sel, x_sel = kern.idle_select(xn, x, w, k)
    res = torch.randn(b, k + 1, c, generator=torch.Generator().manual_seed(k)).to(dtype).to(device)
    out = kern.idle_scatter(x, idx, res)
    rec = {"b": b, "n": n, "c": c, "k": k, "dtype": str(dtype).removeprefix("torch.")}
    rec.update(compare(xn, x, w, k, idx, xn_sel, x_sel, res, out))
    if device == "cuda" and repeats > 0:
        t_idx = torch_select(xn, x, w, k)[0]
        rec["idx_equals_torch_rows"] = float((t_idx == idx).all(dim=1).float().mean())
        rec["select_fused_us"] = time_us(lambda: kern.idle_select(xn, x, w, k), repeats)
        rec["select_torch_us"] = time_us(lambda: torch_select(xn, x, w, k), repeats)
        rec["scatter_fused_us"] = time_us(lambda: kern.idle_scatter(x, idx, res), repeats)
        rec["scatter_torch_us"] = time_us(lambda: torch_scatter(x, idx, res), repeats)
        rec["select_speedup"] = rec["select_torch_us"] / rec["select_fused_us"]
    return rec


def run_trt(engine_dir: str | None) -> dict:
    """Build and run engines holding both AOT plugins (B=8, N=197, C=384, K=137)."""
    import torch

    try:
        tp.import_tensorrt()
    except ImportError as exc:
        return {"status": "skipped", "reason": str(exc), "ok": True}
    report: dict = {"status": "ran", "cases": []}
    b, n, c, k = 8, 197, 384, 137
    for dtype in (torch.float32, torch.float16):
        name = str(dtype).removeprefix("torch.")
        rec: dict = {"dtype": name}
        try:
            t0 = time.time()
            blob = tp.build_engine(b, n, c, k, name)
            rec.update(build_s=round(time.time() - t0, 2), engine_bytes=len(blob))
            if engine_dir:
                os.makedirs(engine_dir, exist_ok=True)
                with open(os.path.join(engine_dir, f"idle_plugins_{name}.engine"), "wb") as f:
                    f.write(blob)
            xn, x, w = _inputs(b, n, c, dtype, "cuda", seed=7)
            outs = tp.run_engine(blob, {"xn": xn, "x": x, "w": w})
            rec.update(compare(xn, x, w, k, outs["idx"], outs["xn_sel"], outs["x_sel"],
                               outs["xn_sel"], outs["out"]))
        except Exception as exc:  # noqa: BLE001 - recorded, not raised
            rec.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        report["cases"].append(rec)
    report["ok"] = all(r["ok"] for r in report["cases"])
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--interpret-smoke", action="store_true",
                   help="tiny shapes on the CPU with TRITON_INTERPRET=1 (no timing)")
    p.add_argument("--trt", action="store_true", help="also check the TensorRT AOT plugins")
    p.add_argument("--engine-dir", help="with --trt: keep the engines here (for trtexec)")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per measurement")
    p.add_argument("--json", help="also write the JSON report to this file")
    args = p.parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by .kernels)
    import torch

    from . import kernels as kern

    report: dict[str, Any] = {"tool": "idle_export.plugins.gpu_check", "torch": torch.__version__}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    if args.interpret_smoke:
        device, shapes, dtypes, repeats = "cpu", SMOKE, (torch.float32, torch.float16), 0
        report["mode"] = "interpret-smoke"
    elif not torch.cuda.is_available():
        print(json.dumps({**report, "mode": "cuda", "ok": False, "error": "no CUDA device"}))
        return 3
    else:
        device, shapes, dtypes, repeats = "cuda", DEIT_S + EXTRA, (torch.float32, torch.float16), \
            args.repeats
        report.update(mode="cuda", device=torch.cuda.get_device_name(),
                      capability=list(torch.cuda.get_device_capability()))
    t0 = time.time()
    report["cases"] = []
    for b, n, c, k in shapes:
        for dtype in dtypes:
            try:
                report["cases"].append(run_case(kern, b, n, c, k, dtype, device, repeats))
            except Exception as exc:  # noqa: BLE001 - recorded, not raised
                report["cases"].append({"b": b, "n": n, "c": c, "k": k, "dtype": str(dtype),
                                        "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    if args.trt and device == "cuda":
        report["trt"] = run_trt(args.engine_dir)
    report["seconds"] = round(time.time() - t0, 2)
    report["ok"] = all(r["ok"] for r in report["cases"]) and report.get("trt", {}).get("ok", True)
    line = json.dumps(report)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
