"""Atomic file output: write to a temporary file in the same folder, fsync, then rename.

A reader never sees a half-written file and an interrupted writer never destroys the previous
version: ``os.replace`` is atomic on POSIX and Windows when source and target share a file system.
The result gets the permissions a plain ``open(path, "w")`` would give it (an existing file's mode, else
``0o666`` less the umask). Temporary files are named ``.<name>.<pid>.<random>.tmp``; the ones a killed
process left behind (its pid no longer running) are removed the first time a process writes into that folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "cache_dir",
    "clean_once",
    "clean_stale_temporaries",
    "temp_prefix",
]

_TMP_RE = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")
_OLD_TMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # before the pid was part of the name
_cleaned: set[str] = set()
_lock = threading.Lock()


def _umask() -> int:
    with _lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temporaries(folder: str | Path, min_age_s: float = 3600.0) -> list[Path]:
    """Remove the temporary files that killed writers of this module left in ``folder``; returns them.

    A temporary file is stale when the process named in it no longer runs; files from before the pid was part
    of the name are stale when older than ``min_age_s``. Other files are never touched.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / ".model.safetensors.999999999.abcd1234.tmp").write_bytes(b"half")
        >>> [p.name for p in clean_stale_temporaries(d)]
        ['.model.safetensors.999999999.abcd1234.tmp']
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        if not e.name.endswith(".tmp") or not e.name.startswith("."):
            continue
        m = _TMP_RE.match(e.name)
        try:
            if m:
                stale = not _pid_alive(int(m.group(1)))
            else:
                stale = bool(_OLD_TMP_RE.match(e.name)) and now - e.stat().st_mtime > min_age_s
            if stale and e.is_dir(follow_symlinks=False):  # a staging folder (ONNX export)
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(Path(e.path))
            elif stale and e.is_file(follow_symlinks=False):
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:
            continue
    return removed


def clean_once(folder: str | Path) -> None:
    """:func:`clean_stale_temporaries` of ``folder``, once per process (writers call it before their first write)."""
    key = os.path.abspath(folder)
    if key not in _cleaned:
        _cleaned.add(key)
        clean_stale_temporaries(folder)


def temp_prefix(path: Path) -> str:
    """The prefix of this process's temporary files for ``path`` (see :func:`clean_stale_temporaries`)."""
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` keeps its previous content.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_once(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        try:
            mode = path.stat().st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_umask()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def cache_dir() -> Path:
    """Root of built datasets, cached weights and image checks: ``$FRUGALVISION_CACHE`` or ``~/.cache/frugalvision``.

    >>> isinstance(cache_dir(), Path)
    True
    """
    return Path(os.environ.get("FRUGALVISION_CACHE", Path.home() / ".cache" / "frugalvision")).expanduser()
