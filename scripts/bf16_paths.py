"""OpenVINO's bf16 paths side by side (docs/benchmark.md, "Fastest path per CPU"): the marked idle
IR (`onnx --target openvino` writes X.xml: token selection in f32), the same idle ONNX at
OpenVINO's default (selection in bf16 too), idle at f32, and the dense model at OpenVINO's default
and at f32. Timed with bench's loop (interleaved runs, CPU time), one batch at a time.

    .venv/bin/python scripts/bf16_paths.py IDLE.openvino.onnx DENSE.openvino.onnx [--batch 1,64]
        [--threads 1] [--out bf16_paths.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from idle_export.bench.timing import bench_batch
from idle_export.bench.variants import Variant
from idle_export.data.inputs import input_set
from idle_export.hardware import environment
from idle_export.onnx.metadata import OnnxMetadata
from idle_export.runtime import registry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("idle")
    ap.add_argument("dense")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--out", default="bf16_paths.json")
    args = ap.parse_args()
    ov = registry.get("openvino").require()
    idle, dense = Path(args.idle), Path(args.dense)
    ir = idle.with_suffix(".xml")
    plan = [("idle IR, default (selection f32)", ir, "default"), ("idle ONNX, default", idle, "default"),
            ("idle ONNX, f32", idle, "f32"), ("dense, default", dense, "default"),
            ("dense, f32", dense, "f32")]
    variants = []
    for label, path, precision in plan:
        if path.is_file():
            runner = ov.runner(path, threads=args.threads, precision=precision).__enter__()
            variants.append(Variant("openvino", label, dense="dense" in label, runner=runner))
    spec = OnnxMetadata.read(idle).spec
    pool = input_set("noise", max(int(b) for b in args.batch.split(",")), spec)
    out = {"environment": environment(args.threads), "default_precision": ov.default_precision(), "rows": []}
    for bs in (int(b) for b in args.batch.split(",")):
        bench_batch(variants, {"images": np.ascontiguousarray(pool[:bs])}, bs, runs=args.runs, warmup=1,
                    min_time=args.min_time)
        base = next(v for v in variants if v.label == "dense, default").results[bs]
        for v in variants:
            r = v.results[bs]
            row = {"batch": bs, "variant": v.label, "images_per_s": r["images_per_s"],
                   "cpu_ms_per_image": r.get("cpu_ms_per_image"), "spread": r["spread"],
                   "cpu_speedup_vs_dense_default": base["cpu_ms_per_image"] / r["cpu_ms_per_image"]}
            out["rows"].append(row)
            print(f"batch {bs:3d}  {v.label:34s} {r['images_per_s']:7.2f} img/s  "
                  f"{r.get('cpu_ms_per_image', float('nan')):7.1f} CPU ms/img  "
                  f"×{row['cpu_speedup_vs_dense_default']:.2f} vs dense default (CPU time)")
    for v in variants:
        v.runner.__exit__(None, None, None)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
