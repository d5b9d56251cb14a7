"""Writing outputs: a temp file in the target folder, renamed over the target at the end, so no
command ever leaves a partial output file. Streams (/dev/null, /dev/stdout, a FIFO) are written
through, a symlink's target is replaced, other special files are refused; a full disk is a
one-line error naming the file; temp names carry the writer's pid so the next run in a folder
removes what a killed run left there."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shlex
import shutil
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path

from idle_export.errors import BadInputError

TEMP_PREFIX = ".idle-export-"  # + PID.HOSTTAG + "-": every temporary file or folder a command makes
_FD_PATHS = ("/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/self/fd/")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(BadInputError):
    """No room to write an output (exit 2: the user frees space or writes elsewhere)."""


def mkdir_hint(folder: str | Path) -> str:
    """The hint for a missing folder: a command that can be pasted into a shell as it is."""
    return f"create it: mkdir -p {shlex.quote(str(folder))}"


def _special_kind(mode: int) -> str | None:
    for test, name in ((stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


def is_stream(path: str | Path) -> bool:
    """True for outputs that are written through rather than replaced: /dev/stdout and other
    descriptors, FIFOs and character devices such as /dev/null (a stream is not a file)."""
    text = str(path)
    if text in _FD_PATHS[:2] or text.startswith(_FD_PATHS[2:]):
        return True
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _sep(option: str) -> str:
    """No space after an API parameter's `name=` (`output=x.onnx`), one after a flag (`--json x`)."""
    return "" if option.endswith("=") else " "


def resolve_output(path: str | Path, option: str = "output=") -> Path:
    """Where an output file really goes: a symlink's target (replaced, the link kept), the path
    itself otherwise. Block devices and sockets are refused."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    with contextlib.suppress(OSError):
        kind = _special_kind(os.stat(target).st_mode)
        if kind:
            raise BadInputError(f"{option}{_sep(option)}{path} is {kind}, not a file",
                                f"give {option} a regular file path")
    return target


def output_folder(path: str | Path) -> Path:
    """The folder for an output's temporary files: beside its target (one disk, so the final
    rename is atomic), or the system's temp folder for a stream."""
    if is_stream(path):
        return Path(tempfile.gettempdir())
    folder = resolve_output(path).parent
    return folder if str(folder) else Path(".")


def _notify(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def disk_full(path: Path, needed: int | None = None) -> DiskFullError:
    """The one message for a full disk: which file, how much it needs (when known), how much is free."""
    folder = path.parent if str(path.parent) else Path(".")
    free = _free_bytes(folder)
    parts = [f"needs about {_mb(needed)}"] if needed else []
    parts += [f"{_mb(free)} free"] if free is not None else []
    return DiskFullError(f"no space left on device writing {path}"
                         + (f" ({', '.join(parts)})" if parts else ""),
                         "free some space or write to another folder")


def check_free_space(folder: Path, needed: int, path: Path | None = None) -> None:
    """Before any work: refuse when `folder` has less than `needed` bytes free (+5 %)."""
    folder = Path(folder) if str(folder) else Path(".")
    free = _free_bytes(folder)
    if free is not None and needed > 0 and free < needed * 1.05:
        raise disk_full(path or folder / "output", needed)


def is_disk_full(e: BaseException) -> bool:
    """An OSError (or a library's wrapper of one) that says the disk is full."""
    return (isinstance(e, OSError) and e.errno in _NO_SPACE) or "No space left on device" in str(e)


@contextlib.contextmanager
def mapped_disk_full(path: Path, needed: int | None = None):
    """Turn a full disk inside the block into DiskFullError naming `path`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(Path(path), needed) from None
        raise


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _host_tag() -> str:
    """A short tag of this host's name: a temp name made on another host (a container sharing
    the folder, whose pids this one cannot see) is never judged here."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def owner_tag(pid: int | None = None) -> str:
    """The part of a temp name after TEMP_PREFIX that names its maker: PID.HOSTTAG."""
    return f"{os.getpid() if pid is None else pid}.{_host_tag()}"


def _owner_alive(name: str, made: float) -> bool:
    """Is the process named in a temp name (TEMP_PREFIX + PID.HOSTTAG + "-") still the one that
    made it? Names of other hosts, and names not of this form, count as alive (not ours to judge)."""
    pid, _, host = name[len(TEMP_PREFIX):].split("-", 1)[0].partition(".")
    if not pid.isdigit() or host != _host_tag():
        return True
    if int(pid) == os.getpid():
        return True
    started = _process_start(int(pid))
    return started is not None and started <= made + 2  # a later process reuses the pid


def clean_stale(folder: Path) -> list[str]:
    """Remove temp files and folders that killed runs left in `folder` (their process is gone, or
    its pid now belongs to a later process); say so on stderr. Returns their names."""
    removed = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(TEMP_PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        try:
            made = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if _owner_alive(entry.name, made):
            continue
        size = 0
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                size = sum(f.stat().st_size for f in Path(entry.path).rglob("*") if f.is_file())
                shutil.rmtree(entry.path)
            else:
                size = entry.stat(follow_symlinks=False).st_size
                os.remove(entry.path)
            removed.append(entry.name)
            _notify(f"note: removed {Path(folder) / entry.name} ({_mb(size)}), left by an "
                    f"interrupted run {time.strftime('%Y-%m-%d %H:%M', time.localtime(made))}")
    return removed


def temp_name(tag: str) -> str:
    """The prefix of a temporary file or folder of this process: clean_stale can tell its owner."""
    return f"{TEMP_PREFIX}{owner_tag()}-{tag}."


@contextlib.contextmanager
def work_dir(folder: str | Path, tag: str = "work"):
    """A temporary folder inside `folder` (so a final rename stays on one disk), removed at the
    end; stale ones of killed runs are removed first."""
    folder = Path(folder) if str(folder) else Path(".")
    clean_stale(folder)
    tmp = Path(tempfile.mkdtemp(prefix=temp_name(tag), dir=folder))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, needed: int | None = None):
    """A binary file to write: it replaces `path` (with the usual file mode, umask applied) when the
    block ends without an error; on any error the temp file is removed and `path` is untouched.
    A stream (is_stream) is written through; a symlink's target is replaced."""
    path = Path(path)
    if is_stream(path):
        with mapped_disk_full(path, needed), open(path, "ab") as f:
            yield f
        return
    path = resolve_output(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"folder {folder} does not exist", mkdir_hint(folder))
    clean_stale(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_name(path.name), dir=folder)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise disk_full(path, needed) from None
        raise BadInputError(f"cannot write into {folder}", "choose a writable folder") from None
    try:
        with mapped_disk_full(path, needed):
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
    with atomic_open(path, needed=len(data)) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_output_path(path: Path, option: str = "output=", *, stream_ok: bool = True) -> Path:
    """Fail before any work if the output cannot be written. Streams pass when `stream_ok` (one
    file written through); a symlink is checked at its target."""
    path = Path(path)
    if is_stream(path):
        if not stream_ok:
            raise BadInputError(f"{option}{_sep(option)}{path} is not a regular file, and this output is "
                                "written with files beside it", f"give {option} a file path")
        return path
    target = resolve_output(path, option)
    folder = target.parent if str(target.parent) else Path(".")
    if target.exists() and target.is_dir():
        raise BadInputError(f"output {path} is a folder", "give a file name such as model.onnx")
    if not folder.exists():
        raise BadInputError(f"output folder {folder} does not exist", mkdir_hint(folder))
    if not folder.is_dir():
        raise BadInputError(f"output folder {folder} is not a folder", "give a path inside a folder")
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        fd, probe = tempfile.mkstemp(prefix=temp_name("probe"), dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise disk_full(path) from None
        raise BadInputError(f"output folder {folder} is not writable",
                            f"choose another {option} or fix the folder's permissions") from None
    return path


def _lock_holder(fd: int) -> str:
    """' (pid N)' of the process holding a flock on `fd`'s file, from /proc/locks, or ''."""
    ino = os.fstat(fd).st_ino
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].endswith(f":{ino}") and parts[4] != "->":
                return f" (pid {parts[4]})"
    return ""


@contextlib.contextmanager
def folder_lock(folder: Path, wait_s: float = 120.0):
    """Hold an exclusive lock on `folder` (flock on the folder itself: no lock file to leave
    behind) while writing into it; another writer waits up to `wait_s`, then gets a one-line
    error naming the process that holds it."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + wait_s
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _lock_holder(fd)
                if time.monotonic() > deadline:
                    raise BadInputError(f"{folder} is being written by another idle-export run{holder}",
                                        "wait for it to finish, or write to another folder") from None
                if not said:
                    _notify(f"waiting for another idle-export run{holder} writing {folder}")
                    said = True
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def copy_hashing(src: Path, dst: Path) -> str:
    """Copy src to dst (a new file) and return src's sha256, reading src once."""
    with open(dst, "wb") as out:
        return _sha256_of(src, out.write)


def sha256_file(path: Path) -> str:
    return _sha256_of(path)


def _sha256_of(path: Path, sink=None) -> str:
    """The sha256 of the file, read in 1 MiB pieces, each also handed to `sink` when given."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            if sink is not None:
                sink(chunk)
    return digest.hexdigest()

