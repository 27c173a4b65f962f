"""The library logs (`logging.getLogger(__name__)` under `qatune`, a `NullHandler` only); the CLI shows: one plain
line per message on stderr, so that stdout stays for results (`qatune eval` prints JSON there)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class _StderrLines(logging.StreamHandler):
    """Writes each message as it is (no markup, no wrapping) to whatever `sys.stderr` is when it is written: a
    rich progress bar redirects stderr while it is drawn (messages then print above the bar), pytest swaps it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


@contextmanager
def showing_logs(level: int = logging.INFO) -> Iterator[None]:
    """The `qatune` loggers' messages at `level` and above on stderr for the duration of one command; the handler
    and the level are removed afterwards, so commands run one after another (tests) never add up handlers."""
    package = logging.getLogger("qatune")
    handler, previous = _StderrLines(), package.level
    package.addHandler(handler)
    package.setLevel(level)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(previous)
