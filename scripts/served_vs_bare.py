"""Idle vs dense through the server and on the bare runtime (docs/serving.md, "Under load").

    .venv/bin/python scripts/served_vs_bare.py IDLE.onnx DENSE.onnx [--batch 1,8]
        [--concurrency 1,2,4,8] [--out served_vs_bare.json]

Writes one repository with both models (`serve repo`), starts `serve run --threads T`, runs
`serve bench` against the guard's port and, for the guard's cost, against tritonserver's own
loopback port, then `bench` on the same two files with ONNX Runtime at the same threads. Prints
served idle/dense throughput per batch at saturation (the highest concurrency) against the bare
idle/dense ratio, and p99 at concurrency 8; writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from guard_overhead import tritonserver_port  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("idle")
    ap.add_argument("dense")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=8190)
    ap.add_argument("--window", default="2")
    ap.add_argument("--out", default="served_vs_bare.json")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("idle-export"))
    work = Path(tempfile.mkdtemp(prefix="served-vs-bare-"))
    repo = work / "repo"
    for name, path in (("idle", args.idle), ("dense", args.dense)):
        subprocess.run([exe, "serve", "repo", path, "-o", str(repo), "--name", name, "--max-batch", "16",
                        "--tune", "--threads", str(args.threads)], check=True, capture_output=True)
    server = subprocess.Popen([exe, "serve", "run", str(repo), "--port", str(args.port), "--threads",
                               str(args.threads)], stderr=open(work / "serve_run.err", "w"))
    result = {"batch": args.batch, "concurrency": args.concurrency, "threads": args.threads}
    try:
        import tritonclient.http as httpclient

        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                client = httpclient.InferenceServerClient(f"127.0.0.1:{args.port}")
                if client.is_model_ready("idle") and client.is_model_ready("dense"):
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        inner = tritonserver_port(server.pid)
        top = args.concurrency.split(",")[-1]  # the guard's cost: at the highest concurrency only
        for label, port, levels in (("guard", args.port, args.concurrency), ("direct", inner, top)):
            out = work / f"{label}.json"
            subprocess.run([exe, "--quiet", "serve", "bench", f"http://127.0.0.1:{port}",
                            "--models", "idle,dense", "--batch", args.batch, "--concurrency",
                            levels, "--window", args.window, "--json", str(out)],
                           check=True, capture_output=True)
            result[label] = json.loads(out.read_text())
    finally:
        server.terminate()
        server.wait(60)
    bare = work / "bare.json"
    subprocess.run([exe, "--quiet", "bench", args.idle, args.dense, "--backend", "ort", "--batch", args.batch,
                    "--threads", str(args.threads), "--json", str(bare)], check=True, capture_output=True)
    result["bare"] = json.loads(bare.read_text())
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    summarize(result)


def summarize(result: dict) -> None:
    rows = result["guard"]["rows"]
    top = max(r["Concurrency"] for r in rows)
    bare = {}
    for r in result["bare"]["results"]:
        bare.setdefault(r["batch"], {})[r["variant"]] = r["images_per_s"]
    for bs in sorted({r["batch"] for r in rows}):
        served = {r["model"]: r for r in rows if r["batch"] == bs and r["Concurrency"] == top}
        direct = {r["model"]: r for r in result["direct"]["rows"]
                  if r["batch"] == bs and r["Concurrency"] == top}
        s_ratio = served["idle"]["images_per_second"] / served["dense"]["images_per_second"]
        variants = bare.get(bs, {})
        idle_bare = next((v for k, v in variants.items() if k.startswith("idle")), None)
        b_ratio = idle_bare / variants["dense"] if idle_bare and variants.get("dense") else float("nan")
        guard_cost = {m: 1 - served[m]["images_per_second"] / direct[m]["images_per_second"] for m in served}
        print(f"batch {bs}, concurrency {top}: served idle/dense {s_ratio:.2f}x, bare {b_ratio:.2f}x "
              f"({s_ratio / b_ratio:.2f} of bare); images/s idle {served['idle']['images_per_second']:.1f}, "
              f"dense {served['dense']['images_per_second']:.1f}; guard throughput cost "
              + ", ".join(f"{m} {c:+.1%}" for m, c in guard_cost.items()))
        for m in ("idle", "dense"):
            at8 = [r for r in rows if r["batch"] == bs and r["model"] == m and r["Concurrency"] == 8]
            if at8:
                print(f"  {m} p99 at concurrency 8: {at8[0]['p99 latency'] / 1e3:.1f} ms")


if __name__ == "__main__":
    main()
