"""A second opinion on ORT figures: the same file timed with timeit in a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from idle_export.onnx.io import load_onnx
from idle_export.onnx.passes import optimize_model_proto

INDEPENDENT_SCRIPT = r"""
import sys, time, timeit, json
import numpy as np, onnxruntime as ort
path, batch, threads, number, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5])
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.add_session_config_entry("session.x64quantprecision", "1")  # as runtime.onnxruntime.session_options
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
x = np.random.default_rng(1).standard_normal((batch, 3, 224, 224)).astype(np.float32)
name = sess.get_inputs()[0].name
timer = timeit.Timer(lambda: sess.run(None, {name: x}))
timer.timeit(2)
best = sorted(t / number for t in timer.repeat(repeat=repeat, number=number))
cpu = timeit.Timer(lambda: sess.run(None, {name: x}), timer=time.process_time)
cpu_best = sorted(t / number for t in cpu.repeat(repeat=repeat, number=number))
print(json.dumps({"median_s": best[len(best) // 2], "min_s": best[0],
                  "cpu_median_s": cpu_best[len(cpu_best) // 2]}))
"""


def independent_timing(path: Path, batch: int, threads: int, *, per_call_s: float,
                       repeat: int = 5, min_time: float = 1.0) -> dict:
    """Time one ONNX file in a separate Python process with timeit and a plain ORT session
    (nothing shared with the bench loop but the file; idle_export is not imported there):
    a check on the bench's own figures."""

    number = max(1, int(round(min_time / max(per_call_s, 1e-6))))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", INDEPENDENT_SCRIPT, str(path), str(batch), str(threads),
                          str(number), str(repeat)],
                         capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"file": str(path), "batch": batch, "error": tail}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"file": str(path), "batch": batch, "images_per_s": batch / res["median_s"],
            "cpu_ms_per_image": res["cpu_median_s"] / batch * 1e3,
            "calls_per_repeat": number, "repeats": repeat, "method": "timeit, separate process"}


def independent_checks(variants, batches, threads, optimize, min_time, status, workdir: Path) -> list[dict]:
    """The bench's ORT figures re-measured by `independent_timing`: the file as written, or,
    where the bench applied passes at load (--optimize), that graph written out beside the
    temporary exports."""
    import onnx

    checks = []
    for v in variants:
        if v.backend != "ort" or not v.file:
            continue
        timed = Path(v.file)
        if v.passes_at_load:
            timed = workdir / f"{timed.stem}.optimized.onnx"
            onnx.save(optimize_model_proto(load_onnx(v.file), tuple(v.passes_at_load)), str(timed))
        for bs in batches:
            per_call = v.results[bs]["latency_ms"]["p50"] / 1e3
            with status(f"independent timing of {timed.name} at batch {bs}"):
                c = independent_timing(timed, bs, threads, per_call_s=per_call, min_time=min_time)
            c["file"] = v.file
            c["optimized"] = optimize
            c["passes_at_load"] = v.passes_at_load
            if "images_per_s" in c:
                c["bench_images_per_s"] = v.results[bs]["images_per_s"]
                c["ratio"] = c["bench_images_per_s"] / c["images_per_s"]
                c["agree_within_10pct"] = abs(c["ratio"] - 1) <= 0.10
                c["bench_cpu_ms_per_image"] = v.results[bs]["cpu_ms_per_image"]
                c["cpu_ratio"] = c["cpu_ms_per_image"] / c["bench_cpu_ms_per_image"]
                c["cpu_agree_within_10pct"] = abs(c["cpu_ratio"] - 1) <= 0.10
            c["variant"] = v.key
            checks.append(c)
    return checks
