#!/usr/bin/env bash
# GPU acceptance for idle-export's TensorRT path, in one call of under 10 minutes.
#
#   scripts/gpu_acceptance.sh [OUT_DIR]          (default: gpu_acceptance_out)
#   make gpu-check
#
# On a machine with an NVIDIA GPU and no TensorRT preinstalled: installs what it can (the package
# itself, `tensorrt`), exports deit_tiny idle + dense (the trained photos10 model when
# shared/models has it, else the seeded demo model), makes a symmetric INT8 Q/DQ ONNX, builds
# FP32/FP16/INT8 engines for both, runs `check` (TensorRT on the GPU vs ONNX Runtime FP32) and
# `idle-export bench --backend trt` (tolerating its absence), and writes OUT_DIR/report.json.
# The elastic keep rate (docs/tensorrt.md#elastic-engines): the `onnx --elastic` file built with
# `trt --elastic` (FP16, keep_permille 300:700:1000), checked and timed at rates 0.5, 0.7 and 1.0.
# The fused-kernel plugin path (docs/plugins.md): the Triton kernels on torch CUDA against the
# numpy reference plus a unit engine with both TensorRT AOT plugins (idle_export.plugins.gpu_check
# --trt), then the `onnx --plugin` export built with `trt --plugin` (FP32 with selection outputs,
# FP16), checked against ONNX Runtime on the standard export, timed against the standard idle
# engines, and benched in a fresh process (the kernels are embedded: no plugin registration).
# Every engine check also saves both runs (OUT_DIR/work/ENGINE.run.json, Polygraphy RunResults):
# `idle-export check X.onnx --load-outputs ENGINE.run.json --batch 1,8,32 --inputs noise,photos`
# compares them on any machine later.
# Every step is recorded with its outcome; a failing step does not stop the others.
# Exit code: 0 all checks passed, 1 a check failed, 3 no GPU / no TensorRT.
# Environment: PYTHON (interpreter), DEADLINE_S (default 540), SKIP_INSTALL=1.
set -uo pipefail

OUT="${1:-gpu_acceptance_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/log.txt"
: >"$LOG"
cd "$(dirname "$0")/.."
START=$(date +%s)

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
echo "[acceptance] python: $PY" | tee -a "$LOG"

nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader \
  >"$OUT/nvidia-smi.txt" 2>>"$LOG" || echo "no nvidia-smi" >"$OUT/nvidia-smi.txt"
echo "[acceptance] gpu: $(cat "$OUT/nvidia-smi.txt")" | tee -a "$LOG"

install() {  # install() DESCRIPTION PIP-ARGS... ; bounded, failures only logged
  echo "[acceptance] installing $1" | tee -a "$LOG"
  timeout 240 "$PY" -m pip install --disable-pip-version-check -q "${@:2}" >>"$LOG" 2>&1 \
    || echo "[acceptance] could not install $1 (see log)" | tee -a "$LOG"
}
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  "$PY" -c "import idle_export" 2>/dev/null || install "idle-export" -e ".[trt]"
  # ONNX Runtime is an extra ([cpu] / [gpu]): keep the flavour that is there, else the CPU one
  "$PY" -c "import onnxruntime" 2>/dev/null || install "onnxruntime" onnxruntime
  # TensorRT itself even when TensorRT-RTX is there: RTX engines run on RTX-class GPUs only
  # (sm80/86/89/120+), not on datacenter Hopper/Blackwell (sm90/sm100).
  "$PY" -c "import tensorrt" 2>/dev/null || install "tensorrt" tensorrt
  "$PY" -c "import onnx_graphsurgeon" 2>/dev/null || install "onnx-graphsurgeon" onnx-graphsurgeon
fi

export ACCEPT_OUT="$OUT" ACCEPT_START="$START" ACCEPT_DEADLINE="${DEADLINE_S:-540}"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, os, shutil, subprocess, sys, time, traceback
from pathlib import Path

out = Path(os.environ["ACCEPT_OUT"])
start = float(os.environ["ACCEPT_START"])
deadline = start + float(os.environ["ACCEPT_DEADLINE"])
report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)), "steps": [],
          "cases": [], "environment": {}}


def step(name, fn, *, budget=0.0):
    """Run one step; record ok/error/skipped and seconds; never raise."""
    if time.time() + budget > deadline:
        report["steps"].append({"step": name, "status": "skipped", "reason": "time budget"})
        print(f"[acceptance] skip {name}: time budget", flush=True)
        return None
    t = time.time()
    try:
        value = fn()
        report["steps"].append({"step": name, "status": "ok", "seconds": round(time.time() - t, 1)})
        print(f"[acceptance] ok   {name} ({time.time() - t:.1f} s)", flush=True)
        return value
    except Exception as e:  # noqa: BLE001 - recorded, the next step still runs
        line = e.one_line() if hasattr(e, "one_line") else f"{type(e).__name__}: {e}"
        report["steps"].append({"step": name, "status": "error", "error": line[:500],
                                "exit_code": getattr(e, "exit_code", None),
                                "seconds": round(time.time() - t, 1)})
        print(f"[acceptance] FAIL {name}: {line[:300]}", flush=True)
        (out / "tracebacks.txt").open("a").write(f"== {name}\n{traceback.format_exc()}\n")
        return None


def save():
    report["seconds"] = round(time.time() - start, 1)
    checks = [c for c in report["cases"] if "check" in c]
    kernels = report.get("plugin", {}).get("kernels")
    report["passed"] = bool(checks) and all(c["check"]["passed"] for c in checks) \
        and (kernels is None or bool(kernels.get("ok")))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


try:
    import idle_export
    from idle_export.hardware import gpu_info
    from idle_export.parity.check import check_engine_against
    from idle_export.trt.build import build_engine
    from idle_export.trt.flavour import import_trt
except Exception as e:  # noqa: BLE001
    report["environment"]["error"] = f"idle_export not importable: {e}"
    save()
    sys.exit(3)

env = report["environment"]
env["idle_export"] = idle_export.__version__
env["python"] = sys.version.split()[0]
env["gpu"] = gpu_info()
try:
    trt = import_trt()
    env["tensorrt"] = trt.label
except Exception as e:  # noqa: BLE001
    env["tensorrt"] = None
    env["tensorrt_error"] = e.one_line() if hasattr(e, "one_line") else str(e)
if env["gpu"] is None or env["tensorrt"] is None:
    print(f"[acceptance] cannot run engines: gpu={env['gpu']} tensorrt={env['tensorrt']}", flush=True)

# ---------------------------------------------------------------- model, ONNX, Q/DQ
from idle_export.model.checkpoint import load_checkpoint
from idle_export.onnx.export import export_checkpoint

work = out / "work"
work.mkdir(exist_ok=True)
shared = [Path("../shared/models/photos10_deit_tiny.pth"), Path("shared/models/photos10_deit_tiny.pth")]
ckpt_path = next((p for p in shared if p.is_file()), None)
if ckpt_path is None:
    from idle_export.demo import write_demo_checkpoint
    ckpt_path = write_demo_checkpoint(work / "demo_deit_tiny.pth", arch="deit_tiny", keep_rate=0.7)
report["model"] = str(ckpt_path)
ckpt = load_checkpoint(ckpt_path)
spec = ckpt.spec()
onnx = {}
for variant, dense in (("idle", False), ("dense", True)):
    onnx[variant] = step(f"export {variant}", lambda d=dense, v=variant: export_checkpoint(
        ckpt, spec, work / f"{v}.onnx", dense=d), budget=20)


def make_qdq(src, dst):
    try:
        from idle_export.quantize.qdq import quantize_onnx
        quantize_onnx(src, dst, images=None, num=64, method="minmax", target="trt")
        return "idle_export.quantize (target trt)"
    except ImportError:
        pass
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from idle_export.data.inputs import builtin_photos
    batches = iter([{"images": builtin_photos(8, spec, seed=s)} for s in range(8)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                    extra_options={"QuantizeBias": False, "ActivationSymmetric": True,
                                   "WeightSymmetric": True})
    return "onnxruntime quantize_static (symmetric QInt8, no bias quantization)"


qdq = {}
for variant in ("idle", "dense"):
    if onnx.get(variant):
        dst = work / f"{variant}.qdq.onnx"
        how = step(f"quantize {variant}", lambda s=onnx[variant], d=dst: make_qdq(s, d), budget=40)
        if how:
            qdq[variant] = dst
            report.setdefault("int8_recipe", how)
save()

# ---------------------------------------------------------------- build, check, time
import numpy as np

from idle_export.data.inputs import builtin_photos
from idle_export.runtime.tensorrt import TrtRunner

def time_engine(e, b=32, iters=50, keep_rate=None):
    x = builtin_photos(b, spec, seed=0)
    with TrtRunner(e, keep_rate=keep_rate) as r:
        for _ in range(10):
            r.infer({"images": x})
        walls = []
        for _ in range(iters):
            t = time.perf_counter()
            r.infer({"images": x})
            walls.append(time.perf_counter() - t)
    p50 = float(np.median(walls))
    return {"batch": b, "p50_ms": round(p50 * 1e3, 3), "images_per_s": round(b / p50, 1),
            "note": "TrtRunner.infer, host↔device copies included"}


BATCH = (1, 32, 64)
engines = []
for precision in ("fp32", "fp16", "int8"):
    for variant in ("idle", "dense"):
        src = qdq.get(variant) if precision == "int8" else onnx.get(variant)
        if src is None or env["tensorrt"] is None:
            continue
        case = {"variant": variant, "precision": precision, "onnx": Path(src).name}
        report["cases"].append(case)
        engine = work / f"{variant}.{precision}.engine"
        side = step(f"build {variant} {precision}", lambda s=src, p=precision, e=engine: build_engine(
            s, precision=p, batch=BATCH, output=e, timing_cache=work / "timing.cache",
            echo=lambda m: print("   ", m, flush=True)), budget=60)
        if not side:
            continue
        engines.append(engine)
        case["build"] = {k: side[k] for k in ("flavour", "trt_version", "compute_capability",
                                               "build_seconds", "engine_bytes", "strongly_typed")}
        if env["gpu"] is None:
            continue
        rep = step(f"check {variant} {precision}", lambda e=engine, v=variant: check_engine_against(
            e, onnx[v], batch_sizes=[1, 8, 32], save_outputs=e.with_suffix(".run.json")), budget=20)
        if rep:
            case["check"] = {"passed": rep["passed"], "warnings": rep["warnings"],
                             "cases": [{k: c.get(k) for k in ("inputs", "batch", "max_abs", "top1", "top5",
                                                              "cosine_min", "failures")}
                                       for c in rep["cases"]]}

        t = step(f"time {variant} {precision}", lambda e=engine: time_engine(e), budget=15)
        if t:
            case["timing"] = t
        save()

# token-selection agreement on the GPU: the FP16 idle engine with its TopK indices as outputs
if onnx.get("idle") and env["tensorrt"] is not None and env["gpu"] is not None:
    sel_engine = work / "idle.fp16.selection.engine"
    if step("build idle fp16 +selection", lambda: build_engine(
            onnx["idle"], precision="fp16", batch=BATCH, output=sel_engine, selection=True,
            timing_cache=work / "timing.cache"), budget=60):
        rep = step("check idle fp16 +selection", lambda: check_engine_against(
            sel_engine, onnx["idle"], batch_sizes=[32]), budget=20)
        if rep:
            report["fp16_selection"] = [{k: c.get(k) for k in ("inputs", "batch", "selection",
                                                                "selection_per_layer", "top1", "max_abs")}
                                        for c in rep["cases"]]
    save()

# ---------------------------------------------------------------- elastic keep rate (onnx/trt --elastic)
# one elastic file, one FP16 engine with keep_permille as a shape input, checked and timed at
# three rates against ONNX Runtime FP32 on the same file at the same rate
if env["tensorrt"] is not None:
    elastic = report["elastic"] = {"cases": []}
    el_onnx = step("export idle elastic", lambda: export_checkpoint(
        ckpt, spec, work / "idle_elastic.onnx", elastic=True), budget=30)
    el_engine = work / "idle_elastic.fp16.engine"
    if el_onnx and step("build idle elastic fp16", lambda: build_engine(
            el_onnx, precision="fp16", batch=BATCH, output=el_engine, keep_range=(300, 700, 1000),
            echo=lambda m: print("   ", m, flush=True)), budget=60) and env["gpu"] is not None:
        for rate in (0.5, 0.7, 1.0):
            case = {"variant": f"idle-elastic@{rate}", "precision": "fp16", "onnx": el_onnx.name}
            report["cases"].append(case)
            rep = step(f"check idle elastic fp16 @{rate}", lambda r=rate: check_engine_against(
                el_engine, el_onnx, batch_sizes=[1, 8, 32], keep_rate=r), budget=20)
            case["check"] = {"passed": bool(rep and rep["passed"]), "cases": [
                {k: c.get(k) for k in ("inputs", "batch", "max_abs", "top1", "failures")}
                for c in (rep["cases"] if rep else [])]}
            t = step(f"time idle elastic fp16 @{rate}", lambda r=rate: time_engine(el_engine, keep_rate=r),
                     budget=15)
            if t:
                case["timing"] = t
            elastic["cases"].append(case)
            save()

# ---------------------------------------------------------------- fused-kernel plugin path
plugin = report["plugin"] = {}


def plugin_kernels():
    """Triton kernels on torch CUDA vs the numpy reference + a unit engine with both AOT plugins."""
    js = out / "plugin_kernels.json"
    cmd = [sys.executable, "-m", "idle_export.plugins.gpu_check", "--trt", "--repeats", "30",
           "--engine-dir", str(work / "plugin_unit_engines"), "--json", str(js)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=max(30, min(300, deadline - time.time())))
    (out / "plugin_kernels.txt").write_text(proc.stdout + proc.stderr)
    if not js.is_file():
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines() or [""]
        raise RuntimeError(f"gpu_check exit {proc.returncode}: {said[-1][:300]}")
    result = json.loads(js.read_text())
    keys = ("b", "n", "c", "k", "dtype", "ok", "score_gap", "idx_exact_rows", "gather_exact",
            "scatter_exact", "select_fused_us", "select_torch_us", "select_speedup",
            "scatter_fused_us", "scatter_torch_us", "error")
    return {"ok": bool(result.get("ok")), "exit": proc.returncode, "device": result.get("device"),
            "cases": [{k: c.get(k) for k in keys if k in c} for c in result.get("cases", [])],
            "trt_unit_engines": result.get("trt")}


plugin_missing = None
try:
    from idle_export.plugins.tensorrt_plugin import import_tensorrt as import_trt_plugin
    import_trt_plugin()
except ImportError as e:  # TensorRTPluginUnavailable: no tensorrt >= 10.12 here
    plugin_missing = str(e)
if env["gpu"] is None:
    plugin["skipped"] = "no GPU"
else:
    plugin["kernels"] = step("plugin kernels (gpu_check --trt)", plugin_kernels, budget=60) \
        or {"ok": False, "error": "gpu_check did not report (see steps)"}
    pl_onnx = step("export idle plugin form", lambda: export_checkpoint(
        ckpt, spec, work / "idle_plugin.onnx", plugin=True), budget=30)
    if plugin_missing:
        plugin["engines_skipped"] = plugin_missing
    elif pl_onnx and onnx.get("idle"):
        plugin_engines = []
        for precision, selection in (("fp32", True), ("fp16", False)):
            case = {"variant": "idle-plugin", "precision": precision, "onnx": pl_onnx.name,
                    "selection_outputs": selection}
            report["cases"].append(case)
            engine = work / f"idle_plugin.{precision}.engine"
            side = step(f"build idle-plugin {precision}", lambda p=precision, e=engine, s=selection:
                        build_engine(pl_onnx, precision=p, batch=BATCH, output=e, plugin=True,
                                     selection=s, echo=lambda m: print("   ", m, flush=True)),
                        budget=90)
            if not side:
                case["check"] = {"passed": False, "failures": ["the --plugin build failed"]}
                continue
            plugin_engines.append(engine)
            case["build"] = {k: side.get(k) for k in ("flavour", "trt_version", "build_seconds",
                                                       "engine_bytes", "strongly_typed", "plugin")}
            rep = step(f"check idle-plugin {precision}", lambda e=engine: check_engine_against(
                e, onnx["idle"], batch_sizes=[1, 8, 32], save_outputs=e.with_suffix(".run.json")),
                budget=20)
            case["check"] = {"passed": bool(rep and rep["passed"]), "cases": [
                {k: c.get(k) for k in ("inputs", "batch", "max_abs", "top1", "selection",
                                       "selection_per_layer", "failures")}
                for c in (rep["cases"] if rep else [])]}
            t = step(f"time idle-plugin {precision}", lambda e=engine: time_engine(e), budget=15)
            std = next((c.get("timing") for c in report["cases"]
                        if c["variant"] == "idle" and c["precision"] == precision), None)
            if t:
                case["timing"] = t
                if std:
                    case["speed_vs_standard_idle"] = round(t["images_per_s"] / std["images_per_s"], 3)
            save()

        def bench_plugin():  # a fresh process: the engines run without registering the plugins
            exe = shutil.which("idle-export") or str(Path(sys.executable).with_name("idle-export"))
            std = [work / f"{v}.fp16.engine" for v in ("idle", "dense")]
            cmd = [exe, "bench", *map(str, plugin_engines), *[str(e) for e in std if e.is_file()],
                   "--backend", "trt", "--batch", "1,32", "--json", str(out / "bench_plugin.json")]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=max(30, deadline - time.time()))
            (out / "bench_plugin.txt").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise RuntimeError(f"exit {proc.returncode}: "
                                   f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
            return proc.returncode

        if plugin_engines:
            step("bench --backend trt (plugin engines, fresh process)", bench_plugin, budget=30)
    save()

# ---------------------------------------------------------------- bench (another module)
def bench():
    exe = shutil.which("idle-export") or str(Path(sys.executable).with_name("idle-export"))
    cmd = [exe, "bench", *map(str, engines), "--backend", "trt", "--batch", "1,32",
           "--json", str(out / "bench.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, deadline - time.time()))
    (out / "bench.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}")
    return proc.returncode


if engines and env["gpu"] is not None:
    step("bench --backend trt", bench, budget=30)

# speed ratio idle vs dense per precision, from our own timing
ratios = {}
for precision in ("fp32", "fp16", "int8"):
    t = {c["variant"]: c.get("timing") for c in report["cases"] if c["precision"] == precision}
    if t.get("idle") and t.get("dense"):
        ratios[precision] = round(t["idle"]["images_per_s"] / t["dense"]["images_per_s"], 3)
report["idle_over_dense_speed"] = ratios
report["ideal_speed_up_flops"] = round(spec.macs(dense=True) / spec.macs(), 3)
save()
print(f"[acceptance] report: {out / 'report.json'} passed={report['passed']}", flush=True)
no_run = env["gpu"] is None or env["tensorrt"] is None
sys.exit(3 if no_run else (0 if report["passed"] else 1))
PYEOF
rc=${PIPESTATUS[0]}
echo "[acceptance] exit $rc after $(( $(date +%s) - START )) s; report: $OUT/report.json" | tee -a "$LOG"
exit "$rc"
