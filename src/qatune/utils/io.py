"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Every file qatune writes as a result or as state goes through here: a temporary file (or directory) beside the
target, flushed to disk, then renamed over the target with `os.replace`, and the directory entry synced. A write
that fails (disk full, permissions) removes its temporary files, leaves the target as it was, and raises one
`StorageError` naming the target.
"""

from __future__ import annotations

import errno
import hashlib
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
# numpy's `tofile` reports a short write as a plain OSError without errno, "32768 requested and 24664 written";
# on a regular file a short write means the file system took no more: no space (or quota) left.
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def current_umask() -> int:
    """The process's umask, read without changing it (Linux's /proc/self/status has it); elsewhere set and
    restored at once (`os.umask` can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, *, directory: bool) -> None:
    """`mkstemp`/`mkdtemp` create 0600/0700 whatever the umask: give the result the mode `open()`/`mkdir()`
    would have given it, so results are as readable as any other file the user writes."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


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
        _follow_umask(tmp, directory=directory)
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
        return errno.ENOSPC if e.errno is None and _SHORT_WRITE.match(str(e)) else e.errno
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


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (a multi-GB model never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: Path) -> dict[str, int | str]:
    """What identifies a file's content: its size and SHA-256, and its mtime (so that a later check can skip
    the hash while size and mtime are unchanged)."""
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def identity_change(path: Path, recorded: dict[str, int | str]) -> str | None:
    """How the file at `path` differs from its `file_identity` record (None when it is the same content).
    Size and mtime unchanged: taken as unchanged without reading the file (hashing a multi-GB model at every
    load would cost more than the load); a changed mtime alone (a copy, a touch) costs one hash."""
    if not path.is_file():
        return "it is missing"
    st = path.stat()
    if st.st_size != recorded.get("bytes"):
        return f"it has {st.st_size} bytes, {recorded.get('bytes')} when recorded"
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return None
    return None if sha256_file(path) == recorded.get("sha256") else "its content (SHA-256) changed"


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


def replace_dir_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` fill a fresh sibling directory, then swap it in for `out_dir` whole: unlike
    `write_dir_atomically`, nothing of the old folder survives (a stale shard or shard index would be read with
    the new config). The old folder is renamed aside (`.NAME.old-XXXXXXXX`) and removed after the swap; a kill
    in between leaves it there, and `remove_leftovers_beside` removes it at the next write."""
    out = Path(out_dir)
    with scratch_beside(out, directory=True) as tmp:
        write(tmp)
        fsync_tree(tmp)
        fault_point("dir-written")
        aside = swap_dir_in(tmp, out, aside_fault="old-dir-set-aside")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return out


def swap_dir_in(tmp: Path, final: Path, *, aside_fault: str) -> Path | None:
    """Rename the finished directory `tmp` to `final`. A same-named directory is first renamed aside, into a fresh
    `.NAME.old-XXXXXXXX` folder beside it (a kill in between leaves it whole there); returns that folder for the
    caller to remove once it no longer needs it, or None. `aside_fault`: the crash-test point between the renames."""
    aside = None
    if final.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, aside / final.name)
        fault_point(aside_fault)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return aside


def remove_leftovers_beside(target: str | os.PathLike) -> list[Path]:
    """The temporaries an interrupted write of `target` left beside it (`.NAME.tmp-*`, `.NAME.old-*`, nested
    ones included), removed; returns them. Only for targets that one process writes at a time."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    found = sorted(p for p in target.parent.iterdir() if p.name.startswith(prefixes)
                   or p.name.startswith(tuple("." + q for q in prefixes)))
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


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
