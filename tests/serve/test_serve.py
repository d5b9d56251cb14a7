"""Triton model repository + a real Triton server (pytriton, CPU) on 127.0.0.1.

The server runs as a subprocess of `idle-export serve run`, so start-up, the library-path fix,
SIGTERM shutdown and "no process left behind" are tested for real. Traffic stays on loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from idle_export.cli import app
from idle_export.errors import BadInputError

pytest.importorskip("tritonclient.http",
                    reason="tritonclient[http] not installed (pip install idle-export[serve])")

MAX_BATCH = 8
runner = CliRunner()


# ----------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def idle_export_exe() -> str:
    exe = Path(sys.executable).with_name("idle-export")
    found = str(exe) if exe.is_file() else shutil.which("idle-export")
    return found or pytest.skip("no idle-export console script next to this Python")


def descendants(pid: int) -> dict[int, tuple[str, str]]:
    """{pid: (comm, starttime)} of every process below pid (from /proc)."""
    children: dict[int, list[int]] = {}
    info = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
        info[int(entry)] = (comm, fields[19])
    out, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = info[child]
            todo.append(child)
    return out


def still_running(pid: int, starttime: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] == starttime and fields[0] != "Z"


def http_client(url: str):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)


def infer(client, model: str, x: np.ndarray, dtype: str = "FP32") -> np.ndarray:
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("images", list(x.shape), dtype)
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp]).as_numpy("logits")


def with_classes(src: Path, dst: Path, classes: list[str]) -> Path:
    import onnx

    proto = onnx.load(str(src))
    proto.metadata_props.add(key="idle_export.classes", value=json.dumps(classes))
    onnx.save_model(proto, str(dst))
    return dst


CLASSES = [f'class "{i}" \\ é猫' if i % 100 == 0 else f"class_{i}" for i in range(1000)]


# ----------------------------------------------------------------------------- repository writer
@pytest.fixture(scope="module")
def named_onnx(tiny_idle_onnx, tmp_path_factory) -> Path:
    return with_classes(tiny_idle_onnx, tmp_path_factory.mktemp("named") / "tiny_named.onnx", CLASSES)


@pytest.fixture(scope="module")
def repo(tiny_idle_onnx, named_onnx, tmp_path_factory) -> Path:
    from idle_export.serve.repository import write_repository

    root = tmp_path_factory.mktemp("serve") / "model_repository"
    write_repository(tiny_idle_onnx, root, name="tiny_idle", max_batch=MAX_BATCH, preferred=[4, 8],
                     queue_delay_us=2000)
    write_repository(named_onnx, root, max_batch=MAX_BATCH)
    return root


def test_repo_config_parses_with_triton_protobuf(repo, tiny_idle_onnx):
    from idle_export.fileio import sha256_file
    from idle_export.serve.config import parse_config

    folder = repo / "tiny_idle"
    cfg = parse_config((folder / "config.pbtxt").read_text())
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("tiny_idle", "onnxruntime_onnx", MAX_BATCH)
    assert cfg.version_policy.latest.num_versions == 1
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("images", [3, 224, 224])]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("logits", [1000])]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, 0)]  # KIND_AUTO
    # parameters are plain strings (no JSON quoting of strings); lists and numbers as compact JSON
    assert cfg.parameters["idle_export.arch"].string_value == "deit_tiny"
    assert cfg.parameters["idle_export.score_mode"].string_value == "official"
    assert json.loads(cfg.parameters["idle_export.keep_k"].string_value) == [137] * 3 + [96] * 3 + [67] * 3
    assert (folder / "1" / "model.onnx").read_bytes() == tiny_idle_onnx.read_bytes()
    side = json.loads((folder / "1" / "idle_export.json").read_text())
    assert side["sha256"] == sha256_file(tiny_idle_onnx) and side["platform"] == "onnxruntime_onnx"
    # no path of the machine that wrote it: the repository moves to a server as it is
    assert side["source"] == tiny_idle_onnx.name
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix in (".pbtxt", ".json", ".txt"):
            assert str(tiny_idle_onnx.parent) not in f.read_text() and "/tmp" not in f.read_text()
    assert not (folder / "labels.txt").exists()
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_repo_labels_and_escaping_round_trip(repo):
    from idle_export.serve.config import parse_config

    folder = repo / "tiny_named"
    cfg = parse_config((folder / "config.pbtxt").read_text())
    assert cfg.output[0].label_filename == "labels.txt"
    assert (folder / "labels.txt").read_text(encoding="utf-8").splitlines() == CLASSES
    assert json.loads(cfg.parameters["idle_export.classes"].string_value) == CLASSES
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]  # default MAX/2, MAX


def test_repo_copies_external_data(tiny_idle_onnx, tmp_path):
    import onnx

    from idle_export.runtime.onnxruntime import OrtRunner
    from idle_export.serve.repository import write_repository

    proto = onnx.load(str(tiny_idle_onnx))
    src = tmp_path / "src" / "ext.onnx"
    src.parent.mkdir()
    onnx.save_model(proto, str(src), save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=1024)
    report = write_repository(src, tmp_path / "repo", max_batch=4)
    model = tmp_path / "repo" / "ext" / "1" / "model.onnx"
    assert (model.parent / "ext.onnx.data").is_file() and "1/ext.onnx.data" in report["files"]
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    with OrtRunner(model) as a, OrtRunner(tiny_idle_onnx) as b:
        np.testing.assert_array_equal(a.infer({"images": x})["logits"], b.infer({"images": x})["logits"])


def _engine(tmp_path: Path, onnx_path: Path, data: bytes = b"serialized-engine-bytes", **sidecar) -> Path:
    """An engine file and a sidecar in the format `idle-export trt` writes (engine.py): the writer
    copies plans, it never parses them, so the bytes need not be a real TensorRT plan."""
    import hashlib

    from idle_export.fileio import sha256_file
    from idle_export.trt.sidecar import SIDECAR_FORMAT

    engine = tmp_path / "tiny.engine"
    engine.write_bytes(data)
    side = {"format": SIDECAR_FORMAT, "engine": engine.name,
            "engine_sha256": hashlib.sha256(data).hexdigest(), "flavour": "tensorrt",
            "trt_version": "10.13.0", "precision": "fp16",
            "profiles": [{"input": "images", "min": [1, 3, 224, 224], "opt": [16, 3, 224, 224],
                          "max": [32, 3, 224, 224]}],
            "onnx": {"path": onnx_path.name, "sha256": sha256_file(onnx_path)}}
    side.update(sidecar)
    (tmp_path / "tiny.engine.json").write_text(json.dumps(side))
    return engine


def test_repo_tensorrt_plan(tiny_idle_onnx, tmp_path):
    from idle_export.serve.config import parse_config
    from idle_export.serve.repository import write_repository

    engine = _engine(tmp_path, tiny_idle_onnx)
    report = write_repository(engine, tmp_path / "repo", onnx=tiny_idle_onnx, max_batch=None)
    cfg = parse_config((tmp_path / "repo" / "tiny" / "config.pbtxt").read_text())
    assert (cfg.platform, cfg.max_batch_size) == ("tensorrt_plan", 32)
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 32]
    assert cfg.instance_group[0].kind == 1  # KIND_GPU
    assert (tmp_path / "repo" / "tiny" / "1" / "model.plan").read_bytes() == b"serialized-engine-bytes"
    side = json.loads((tmp_path / "repo" / "tiny" / "1" / "model.plan.json").read_text())
    assert side["precision"] == "fp16"
    assert report["platform"] == "tensorrt_plan"
    # without --onnx: the ONNX named in the sidecar, found beside the engine and its sha256 checked
    shutil.copy(tiny_idle_onnx, tmp_path / tiny_idle_onnx.name)
    write_repository(engine, tmp_path / "repo2", max_batch=None)
    assert parse_config((tmp_path / "repo2" / "tiny" / "config.pbtxt").read_text()) == cfg


@pytest.mark.parametrize("case, match", [
    ("rtx", "is a TensorRT-RTX engine; Triton"),
    ("over", "above the engine's profile maximum 32"),
    ("min", "profile starts at batch 4"),
    ("no_onnx", "cannot tell the inputs and outputs"),
    ("other_onnx", "not built from"),
    ("no_sidecar", "no sidecar"),
    ("replaced", "does not match its sidecar"),
])
def test_repo_tensorrt_plan_bad_input(tiny_idle_onnx, tmp_path, case, match):
    from idle_export.serve.repository import write_repository

    kwargs = {"onnx": tiny_idle_onnx, "max_batch": None}
    side = {}
    data = b"serialized-engine-bytes"
    if case == "rtx":  # a TensorRT-RTX header (magic, builder 1.7.1) that inspect_engine accepts
        from idle_export.trt.sidecar import RTX_MAGIC

        data = RTX_MAGIC + bytes(20) + bytes([1, 7, 1]) + bytes(5)
        side = {"flavour": "tensorrt_rtx", "trt_version": "1.7.1.116"}
    elif case == "over":
        kwargs["max_batch"] = 64
    elif case == "min":
        side = {"profiles": [{"input": "images", "min": [4, 3, 224, 224], "opt": [8, 3, 224, 224],
                              "max": [8, 3, 224, 224]}]}
    elif case == "no_onnx":
        kwargs["onnx"] = None
    elif case == "replaced":
        side = {"engine_sha256": "0" * 64}
    elif case == "other_onnx":
        side = {"onnx": {"path": tiny_idle_onnx.name, "sha256": "0" * 64}}
    engine = _engine(tmp_path, tiny_idle_onnx, data, **side)
    if case == "no_sidecar":
        (tmp_path / "tiny.engine.json").unlink()
    with pytest.raises(BadInputError, match=match):
        write_repository(engine, tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_repo_cli_bad_input_and_force(tiny_idle_onnx, tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_text("not a model")
    out = tmp_path / "repo"
    cases = [
        ([str(bogus)], "is not an ONNX model"),
        ([str(tiny_idle_onnx), "--max-batch", "0"], "--max-batch 0 must be between 1 and"),
        ([str(tiny_idle_onnx), "--max-batch", "8", "--preferred", "4,16"], "must lie in 1..8"),
        ([str(tiny_idle_onnx), "--kind", "tpu"], "--kind 'tpu'"),
        ([str(tmp_path / "missing.onnx")], "model file not found"),
    ]
    for args, match in cases:
        result = runner.invoke(app, ["serve", "repo", *args, "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert match in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
    ok = runner.invoke(app, ["serve", "repo", str(tiny_idle_onnx), "-o", str(out), "--name", "m",
                             "--json", "-"])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, ["serve", "repo", str(tiny_idle_onnx), "-o", str(out), "--name", "m"])
    assert again.exit_code == 2 and "already has version 1" in again.output and "--version 2" in again.output
    forced = runner.invoke(app, ["serve", "repo", str(tiny_idle_onnx), "-o", str(out), "--name", "m",
                                 "--max-batch", "16", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "max_batch_size: 16" in (out / "m" / "config.pbtxt").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["m"]


def test_repo_versions_are_added_beside_each_other(tiny_idle_onnx, tiny_dense_onnx, tmp_path):
    """Triton's versioning: --version N adds NAME/N next to the versions there; --force replaces
    one version only; a version with other inputs/outputs is refused (one config serves all)."""
    from idle_export.fileio import sha256_file

    out = tmp_path / "repo"
    first = runner.invoke(app, ["serve", "repo", str(tiny_idle_onnx), "-o", str(out), "--name", "m"])
    assert first.exit_code == 0, first.output
    v1 = sha256_file(out / "m" / "1" / "model.onnx")
    result = runner.invoke(app, ["serve", "repo", str(tiny_dense_onnx), "-o", str(out), "--name", "m",
                                 "--version", "2"])
    assert result.exit_code == 0, result.output
    assert "versions [1, 2]" in result.output
    assert sha256_file(out / "m" / "1" / "model.onnx") == v1  # the first version is untouched
    assert (out / "m" / "2" / "model.onnx").read_bytes() == tiny_dense_onnx.read_bytes()
    assert json.loads((out / "m" / "2" / "idle_export.json").read_text())["source"] == tiny_dense_onnx.name
    import onnx

    other = onnx.load(str(tiny_idle_onnx))  # the same model with its output named otherwise
    for node in other.graph.node:
        node.output[:] = ["probs" if o == "logits" else o for o in node.output]
    other.graph.output[0].name = "probs"
    onnx.save(other, str(tmp_path / "other.onnx"))
    result = runner.invoke(app, ["serve", "repo", str(tmp_path / "other.onnx"), "-o", str(out), "--name",
                                 "m", "--version", "3"])
    assert result.exit_code == 2 and "other inputs, outputs" in result.output
    assert sorted(p.name for p in (out / "m").iterdir()) == ["1", "2", "config.pbtxt"]
    result = runner.invoke(app, ["serve", "repo", str(tiny_dense_onnx), "-o", str(out), "--name", "m",
                                 "--version", "1", "--force"])
    assert result.exit_code == 0, result.output
    assert (out / "m" / "1" / "model.onnx").read_bytes() == tiny_dense_onnx.read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_repo_with_the_tensorrt_accelerator_for_triton_gpu_servers(tiny_idle_onnx, tmp_path):
    """From a CPU build machine, TensorRT reaches Triton as an ONNX model whose ONNX Runtime
    backend builds the engine on the server's GPU (config parsed back with Triton's protobuf)."""
    from idle_export.serve.config import parse_config

    out = tmp_path / "repo"
    result = runner.invoke(app, ["serve", "repo", str(tiny_idle_onnx), "-o", str(out), "--name", "m",
                                 "--accelerator", "tensorrt"])
    assert result.exit_code == 0, result.output
    cfg = parse_config((out / "m" / "config.pbtxt").read_text())
    (accel,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
    assert cfg.platform == "onnxruntime_onnx"
    for args, match in [(["--accelerator", "tensorrt", "--kind", "cpu"], "needs GPU instances"),
                        (["--accelerator", "cuda"], "is not one of"),
                        (["--accelerator", "tensorrt", "--accelerator-precision", "int4"],
                         "not fp16 or fp32")]:
        result = runner.invoke(app, ["serve", "repo", str(tiny_idle_onnx), "-o", str(tmp_path / "r2"), *args])
        assert result.exit_code == 2 and match in result.output, result.output
    assert not (tmp_path / "r2").exists() or not any((tmp_path / "r2").iterdir())


def test_query_decodes_images_like_check(tmp_path):
    """`serve query` and `check --images` read the same pixels, 16-bit grayscale PNGs included
    (scaled to 8 bit, not clipped to white)."""
    from PIL import Image

    from idle_export.data.images import load_images as check_images
    from idle_export.data.inputs import eval_transform
    from idle_export.model.config import ModelSpec
    from idle_export.serve.client import load_images

    ramp = (np.arange(224 * 224, dtype=np.uint32).reshape(224, 224) * 65535 // (224 * 224 - 1))
    path = tmp_path / "gray16.png"
    Image.fromarray(ramp.astype(np.uint16)).save(path)
    spec = ModelSpec.create("deit_tiny", 0.7)
    (img,) = load_images([path])
    assert np.asarray(img).max() == 255 and np.asarray(img).min() == 0  # the whole range survives
    np.testing.assert_array_equal(eval_transform(spec)(img).numpy(),
                                  check_images(path, 1, spec, cache_dir=False).array[0])


def test_fix_library_path_is_idempotent():
    from idle_export.serve.server import fix_library_path, python_lib_dir

    env = {"LD_LIBRARY_PATH": "/opt/x"}
    assert fix_library_path(env) and env["LD_LIBRARY_PATH"] == f"{python_lib_dir()}:/opt/x"
    assert not fix_library_path(env) and env["LD_LIBRARY_PATH"].count(python_lib_dir()) == 1
    assert any(p.name.startswith("libpython") for p in Path(python_lib_dir()).iterdir())


def test_int64_outputs_pass_pytritons_dtype_check():
    """ONNX Runtime returns int64 as numpy 'q'; pytriton's strict check wants np.int64 ('l')."""
    from idle_export.serve.server import _as_dtype

    q = np.arange(6, dtype="q").reshape(2, 3)
    out = _as_dtype(q, np.int64)
    assert np.issubdtype(out.dtype, np.int64) and np.array_equal(out, q)
    assert _as_dtype(np.ones(2, np.float64), np.float32).dtype == np.float32


# ----------------------------------------------------------------------------- the real server
class Server:
    def __init__(self, repo: Path, port: int, log: Path, extra: tuple[str, ...] = ()):
        self.stdout = log.with_suffix(".out")
        env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}  # the launcher fixes it
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.stderr = log
        self.proc = subprocess.Popen([idle_export_exe(), "serve", "run", str(repo), "--port", str(port),
                                      "--threads", "2", "--exit-timeout", "5", *extra],
                                     stdout=open(self.stdout, "w"), stderr=open(log, "w"), env=env,
                                     start_new_session=True)

    def wait_ready(self, models: list[str], timeout: float = 240) -> None:
        deadline = time.time() + timeout
        client = http_client(self.url)
        try:
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"server exited with {self.proc.returncode}: "
                                f"{self.stderr.read_text()[-2000:]}")
                try:
                    if all(client.is_model_ready(m) for m in models):
                        return
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                time.sleep(0.5)
        finally:
            client.close()
        pytest.fail(f"server not ready after {timeout} s: {self.stderr.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    pytest.importorskip("pytriton", reason="nvidia-pytriton not installed (pip install idle-export[serve])")
    srv = Server(repo, free_port(), tmp_path_factory.mktemp("log") / "serve_run.err")
    try:
        srv.wait_ready(["tiny_idle", "tiny_named"])
        yield srv
    finally:
        srv.kill()


def reference_pool(onnx_path: Path, noise: int, photos: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded noise and built-in photos, and their logits from ONNX Runtime run directly."""
    from idle_export.data.inputs import builtin_photos, seeded_noise
    from idle_export.onnx.metadata import OnnxMetadata
    from idle_export.runtime.onnxruntime import OrtRunner

    spec = OnnxMetadata.read(onnx_path).spec
    x = np.concatenate([seeded_noise(noise, spec, seed=seed), builtin_photos(photos, spec, seed=seed)])
    with OrtRunner(onnx_path, threads=2) as r:
        return x, r.infer({"images": x})["logits"]


@pytest.fixture(scope="module")
def pool(tiny_idle_onnx):
    return reference_pool(tiny_idle_onnx, noise=16, photos=8, seed=1)


def _stats(url: str, model: str) -> dict:
    client = http_client(url)
    try:
        return client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()


def test_200_concurrent_requests_match_onnxruntime(server, pool):
    x, ref = pool
    before = _stats(server.url, "tiny_idle")
    rng = np.random.default_rng(0)
    plan = [rng.choice(len(x), size=int(rng.choice([1, 2, 3])), replace=False) for _ in range(200)]
    local = threading.local()

    def send(idx):
        if not hasattr(local, "client"):
            local.client = http_client(server.url)
        return idx, infer(local.client, "tiny_idle", x[idx])

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(send, plan))
    assert len(results) == 200
    worst = max(float(np.abs(out - ref[idx]).max()) for idx, out in results)
    assert all(out.shape == (len(idx), 1000) for idx, out in results)
    assert worst <= 1e-5, f"max abs diff to ONNX Runtime {worst:.2e}"
    after = _stats(server.url, "tiny_idle")
    ok = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    images = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    failed = after["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"]
    assert (ok, failed, images) == (200, 0, sum(len(i) for i in plan))  # no request lost
    assert executions < 200, "the dynamic batcher never merged two requests"


def test_bad_requests_get_errors_and_server_keeps_serving(server, pool):
    from tritonclient.utils import InferenceServerException

    x, ref = pool
    client = http_client(server.url)
    try:
        bad = [
            (np.zeros((1, 3, 224, 200), np.float32), "FP32", "unexpected shape"),
            (np.zeros((2, 3, 224, 224), np.float64), "FP64", "data-type"),
            (np.repeat(x[:1], MAX_BATCH + 1, axis=0), "FP32", f"batch-size must be <= {MAX_BATCH}"),
        ]
        for arr, dtype, match in bad:
            with pytest.raises(InferenceServerException, match=match):
                infer(client, "tiny_idle", arr, dtype)
            out = infer(client, "tiny_idle", x[:3])
            assert np.abs(out - ref[:3]).max() <= 1e-5
    finally:
        client.close()


def test_query_top5_with_labels_and_latency(server, tiny_idle_onnx, tmp_path):
    from PIL import Image
    from skimage import data

    from idle_export.data.inputs import eval_transform, to_rgb_pil
    from idle_export.onnx.metadata import OnnxMetadata
    from idle_export.runtime.onnxruntime import OrtRunner

    photo = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(photo)
    report_path = tmp_path / "q.json"
    result = runner.invoke(app, ["serve", "query", server.url, str(photo), "--model", "tiny_named",
                                 "--repeat", "2", "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    spec = OnnxMetadata.read(tiny_idle_onnx).spec
    x = eval_transform(spec)(to_rgb_pil(Image.open(photo))).numpy()[None]  # what `check` does
    with OrtRunner(tiny_idle_onnx, threads=2) as r:
        logits = r.infer({"images": x})["logits"][0]
    top = report["results"][0]["top"]
    assert [t["index"] for t in top] == list(np.argsort(-logits, kind="stable")[:5])
    assert [t["label"] for t in top] == [CLASSES[t["index"]] for t in top]
    assert max(abs(t["logit"] - logits[t["index"]]) for t in top) <= 1e-5
    assert report["requests"] == 2 and report["latency_ms"]["p50"] > 0 and not report["warnings"]
    assert CLASSES[top[0]["index"]][:5] in result.output
    piped = runner.invoke(app, ["serve", "query", server.url, str(photo), "--model", "tiny_named",
                                "--json", "-"])  # stdout is the JSON alone, the table goes to stderr
    assert piped.exit_code == 0, piped.output
    assert json.loads(piped.stdout)["results"][0]["top"][0]["index"] == top[0]["index"]
    assert CLASSES[top[0]["index"]][:5] in piped.stderr


def test_query_errors(server, tmp_path):
    junk = tmp_path / "photo.jpg"
    junk.write_bytes(os.urandom(3000))
    result = runner.invoke(app, ["serve", "query", server.url, str(junk), "--model", "tiny_idle"])
    assert result.exit_code == 2 and "photo.jpg is not an image" in result.output
    assert "Traceback" not in result.output
    photo = tmp_path / "gray.png"
    from PIL import Image

    Image.new("L", (300, 200), 128).save(photo)
    several = runner.invoke(app, ["serve", "query", server.url, str(photo)])
    assert several.exit_code == 2 and "2 models ready" in several.output and "--model" in several.output
    nobody = runner.invoke(app, ["serve", "query", f"http://127.0.0.1:{free_port()}", str(photo)])
    assert nobody.exit_code == 2 and "no Triton server answers" in nobody.output
    assert http_client(server.url).is_model_ready("tiny_idle")  # still serving


def test_second_server_on_busy_port(server, repo):
    t0 = time.time()
    result = subprocess.run([idle_export_exe(), "serve", "run", str(repo), "--port", str(server.port)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"port {server.port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr and time.time() - t0 < 60
    assert http_client(server.url).is_model_ready("tiny_idle")


def test_serve_bench_agrees_with_the_servers_statistics(server, tmp_path):
    """`serve bench` for a few seconds against the real server: per level, the requests it
    counted in its windows are what Triton's /v2/models/NAME/stats counted over the same
    windows (± the requests in flight at each edge), Triton's inference count is batch × its
    request count, and the percentiles are ordered."""
    result = CliRunner().invoke(app, ["serve", "bench", server.url, "--models", "tiny_idle,tiny_named",
                                      "--concurrency", "1,3", "--batch", "1,2", "--warmup", "0.3",
                                      "--window", "0.5", "--max-windows", "3",
                                      "--json", str(tmp_path / "l.json"), "--plot", str(tmp_path / "l.png")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "l.json").read_text())
    assert len(report["rows"]) == 8 and (tmp_path / "l.png").stat().st_size > 10_000
    for row in report["rows"]:
        c, bs = row["Concurrency"], row["batch"]
        assert row["errors"] == 0 and row["requests"] > 0, row
        assert abs(row["Server Requests"] - row["requests_all_windows"]) <= c + 1, row
        assert row["Server Inferences"] == bs * row["Server Requests"], row
        assert row["p50 latency"] <= row["p90 latency"] <= row["p99 latency"], row
        assert row["Server Compute Infer"] > 0 and row["Server Queue"] >= 0
        assert row["Inferences/Second"] == pytest.approx(row["requests_per_second"] * bs)
    assert {(r["batch"], r["Concurrency"]) for r in report["ratios"]} == {(1, 1), (1, 3), (2, 1), (2, 3)}


def test_sigterm_stops_cleanly_and_leaves_no_process(server):
    tree = descendants(server.proc.pid)
    names = {comm for comm, _ in tree.values()}
    assert "tritonserver" in names, names
    assert any(n.startswith("triton_python") for n in names), names  # the Python-backend stub
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(90)
    assert rc == 0, server.stderr.read_text()[-2000:]
    # the uptime and the shutdown, each named (not "after 13 s", which read like the shutdown's time)
    assert re.search(r"\nstopped \(SIGTERM\) after serving \d+ s; shutdown took \d+\.\d s\n",
                     server.stderr.read_text()), server.stderr.read_text()[-500:]
    assert server.stdout.read_text() == ""  # not even tritonserver's "Signal (2) received."
    deadline = time.time() + 10
    while time.time() < deadline and any(still_running(p, st) for p, (_, st) in tree.items()):
        time.sleep(0.2)
    left = {p: comm for p, (comm, st) in tree.items() if still_running(p, st)}
    assert not left, f"processes left behind: {left}"
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))


def test_repo_warns_when_the_file_is_not_made_for_the_accelerator(tiny_idle_onnx, tmp_path):
    """A `--target ort` file has ONNX Runtime-only ops: the tensorrt/openvino accelerators cannot
    take them, so `serve repo` says so and names the file to write; a plain export is quiet."""
    import onnx

    from idle_export.onnx.targets import apply_target

    ort_file = tmp_path / "tiny.ort.onnx"
    onnx.save(apply_target(onnx.load(str(tiny_idle_onnx)), "ort"), str(ort_file))
    for accel, fix in (("tensorrt", "--target tensorrt"), ("openvino", "--target openvino")):
        result = runner.invoke(app, ["serve", "repo", str(ort_file), "-o", str(tmp_path / f"r_{accel}"),
                                     "--accelerator", accel])
        assert result.exit_code == 0, result.output
        assert f"warning: tiny.ort.onnx is not made for the {accel} accelerator" in result.output
        assert "written for --target ort" in result.output and fix in result.output
    plain = runner.invoke(app, ["serve", "repo", str(tiny_idle_onnx), "-o", str(tmp_path / "plain"),
                                "--accelerator", "openvino"])
    assert plain.exit_code == 0 and "warning" not in plain.output, plain.output


def test_accelerator_warnings_for_int8_files():
    import onnx

    from idle_export.onnx.metadata import OnnxMetadata
    from idle_export.serve.config import accelerator_warnings

    def meta(**values) -> OnnxMetadata:
        proto = onnx.ModelProto()
        OnnxMetadata.of(proto).updated(**values).write(proto)
        return OnnxMetadata.of(proto)

    for_ort = meta(precision="int8", quantization={"target": "ort"})
    (warning,) = accelerator_warnings(for_ort, "tensorrt", "x.int8.ort.onnx")
    assert "calibrated for ort" in warning and "calibrate --target trt" in warning
    assert accelerator_warnings(meta(precision="int8", quantization={"target": "trt"}), "tensorrt", "x") == []
    assert accelerator_warnings(for_ort, None, "x") == []
    assert "calibrate --target openvino" in accelerator_warnings(for_ort, "openvino", "x")[0]


def test_int8_cpu_warnings_for_8bit_weights():
    """Triton's ONNX Runtime backend cannot set session.x64quantprecision: 8-bit INT8 weights on
    its CPU provider get a warning; 7-bit ones (calibrate's ort default), GPUs, accelerators, float
    files and files of other tools do not."""
    import onnx

    from idle_export.onnx.metadata import OnnxMetadata
    from idle_export.serve.config import int8_cpu_warnings

    def meta(**values) -> OnnxMetadata:
        proto = onnx.ModelProto()
        OnnxMetadata.of(proto).updated(**values).write(proto)
        return OnnxMetadata.of(proto)

    full = meta(precision="int8", quantization={"target": "ort", "weight_range": "full"})
    (warning,) = int8_cpu_warnings(full, None, "auto", "x.int8.ort.onnx")
    assert "8-bit INT8 weights" in warning and "without VNNI" in warning and "calibrate" in warning
    older = meta(precision="int8", quantization={"target": "trt"})  # written before weight_range
    assert len(int8_cpu_warnings(older, None, "cpu", "x")) == 1
    reduced = meta(precision="int8", quantization={"target": "ort", "weight_range": "reduced"})
    assert int8_cpu_warnings(reduced, None, "auto", "x") == []
    assert int8_cpu_warnings(full, None, "gpu", "x") == []
    assert int8_cpu_warnings(full, "openvino", "auto", "x") == []
    assert int8_cpu_warnings(meta(precision="fp32"), None, "auto", "x") == []
    assert int8_cpu_warnings(meta(precision="int8"), None, "auto", "x") == []


def test_repo_tune_measures_batching_for_this_machine(tiny_idle_onnx, tmp_path):
    """--tune times the model here and writes what it chose; options given by hand still win."""
    from idle_export.serve.config import parse_config

    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["serve", "repo", str(tiny_idle_onnx), "-o", str(tmp_path / "repo"),
                                      "--name", "t", "--max-batch", "8", "--tune", "--json", str(out)])
    assert result.exit_code == 0, result.output
    tuned = json.loads(out.read_text())["tuned"]
    rates = {int(b): r for b, r in tuned["images_per_second"].items()}
    assert sorted(rates) == [1, 2, 4, 8] and all(r > 0 for r in rates.values())
    best = max(rates.values())
    assert all(rates[b] >= 0.9 * best for b in tuned["preferred"])
    assert all(rates[b] < 0.9 * best for b in rates if b < min(tuned["preferred"]))
    assert 100 <= tuned["queue_delay_us"] <= 2_000
    cfg = parse_config((tmp_path / "repo" / "t" / "config.pbtxt").read_text(), "config.pbtxt")
    assert list(cfg.dynamic_batching.preferred_batch_size) == tuned["preferred"]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == tuned["queue_delay_us"]
    assert cfg.instance_group[0].count == tuned["instances"]
    result = CliRunner().invoke(app, ["serve", "repo", str(tiny_idle_onnx), "-o", str(tmp_path / "repo2"),
                                      "--max-batch", "8", "--tune", "--preferred", "2,8",
                                      "--queue-delay-us", "0"])
    assert result.exit_code == 0, result.output
    cfg = parse_config(next((tmp_path / "repo2").glob("*/config.pbtxt")).read_text(), "config.pbtxt")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0
