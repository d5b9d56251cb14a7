"""What the request guard of `serve run` costs: the same tritonclient requests sent to the guard's
port and straight to tritonserver's loopback port, in turns (docs/reliability.md, "The cost").

    .venv/bin/python scripts/guard_overhead.py [REPOSITORY] [--model NAME] [--batch 1,8]

Without a repository it exports the seeded deit_tiny demo model (`idle-export demo`) into a temp
folder and writes one. Prints the median milliseconds per request, requests to both ports alternating,
and the median of the request-by-request differences with a bootstrap 95 % interval.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def tritonserver_port(pid: int) -> int:
    """The HTTP port tritonserver (a child of `serve run`) listens on: its first LISTEN socket."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    children = subprocess.run(["pgrep", "-P", str(pid), "tritonserver"], capture_output=True,
                              text=True).stdout.split()
    for line in out.splitlines():
        if any(f"pid={c}," in line for c in children) and "127.0.0.1:" in line:
            return int(line.split()[3].rsplit(":", 1)[1])
    raise SystemExit("tritonserver's port not found (needs `ss` and `pgrep`)")


def latencies_ms(ports: list[int], model: str, x: np.ndarray, n: int) -> dict[int, list[float]]:
    """n requests to each port, alternating request by request (drift hits both alike)."""
    import tritonclient.http as httpclient

    clients = {p: httpclient.InferenceServerClient(f"127.0.0.1:{p}") for p in ports}
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out: dict[int, list[float]] = {p: [] for p in ports}
    try:
        for _ in range(n):
            for p, client in clients.items():
                t = time.perf_counter()
                client.infer(model, [inp])
                out[p].append((time.perf_counter() - t) * 1000)
    finally:
        for client in clients.values():
            client.close()
    return out


def paired_cost_ms(guard: list[float], direct: list[float], resamples: int = 2000
                   ) -> tuple[float, float, float]:
    """The guard's cost as the median of request-by-request differences (each guard request with
    the direct one after it, so drift cancels) and a bootstrap 95 % interval of that median."""
    diffs = np.asarray(guard) - np.asarray(direct)
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(diffs, (resamples, diffs.size)), axis=1)
    return float(np.median(diffs)), float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("repository", nargs="?")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--port", type=int, default=8170)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("idle-export"))
    work = Path(tempfile.mkdtemp(prefix="guard-overhead-"))
    repo = args.repository
    if repo is None:
        subprocess.run([exe, "demo", "--arch", "deit_tiny", "-o", str(work / "demo"), "--batch", "1"],
                       check=True, capture_output=True)
        repo = str(work / "repo")
        subprocess.run([exe, "serve", "repo", str(work / "demo" / "deit_tiny_idle.onnx"), "-o", repo,
                        "--name", args.model, "--max-batch", "8"], check=True, capture_output=True)
    server = subprocess.Popen([exe, "serve", "run", repo, "--port", str(args.port), "--threads", "2"],
                              stderr=open(work / "serve_run.err", "w"))
    try:
        import tritonclient.http as httpclient

        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpclient.InferenceServerClient(f"127.0.0.1:{args.port}").is_model_ready(args.model):
                    break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        inner = tritonserver_port(server.pid)
        for b in (int(v) for v in args.batch.split(",")):
            x = np.random.default_rng(0).random((b, 3, 224, 224), dtype=np.float32)
            latencies_ms([args.port, inner], args.model, x, 5)  # warm-up
            times = latencies_ms([args.port, inner], args.model, x, args.requests)
            guard, direct = (float(np.median(times[p])) for p in (args.port, inner))
            cost, low, high = paired_cost_ms(times[args.port], times[inner])
            print(f"batch {b}: median {guard:.2f} ms through the guard, {direct:.2f} ms straight to "
                  f"tritonserver (+{guard - direct:.2f} ms, {guard / direct - 1:+.1%}; {args.requests} "
                  f"requests each, alternating); paired: +{cost:.2f} ms ({cost / direct:+.1%}), 95 % "
                  f"interval {low:+.2f} to {high:+.2f} ms ({low / direct:+.1%} to {high / direct:+.1%})")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
