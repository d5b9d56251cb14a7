"""Atomic file writes: a temp file in the target folder, renamed over the target at the end, so
no command ever leaves a partial output file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import tempfile
from pathlib import Path

from idle_export.errors import BadInputError


@contextlib.contextmanager
def atomic_open(path: str | Path):
    """A binary file to write: it replaces `path` (with the usual file mode, umask applied) when the
    block ends without an error; on any error the temp file is removed and `path` is untouched."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"folder {folder} does not exist", mkdir_hint(folder))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError:
        raise BadInputError(f"cannot write into {folder}", "choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see atomic_open)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_output_path(path: Path, option: str = "-o/--output") -> Path:
    """Fail before any work if the output cannot be written."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.exists() and path.is_dir():
        raise BadInputError(f"output {path} is a folder", "give a file name such as model.onnx")
    if not folder.exists():
        raise BadInputError(f"output folder {folder} does not exist", mkdir_hint(folder))
    if not folder.is_dir():
        raise BadInputError(f"output folder {folder} is not a folder", "give a path inside a folder")
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".idle-export-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError:
        raise BadInputError(f"output folder {folder} is not writable",
                            f"choose another {option} or fix the folder's permissions") from None
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mkdir_hint(folder: str | Path) -> str:
    """The hint for a missing folder: a command that can be pasted into a shell as it is."""
    return f"create it: mkdir -p {shlex.quote(str(folder))}"
