"""The bench report: JSON (results, idle vs dense against the FLOP ideal, noise) and its tables."""

from __future__ import annotations

import json
from pathlib import Path

from idle_export import __version__
from idle_export.bench.timing import on_cpu
from idle_export.bench.variants import ideal_for
from idle_export.hardware import MATRIX_FLAGS
from idle_export.onnx.targets import file_passes, file_target
from idle_export.runtime import registry


def _cpu_ratio(result: dict, baseline: dict, ideal: float | None) -> dict:
    if "cpu_ms_per_image" not in result or "cpu_ms_per_image" not in baseline:
        return {}
    ratio = baseline["cpu_ms_per_image"] / result["cpu_ms_per_image"]
    return {"cpu_speedup": ratio, "cpu_over_ideal": ratio / ideal if ideal else None}


def build_report(spec, flops, env, variants, batches, targets, *, settings) -> dict:
    results = []
    for v in variants:
        for bs in batches:
            results.append({"backend": v.backend, "variant": v.label, "file": v.file, "batch": bs,
                            **(v.graph() if v.file else {}), **v.results[bs]})
    comparisons = []
    by_key = {(v.backend, v.label): v for v in variants}
    for v in variants:
        if v.dense:
            continue
        dense = by_key.get((v.backend, "dense"))
        if dense is None and v.official_code:  # the authors' code against our torch model's dense
            dense = next((d for d in variants if d.dense and registry.get(d.backend).runs == registry.MODEL
                          and not d.official_code), None)
        ideal = ideal_for(v, flops)
        for bs in batches:
            if dense is not None:
                speedup = v.results[bs]["images_per_s"] / dense.results[bs]["images_per_s"]
                comparisons.append({
                    "backend": v.backend, "variant": v.label, "baseline": dense.key, "batch": bs,
                    "speedup": speedup, "ideal": ideal,
                    "achieved_over_ideal": speedup / ideal if ideal else None,
                    **_cpu_ratio(v.results[bs], dense.results[bs], ideal)})
    official = next((v for v in variants if v.official_code), None)
    if official is not None:
        for v in variants:
            if v.official_code or v.dense:
                continue
            for bs in batches:
                comparisons.append({
                    "backend": v.backend, "variant": v.label, "baseline": official.key, "batch": bs,
                    "speedup": v.results[bs]["images_per_s"] / official.results[bs]["images_per_s"],
                    "ideal": None, "achieved_over_ideal": None,
                    **_cpu_ratio(v.results[bs], official.results[bs], None)})

    return {
        "tool": f"idle-export {__version__} bench",
        "model": spec.describe(),
        "spec": {k: json.loads(v) for k, v in spec.to_metadata().items()},
        "flops": flops,
        "settings": settings,
        "environment": env,
        "files": [{"file": str(p), "dense": d, "score_mode": m, "precision": targets.meta[p].precision,
                   "target": file_target(targets.meta[p]), "passes": file_passes(targets.meta[p])}
                  for p, d, m in targets.onnx if p in targets.meta],
        "skipped": list(dict.fromkeys(targets.skipped)),
        "results": results,
        "comparisons": comparisons,
        "vs_openvino_dense": vs_openvino_dense(variants, batches),
        "vs_fastest_dense": vs_fastest_dense(variants, batches),
        "noise": {"spread_threshold": NOISY_SPREAD,
                  "noisy": [f"{r['backend']}:{r['variant']}@{r['batch']}" for r in noisy_results(results)]},
    }


def vs_openvino_dense(variants, batches) -> list[dict]:
    """Every CPU idle variant (any runtime, FP32 and INT8) against OpenVINO's FP32 dense: the
    figure a CPU user choosing a runtime cares about. Per batch and precision the fastest idle
    (by CPU time per image where measured, else images/s) is marked best."""
    base = next((v for v in variants if v.backend == "openvino" and v.label == "dense"), None)
    if base is None:
        return []
    rows = []
    for bs in batches:
        idle = [v for v in variants if on_cpu(v.backend) and not v.dense and bs in v.results]
        for precision in dict.fromkeys(v.precision for v in idle):
            group = [v for v in idle if v.precision == precision]
            by_cpu = all("cpu_ms_per_image" in v.results[bs] for v in group)
            best = (min(group, key=lambda v: v.results[bs]["cpu_ms_per_image"]) if by_cpu else
                    max(group, key=lambda v: v.results[bs]["images_per_s"]))
            for v in group:
                rows.append({"batch": bs, "precision": precision, "variant": v.key, "baseline": base.key,
                             "best": v is best, "best_by": "cpu_time" if by_cpu else "images_per_s",
                             "speedup": v.results[bs]["images_per_s"] / base.results[bs]["images_per_s"],
                             **_cpu_ratio(v.results[bs], base.results[bs], None)})
    return rows


EXACT_PRECISIONS = ("fp32", "int8")  # idle variants whose token selection runs in FP32


def vs_fastest_dense(variants, batches) -> list[dict]:
    """Per batch: the fastest idle whose selection is exact (FP32 or INT8 files, and the marked
    OpenVINO IRs run in bf16: the score path stays FP32) against the fastest dense of any CPU
    runtime at any precision it offers here (OpenVINO's default bf16 on AMX included): the
    speed-up a user gets over the peer's best."""
    rows = []
    for bs in batches:
        cpu = [v for v in variants if on_cpu(v.backend) and bs in v.results]
        dense = [v for v in cpu if v.dense]
        idle = [v for v in cpu if not v.dense and not v.official_code
                and (v.precision in EXACT_PRECISIONS or v.selection_f32)]
        if not dense or not idle:
            continue
        fastest = max(dense, key=lambda v: v.results[bs]["images_per_s"])
        best = max(idle, key=lambda v: v.results[bs]["images_per_s"])
        rows.append({"batch": bs, "idle": best.key, "dense": fastest.key,
                     "dense_precision": fastest.precision,
                     "speedup": best.results[bs]["images_per_s"] / fastest.results[bs]["images_per_s"]})
    return rows


NOISY_SPREAD = 0.10  # (max - min) / median of the per-run images/s above which a figure is flagged


def noisy_results(results: list[dict]) -> list[dict]:
    """The results whose run-to-run spread says the machine was busy while they were timed."""
    return [r for r in results if r.get("spread", 0.0) > NOISY_SPREAD]


def print_report(report: dict, console=None) -> None:
    """Two rich tables: per-variant figures, then idle vs baseline against the FLOP ideal."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    env, st = report["environment"], report["settings"]
    g = report["flops"]["gmacs"]
    ideal = report["flops"]["ideal"]
    table = Table(title=f"idle-export bench: {report['model']}")
    for col in ("backend", "variant", "batch", "images/s", "p50 ms", "p90 ms", "p99 ms", "spread",
                "CPU ms/img"):
        table.add_column(col, justify="left" if col in ("backend", "variant") else "right")
    for r in report["results"]:
        lat = r["latency_ms"]
        cpu = f"{r['cpu_ms_per_image']:.2f}" if "cpu_ms_per_image" in r else "-"
        table.add_row(r["backend"], r["variant"], str(r["batch"]), f"{r['images_per_s']:.1f}",
                      f"{lat['p50']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}", f"{r['spread']:.1%}",
                      cpu)
    console.print(table)
    comp = Table(title="speed-up (images/s ratio) vs FLOP ideal")
    for col in ("backend", "variant", "vs", "batch", "speed-up", "ideal", "achieved/ideal",
                "CPU-time speed-up", "CPU/ideal"):
        comp.add_column(col, justify="left" if col in ("backend", "variant", "vs") else "right")
    for c in report["comparisons"]:
        comp.add_row(c["backend"], c["variant"], c["baseline"], str(c["batch"]), f"{c['speedup']:.2f}x",
                     "-" if c["ideal"] is None else f"{c['ideal']:.2f}x", _coloured(c["achieved_over_ideal"]),
                     f"{c['cpu_speedup']:.2f}x" if "cpu_speedup" in c else "-",
                     _coloured(c.get("cpu_over_ideal")))
    console.print(comp)
    cross = report.get("vs_openvino_dense") or []
    if cross:
        t = Table(title="idle on each CPU runtime vs OpenVINO dense (FP32); * = fastest idle by "
                        "CPU time")
        for col in ("batch", "idle", "precision", "speed-up", "CPU-time speed-up"):
            t.add_column(col, justify="left" if col in ("idle", "precision") else "right")
        for c in cross:
            mark = "*" if c["best"] else ""
            t.add_row(str(c["batch"]), c["variant"] + mark, c["precision"], f"{c['speedup']:.2f}x",
                      f"{c['cpu_speedup']:.2f}x" if "cpu_speedup" in c else "-")
        console.print(t)
    for c in report.get("vs_fastest_dense") or []:
        console.print(f"batch {c['batch']}: fastest exact idle {c['idle']} vs the fastest dense {c['dense']} "
                      f"({c['dense_precision']}): {c['speedup']:.2f}x")
    features = (report.get("environment") or {}).get("cpu_matrix_features")
    if features is not None:
        console.print(f"CPU matrix features: {', '.join(features) or 'none of ' + ', '.join(MATRIX_FLAGS)}")
        ort_int8 = any(r["backend"] == registry.ORT_CPU and r.get("precision") == "int8"
                       for r in report["results"])
        if ort_int8 and (report.get("environment") or {}).get("onnxruntime_session_config") and \
                not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(features):
            console.print("ONNX Runtime INT8 on this CPU (no VNNI): its sessions set session."
                          "x64quantprecision, so 8-bit weights run as exact u8×u8 products, 7-bit weights "
                          "(calibrate's ort default) at full speed (docs/int8.md#cpus-without-vnni)")
    graphs = {(r["backend"], r["variant"]): r for r in report["results"] if r.get("file")}
    for (backend, variant), r in graphs.items():
        at_load = r.get("passes_at_load") or []
        passes = ", ".join(r.get("passes_in_file") or []) or "none"
        console.print(f"{backend}:{variant}: {Path(r['file']).name} ({r.get('precision')}, target "
                      f"{r.get('target')}, passes in the file: {passes})"
                      + (f", + applied in memory (--optimize): {', '.join(at_load)}" if at_load
                         else ", timed as written"))
    for line in report.get("skipped", []):
        console.print(f"note: {line}")
    for line in report.get("notes", []):
        console.print(f"[yellow]note: {line}[/]")
    for c in report.get("independent", []):
        if "ratio" in c:
            colour = "" if c["agree_within_10pct"] else "[yellow]"
            console.print(f"{colour}independent timing (timeit, own process) {Path(c['file']).name} batch "
                          f"{c['batch']}: {c['images_per_s']:.1f} images/s, {c['cpu_ms_per_image']:.2f} "
                          f"CPU ms/img; bench/independent {c['ratio']:.3f} (CPU time {c['cpu_ratio']:.3f})"
                          + ("[/]" if colour else ""))
        else:
            console.print(f"[yellow]independent timing of {c['file']} failed: {c.get('error')}[/]")
    noisy = noisy_results(report["results"])
    if noisy:
        worst = max(noisy, key=lambda r: r["spread"])
        console.print(f"[yellow]noisy timing: {len(noisy)} of {len(report['results'])} figures vary by more "
                      f"than {NOISY_SPREAD:.0%} from run to run (worst {worst['spread']:.0%}, "
                      f"{worst['variant']} batch {worst['batch']}); the machine is busy: trust the CPU-time "
                      f"ratios more than images/s, or re-run when it is quiet[/]")
    console.print(f"GMACs/image dense {g['dense']:.2f}, idle {g['idle']:.2f} "
                  f"(ideal {ideal['official']:.2f}x), "
                  f"idle folded scores {g['idle_folded']:.2f} (ideal {ideal['folded']:.2f}x); "
                  f"{st['threads']} threads on {env['cpu']}; load average {env.get('load_average_start')}"
                  f" → {env.get('load_average_end')}")


def _coloured(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    colour = "green" if ratio >= 0.95 else "yellow" if ratio >= 0.9 else "red"
    return f"[{colour}]{ratio:.2f}[/]"
