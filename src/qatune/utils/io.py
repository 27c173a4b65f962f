"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Every file qatune writes as a result or as state goes through here: a temporary file (or directory) beside the
target, flushed to disk, then renamed over the target with `os.replace`, and the directory entry synced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry, not only the file's data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_dir_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None], *, merge: bool = True) -> Path:
    """Let `write(tmp)` fill a temporary sibling directory, then put its files in place of `out_dir`'s.

    A new `out_dir` appears whole (one rename). An existing one is updated file by file with `os.replace`
    (`merge=True`: other files in it, e.g. a user's notes, are kept), or swapped whole (`merge=False`: renamed
    aside, and removed only once the new one is in place)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        if not out.exists():
            os.replace(tmp, out)
        elif merge:
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
            tmp.rmdir()
            fsync_dir(out)
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
