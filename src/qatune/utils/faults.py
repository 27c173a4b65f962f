"""A test hook for crash testing: `QATUNE_FAULT_AT=LABEL:N` kills this process with SIGKILL at the N-th time it
passes the fault point named LABEL (counted from the start of the process).

The writers of checkpoints and results call `fault_point(label)` between the steps of a write (after each file,
between the renames, between the link swaps), so that `tests/test_reliability.py` can kill a training run at
every one of them and check that resuming ends exactly where an uninterrupted run ends. Unless the variable is
set, `fault_point` only reads the environment and returns.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

FAULT_ENV = "QATUNE_FAULT_AT"
_passed: Counter[str] = Counter()


def fault_point(label: str) -> None:
    """Die here (SIGKILL, no cleanup, as a power cut or the OOM killer would) when `QATUNE_FAULT_AT` says so."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _passed[label] += 1
    name, _, nth = spec.rpartition(":")
    if name == label and str(_passed[label]) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
