"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Every file qatune writes as a result or as state goes through here: a temporary file (or directory) beside the
target, flushed to disk, then renamed over the target with `os.replace`, and the directory entry synced. A write
that fails (disk full, permissions) removes its temporary files, leaves the target as it was, and raises one
`StorageError` naming the target.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qatune.errors import StorageError
from qatune.utils.faults import fault_point

_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry, not only the file's data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file below `path` to disk (before a rename publishes them)."""
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
    with scratch_beside(path, directory=False) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("atomic-file")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    return path


# The names scratch_beside gives: ".NAME.tmp-" + tempfile's 8-character suffix.
_SCRATCH_NAME = re.compile(r"^\.[^/]+\.tmp-[A-Za-z0-9_]{8}$")


def is_scratch(path: Path) -> bool:
    """Whether `path` is named like the temporary of an atomic write (left behind when a kill interrupted it)."""
    return _SCRATCH_NAME.match(path.name) is not None


@contextmanager
def scratch_beside(target: Path, *, directory: bool) -> Iterator[Path]:
    """A temporary file (or directory) beside `target`, named `.NAME.tmp-XXXXXXXX`, for the with-block to fill
    and rename into place. If the block fails, the temporary goes and a file-system error becomes one
    `StorageError` naming `target` (and the file inside it), so that no writer has to repeat this policy."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{target.name}.tmp-"
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
            os.close(fd)
            tmp = Path(name)
        yield tmp
    except BaseException as e:
        if tmp is not None:
            if directory:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        if is_write_error(e):
            raise storage_error(e, target, tmp) from e
        raise


def _os_errno(e: BaseException) -> int | None:
    """The errno of a file-system error: an `OSError`'s, or the one that writers written in Rust (safetensors,
    tokenizers) put in their message, "... (os error 28)", since they raise plain exceptions."""
    if isinstance(e, OSError):
        return e.errno
    found = _RUST_OS_ERROR.search(str(e))
    return int(found.group(1)) if found else None


def is_write_error(e: BaseException) -> bool:
    """An error of the file system (disk full, quota, permissions, read-only), as opposed to a bug."""
    if isinstance(e, StorageError):
        return False  # already says which path
    return isinstance(e, OSError) or _os_errno(e) is not None


def storage_error(e: BaseException, target: Path, tmp: Path | None = None) -> StorageError:
    """One line naming the file that could not be written (the target's name, not the temporary one's)."""
    name = getattr(e, "filename", None) or str(target)
    if tmp is not None and str(name).startswith(str(tmp)):
        name = str(target) + str(name)[len(str(tmp)):]
    code = _os_errno(e)
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on device"
    else:
        reason = getattr(e, "strerror", None) or (os.strerror(code) if code else str(e))
    return StorageError(f"cannot write {name}: {reason}")


def write_dir_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` fill a temporary sibling directory, then put its files in place of `out_dir`'s.

    A new `out_dir` appears whole (one rename). An existing one is updated file by file with `os.replace`, so
    other files in it (e.g. a user's notes) are kept."""
    out = Path(out_dir)
    with scratch_beside(out, directory=True) as tmp:
        write(tmp)
        fsync_tree(tmp)
        fault_point("dir-written")
        if not out.exists():
            os.replace(tmp, out)
        else:
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
                fault_point("dir-file-replaced")
            tmp.rmdir()
            fsync_dir(out)
        fsync_dir(out.parent)
    return out


def write_file_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` create a temporary file beside `path` (for writers that want a path, not bytes), then
    rename it over `path`: a large file (a GGUF export) appears whole or not at all."""
    path = Path(path)
    with scratch_beside(path, directory=False) as tmp:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path
