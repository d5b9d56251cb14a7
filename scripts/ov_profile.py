"""OpenVINO's per-node profile (PERF_COUNT) of one or more models, summed into parts, per image:
where the time of an idle model goes next to its dense model (docs/benchmark.md, "Where the
time goes at bf16").

    .venv/bin/python scripts/ov_profile.py MODEL.xml|.onnx [MODEL ...] [--batch 1,64]
        [--threads 1] [--precision default|f32|bf16] [--calls 20] [--top 0] [--out profile.json]
        [--dynamic]

Parts: each executed node's `node_type` (after OpenVINO's fusions) mapped to a coarse part;
`--top N` also lists the N costliest node types and nodes. Times are OpenVINO's real_time.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

PARTS = {
    "FullyConnected": "linear (FullyConnected)", "FullyConnectedQuantizedLegacy": "linear (FullyConnected)",
    "MatMul": "attention MatMul", "Multiply": "elementwise", "PowerStatic": "elementwise",
    "Add": "elementwise", "FakeQuantize": "elementwise", "Subtract": "elementwise", "MulAdd": "elementwise",
    "Subgraph": "fused elementwise (Subgraph)", "Eltwise": "elementwise", "MVN": "LayerNorm (MVN)",
    "Softmax": "softmax", "Transpose": "transpose", "Reorder": "reorder", "Convolution": "patch stem",
    "TopK": "selection", "GatherND": "selection", "ScatterNDUpdate": "selection",
    "Gather": "gather", "ScatterUpdate": "selection", "GatherElements": "selection",
    "ScatterElementsUpdate": "selection", "Broadcast": "index", "Concat": "concat/reshape",
    "Reshape": "concat/reshape", "Split": "concat/reshape", "StridedSlice": "slice", "Convert": "convert",
}


def profile(path: Path, batch: int, threads: int, precision: str, calls: int, dynamic: bool = False) -> dict:
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    model = core.read_model(str(path))
    # the batch fixed, as `bench` compiles it (Runner.static_batch), unless --dynamic
    model.reshape({model.inputs[0].get_any_name(): [-1 if dynamic else batch, 3, 224, 224]})
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    images = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    for _ in range(3):
        request.infer({0: images})
    by_type: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    for _ in range(calls):
        request.infer({0: images})
        for info in request.profiling_info:
            if info.status.name != "EXECUTED":
                continue
            ms = info.real_time.total_seconds() * 1e3 / calls / batch
            by_type[f"{info.node_type} [{info.exec_type}]"] += ms
            by_node[f"{info.node_name} ({info.node_type})"] += ms
    parts: dict[str, float] = defaultdict(float)
    for key, ms in by_type.items():
        parts[PARTS.get(key.split(" [")[0], "other")] += ms
    return {"model": str(path), "batch": batch, "threads": threads, "precision": precision,
            "dynamic": dynamic,
            "total_ms_per_image": sum(by_type.values()), "parts": dict(parts),
            "types": dict(by_type), "nodes": dict(by_node)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="default")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--top", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--dynamic", action="store_true", help="compile with a dynamic batch")
    args = ap.parse_args()
    rows = []
    for bs in (int(b) for b in args.batch.split(",")):
        for m in args.models:
            r = profile(Path(m), bs, args.threads, args.precision, max(2, args.calls if bs == 1 else 3),
                        args.dynamic)
            rows.append(r)
            print(f"\n{Path(m).name} batch {bs}: {r['total_ms_per_image']:.2f} ms/img (sum of nodes)")
            for part, ms in sorted(r["parts"].items(), key=lambda kv: -kv[1]):
                print(f"  {part:30s} {ms:7.3f}  {100 * ms / r['total_ms_per_image']:5.1f} %")
            for label in ("types", "nodes") if args.top else ():
                print(f"  top {label}:")
                for k, ms in sorted(r[label].items(), key=lambda kv: -kv[1])[: args.top]:
                    print(f"    {k[:90]:90s} {ms:7.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
