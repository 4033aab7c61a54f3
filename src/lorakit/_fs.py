"""Atomic file writes: a crash mid-write never leaves a half-written file behind.

We write to a temporary file in the destination's directory (same filesystem, so
`os.replace` is an atomic rename), fsync it, then rename over the target. Directories are
swapped in whole (`replace_dir`). A process killed mid-write leaves only hidden temp files
(".name.XXXX.tmp"), which `remove_stale_temps` clears on the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        crash_point("write.tmp_written")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    # Persist the rename itself; not every platform lets us open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomically write `path` with `writer(tmp_path)` (e.g. safetensors' save_file)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file under `directory`, then the directories: before a directory is renamed
    into place, its contents must be on disk, or a power cut could leave a complete-looking
    but empty checkpoint."""
    directory = Path(directory)
    for root, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Delete what killed writers left in `directory`: hidden ".name.XXXX.tmp" files of
    `atomic_path` and hidden temp directories (".step-N.XXXX", ".name.old"). Call it only where
    no other process is writing (at the start of a run that owns the directory)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if not entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the finished directory `tmp` at `final`, replacing what is there. On Linux the two
    are exchanged in one atomic step (renameat2 RENAME_EXCHANGE), so at every instant `final`
    is either the whole old directory or the whole new one; elsewhere the old one is moved
    aside first (a crash in between leaves it intact at ".name.old")."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if not final.exists():
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        return
    crash_point("replace_dir.before_swap")
    if _exchange(tmp, final):
        crash_point("replace_dir.swapped")
        _fsync_dir(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
        return
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's renameat2; False where that is unavailable."""
    libc_name = ctypes.util.find_library("c") if os.name == "posix" else None
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False  # ENOSYS / EINVAL (old kernel, filesystem without support): fall back


# -- crash-safety tests ---------------------------------------------------------------------
KILL_ENV = "LORAKIT_TEST_KILL_AT"
_kill_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """A named point inside a multi-step write. For crash-safety tests only: with
    LORAKIT_TEST_KILL_AT="name" (or "name:N") this process SIGKILLs itself the first (N-th)
    time it gets here, so a test can die exactly between two steps of a write. Otherwise a
    dictionary lookup and nothing more."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _kill_hits[name] = _kill_hits.get(name, 0) + 1
    if _kill_hits[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
