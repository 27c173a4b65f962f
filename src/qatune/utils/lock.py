"""One writer per directory: an exclusive `flock` on a lock file in it, which holds the owner's PID (the file's
name is the run layout's, `runs.layout.lock_directory`).

The operating system releases a `flock` when its process dies, however it dies (SIGKILL included), so a lock
left behind by a crashed run never blocks the next one: only a live process can hold it. The lock file itself
stays (removing it would let two processes lock two different files of the same name).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from qatune.errors import StorageError, TrainingError


class DirLock:
    """`with DirLock(lock_file, "run directory"):` -- or `acquire()` / `release()`. Creates the directory if needed."""

    def __init__(self, lock_file: str | os.PathLike, what: str = "directory"):
        self.lock_file, self.what = Path(lock_file), what
        self.path = self.lock_file.parent  # the directory it guards
        self.fd: int | None = None

    def acquire(self) -> DirLock:
        lock_file = self.lock_file
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot lock {lock_file}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TrainingError(f"{self.path} is in use: another qatune process (PID {holder}) is writing to this "
                                f"{self.what}; wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
