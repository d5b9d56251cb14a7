"""tritonserver's processes under `serve run`: the ones it started (process_tree), a clean stop
that answers every request it accepted (Drain), nothing left behind (stop_leftovers), and
why it stopped when nobody asked it to (crash_cause). Linux /proc; without it these do nothing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

# Lines tritonserver logs on every CPU-only start of pytriton's build: never why it stopped.
LOG_NOISE = ("CudaDriverHelper has not been initialized", "Failed to set config modification time")
STUB = "triton_python_backend_stub"
OOM_HINT = ("memory ran out: many large requests at once, or more model instances than memory holds; "
            "lower --http-max-input-size, or serve fewer instances (serve repo --instances) "
            "(docs/reliability.md)")


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, command name, start time) of a live process, None when gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), text[text.index("(") + 1:text.rindex(")")], fields[19]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


Tree = dict[int, tuple[str, str, list[str]]]  # pid: (command name, start time, argv)


def process_tree(root: int | None = None, name: str = "tritonserver") -> Tree:
    """{pid: (command name, start time, argv)} of this process's children called `name` and
    everything below them (tritonserver, its Python-backend stubs and their helpers)."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    info = {}
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return {}
    for pid in entries:
        st = _stat(pid)
        if st:
            children.setdefault(st[0], []).append(pid)
            info[pid] = st
    todo = [p for p in children.get(root, []) if info[p][1] == name[:15]]
    out = {}
    while todo:
        pid = todo.pop()
        out[pid] = (info[pid][1], info[pid][2], _cmdline(pid))
        todo.extend(children.get(pid, []))
    return out


def running(pid: int, start: str) -> bool:
    st = _stat(pid)
    return st is not None and st[2] == start


class Drain:
    """The clean stop: unload the models, so that Triton finishes what it has accepted and refuses
    the rest, before tritonserver is asked to stop.

    Triton unloads a model only once its queued and running requests are done; from the unload on,
    new requests get an immediate error (404 "has no available versions"), on kept-alive
    connections too. The connection is opened while the server runs and kept for the stop: after a
    Ctrl+C, which reaches tritonserver as well, it takes no new connection but still reads the
    open ones until its exit timeout."""

    def __init__(self, url: str, timeout_s: float):
        self.client = None
        try:
            import tritonclient.http as httpclient

            self.client = httpclient.InferenceServerClient(url.removeprefix("http://"), connection_timeout=5,
                                                           network_timeout=max(5.0, timeout_s))
            self.client.is_server_live()  # opens the connection
        except Exception:  # noqa: BLE001 - no client, no drain: tritonserver's exit timeout still applies
            self.close()

    def __call__(self, models: list[str], tree: Tree, timeout_s: float) -> bool:
        """Unload, then wait until the Python-backend stubs (one per instance) have exited, at
        most timeout_s. True when they all did."""
        if self.client is None:
            return False
        try:
            for name in models:
                self.client.unload_model(name)
        except Exception:  # noqa: BLE001 - a server that is gone or cut the connection
            return False
        finally:
            self.close()
        stubs = [(pid, v[1]) for pid, v in tree.items() if v[0] == STUB[:15]]
        deadline = time.monotonic() + timeout_s
        while any(running(p, s) for p, s in stubs):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass


def stop_leftovers(tree: Tree, grace_s: float = 2.0) -> list[str]:
    """Kill what still runs of `tree` once tritonserver has stopped, and remove what it left.

    When tritonserver gives up at its exit timeout, a Python-backend stub waiting on a cut-off
    request hangs for good (it catches SIGINT and SIGTERM), keeping its shared memory in /dev/shm,
    and Triton's temporary copy of the model stays in /tmp. Returns the names of the processes
    killed."""
    alive = {p: v for p, v in tree.items() if running(p, v[1])}
    shm = set().union(set(), *(_shm_mapped(p) for p in alive)) - _shm_mapped(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, v in alive.items():
            if running(pid, v[1]):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(running(p, v[1]) for p, v in alive.items()):
            time.sleep(0.05)
    for path in shm:
        Path(path).unlink(missing_ok=True)
    for v in tree.values():  # Triton's temp copy of a model: /tmp/folderXXXXXX/{config.pbtxt,1/model.py}
        model_py = Path(v[2][1]) if v[0] == STUB[:15] and len(v[2]) > 1 else None
        if model_py and model_py.name == "model.py" and model_py.parent.name == "1":
            folder = model_py.parents[1]
            if folder.name.startswith("folder") and (folder / "config.pbtxt").is_file():
                shutil.rmtree(folder, ignore_errors=True)
    return sorted({v[0] for v in alive.values()})


def _shm_mapped(pid: int) -> set[str]:
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return set()
    return {ln.split(None, 5)[5] for ln in lines
            if len(ln.split(None, 5)) == 6 and ln.split(None, 5)[5].startswith("/dev/shm/")}


def crash_cause(output: str, log_text: str, exit_code: int | None) -> str:
    """Why tritonserver stopped by itself, in one sentence: from what it printed (C++ aborts and
    fatal signals go to its stdout/stderr, not to its log file), its exit code and its log."""
    output = output or ""
    aborted = re.search(r"terminate called after throwing an instance of '([^']+)'", output)
    what = re.search(r"what\(\):\s*(.+)", output)
    fatal = re.search(r"Signal \((\d+)\) received", output)
    if aborted:
        exc = aborted.group(1)
        detail = f" ({what.group(1).strip()})" if what and what.group(1).strip() != exc else ""
        if exc in ("std::bad_alloc", "std::length_error"):
            return f"tritonserver aborted on {exc}{detail}: an allocation failed; {OOM_HINT}"
        return f"tritonserver aborted on an uncaught C++ exception {exc}{detail}"
    number = int(fatal.group(1)) if fatal else None
    if number is None and exit_code is not None and exit_code < 0:
        number = -exit_code
    if number:
        name = _signal_name(number)
        if number in (signal.SIGINT, signal.SIGTERM):
            return f"tritonserver was stopped by {name}, sent to it and not to `serve run`"
        if number == signal.SIGKILL:
            return ("tritonserver was killed (SIGKILL): the kernel's out-of-memory killer does this when "
                    f"memory runs out; {OOM_HINT}")
        return f"tritonserver crashed ({name})"
    errors = [ln for ln in (log_text or "").splitlines()
              if ln.startswith("E") and not any(n in ln for n in LOG_NOISE)]
    last = f": {errors[-1][:300]}" if errors else ""
    code = f" with code {exit_code}" if exit_code is not None else ""
    return f"tritonserver exited{code}{last}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
