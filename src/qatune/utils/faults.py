"""A test hook for crash testing: `QATUNE_FAULT_AT=LABEL:N` kills this process with SIGKILL at the N-th time it
passes the fault point named LABEL (counted from the start of the process).

The writers of checkpoints and results call `fault_point(label)` between the steps of a write (after each file,
between the renames, between the link swaps), so that `tests/test_reliability.py` can kill a training run at
every one of them and check that resuming ends exactly where an uninterrupted run ends. Unless the variable is
set, `fault_point` only reads the environment and returns. Set, it is never silent: a malformed value is a
`ConfigError`, and the kill is announced on stderr first, so a variable left set by mistake explains the death.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

from qatune.errors import ConfigError

FAULT_ENV = "QATUNE_FAULT_AT"
_passed: Counter[str] = Counter()


def _parse(spec: str) -> tuple[str, int]:
    name, _, nth = spec.rpartition(":")
    if not name or not nth.isdigit() or int(nth) < 1:
        raise ConfigError(f"{FAULT_ENV}={spec!r:.80} is malformed: this crash-test hook takes LABEL:N (N >= 1); "
                          f"unset it for normal use")
    return name, int(nth)


def fault_point(label: str) -> None:
    """Die here (SIGKILL, no cleanup, as a power cut or the OOM killer would) when `QATUNE_FAULT_AT` says so."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, nth = _parse(spec)
    _passed[label] += 1
    if name == label and _passed[label] == nth:
        sys.stderr.write(f"qatune: {FAULT_ENV}={spec} (a crash-test hook): killing this process with SIGKILL at "
                         f"pass {nth} of the fault point {label!r}; unset {FAULT_ENV} for normal use\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
