"""`utils.allocator.keep_freed_memory`: glibc keeps freed memory for the next training step."""

from __future__ import annotations

import ctypes
import sys

import pytest

from qatune.cli import commands
from qatune.utils.allocator import keep_freed_memory


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallopt")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's (this machine's C library has none)")
def test_glibc_is_told_to_keep_freed_memory_unless_turned_off(monkeypatch):
    assert keep_freed_memory() is True
    monkeypatch.setenv("QATUNE_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


def test_the_commands_that_train_apply_it(monkeypatch):
    calls = []
    monkeypatch.setattr(commands, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setitem(commands.COMMANDS, "train", lambda args: 0)
    monkeypatch.setitem(commands.COMMANDS, "ask", lambda args: 0)
    assert commands.main(["train", "x.yaml"]) == 0 and calls == [1]
    assert commands.main(["ask", "run", "a question"]) == 0 and calls == [1]  # answering trains nothing
