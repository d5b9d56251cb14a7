"""Runs saved and compared later (`check --save-outputs` / `--load-outputs`), so an engine run on a
GPU machine is compared with the FP32 ONNX run on the build machine.

The file is Polygraphy's RunResults JSON (`polygraphy run --load-outputs` reads it; one
IterationResult per batch the check ran, outputs by name: logits and selection_layer*), with one
more top-level key, "idle_export", that Polygraphy ignores: the sha256 of each iteration's input
batch, the input set and batch it was, and the runtime and machine that made it. A replayed
runner answers only the inputs it was made on (matched by sha256), so a comparison can never
pair outputs of different images.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

import numpy as np

from idle_export import __version__
from idle_export.deps import pip_extra
from idle_export.errors import BadInputError, MissingDependencyError
from idle_export.fileio import atomic_write_text
from idle_export.hardware import cpu_model, gpu_info
from idle_export.runtime.base import Runner

FORMAT = "idle-export-run/1"


def feed_sha256(feed: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(feed):
        a = np.ascontiguousarray(feed[name])
        digest.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _polygraphy():
    try:
        from polygraphy.comparator import IterationResult, RunResults
    except ImportError:
        raise MissingDependencyError("save_outputs= / load_outputs= write Polygraphy's RunResults "
                                     "JSON: polygraphy is not installed", pip_extra("trt")) from None
    return IterationResult, RunResults


class Recorder(Runner):
    """Runs `runner` and keeps each batch's outputs (and the sha256 of its inputs)."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.name = runner.name
        self.iterations: list[tuple[str, dict, float]] = []

    def __getattr__(self, item):  # last_scores, score_mode: the runner's
        return getattr(self.runner, item)

    def activate(self) -> None:
        self.runner.__enter__()

    def deactivate(self) -> None:
        self.runner.__exit__(None, None, None)

    def infer(self, feed):
        t0 = time.perf_counter()
        out = self.runner.infer(feed)
        self.iterations.append((feed_sha256(feed), {k: np.array(v) for k, v in out.items()},
                                time.perf_counter() - t0))
        return out


def save_outputs(path: str | Path, recorders: list[Recorder], about: dict) -> None:
    """Write the recorded runs (the first is the checked model, then its reference)."""
    IterationResult, RunResults = _polygraphy()
    results = RunResults()
    shas = {}
    for rec in recorders:
        results.append((rec.name, [IterationResult(outputs=out, runtime=seconds, runner_name=rec.name)
                                   for _, out, seconds in rec.iterations]))
        shas[rec.name] = [sha for sha, _, _ in rec.iterations]
    doc = json.loads(results.to_json())
    gpu = gpu_info()
    doc["idle_export"] = {"format": FORMAT, "tool_version": __version__, "inputs_sha256": shas,
                          "machine": {"cpu": cpu_model(), "gpu": gpu["name"] if gpu else None,
                                      "python": platform.python_version(), "host": platform.node()},
                          **about}
    atomic_write_text(Path(path), json.dumps(doc) + "\n")


class Replay(Runner):
    """A saved runner: answers each batch it was run on (by the sha256 of the inputs) with the
    outputs it gave then."""

    def __init__(self, name: str, by_sha: dict[str, dict], source: Path, about: dict):
        self.name = f"{name} (saved in {source.name})"
        self.by_sha, self.source, self.about = by_sha, source, about

    def infer(self, feed):
        sha = feed_sha256(feed)
        if sha not in self.by_sha:
            raise BadInputError(f"{self.source.name} has no outputs for these inputs ({next(iter(feed))} "
                                f"{'x'.join(map(str, next(iter(feed.values())).shape))})",
                                "check with the inputs=, batch_sizes=, seed= and images= of the saved run: "
                                f"{self.about.get('check', {})}")
        return self.by_sha[sha]


def load_outputs(path: str | Path, runner: str | None = None) -> Replay:
    """The runner `runner` (default: the first, the model that was checked) of a saved run."""
    path = Path(path)
    _, RunResults = _polygraphy()
    if not path.is_file():
        raise BadInputError(f"saved outputs not found: {path}",
                            "check the path (written by `idle-export check --save-outputs`)")
    try:
        doc = json.loads(path.read_text())
        ours = doc["idle_export"]
        if ours.get("format") != FORMAT:
            raise ValueError(ours.get("format"))
        results = RunResults.from_json(json.dumps({k: v for k, v in doc.items() if k != "idle_export"}))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise BadInputError(f"{path.name} is not a run saved by `idle-export check --save-outputs`",
                            "pass the JSON file that save_outputs= wrote") from None
    names = [name for name, _ in results.items()]
    name = runner or names[0]
    if name not in names:
        raise BadInputError(f"{path.name} has no runner {name!r}", f"runners there: {', '.join(names)}")
    iterations = dict(results.items())[name]
    shas = ours["inputs_sha256"][name]
    by_sha = {sha: {k: np.asarray(v) for k, v in it.items()}
              for sha, it in zip(shas, iterations, strict=True)}
    return Replay(name, by_sha, path, ours)
