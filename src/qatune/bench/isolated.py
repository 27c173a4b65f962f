"""One process per configuration: how `qatune bench` tells configurations' memory apart on CPU.

The process RSS of one benchmark process cannot be split between the configurations it holds, and tracemalloc
does not see tensor memory. So each configuration runs in a child process of its own (`python -m
qatune.bench.runner`, which builds, warms up and then steps on request), and its whole-process peak resident
set (`VmHWM`) is what it reports when it is told to stop: imports, weights loading, optimizer state and
activations, as a `qatune train` process would hold them. The parent still alternates: one step of each
child per round, one child running at a time.

Parent and child speak JSON lines (nothing is unpickled): the parent writes requests to the child's stdin,
the child answers on its stdout with lines starting with `PREFIX` (anything else a library prints there is
passed over). The child's stderr (its log) is the parent's.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any, TextIO

from qatune.errors import QatuneError

PREFIX = "@qatune-bench "


class ChildError(QatuneError):
    """A benchmark child process ended or answered out of turn."""


def peak_rss_bytes() -> int:
    """This process's peak resident set: `VmHWM` from /proc (Linux), else `ru_maxrss` (KiB on Linux, bytes on
    macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def answer(out: TextIO, message: dict[str, Any]) -> None:
    """Child side: one answer to the parent."""
    out.write(PREFIX + json.dumps(message) + "\n")
    out.flush()


class Child:
    """Parent side: a configuration's process. `request` sends one JSON request and returns the answer."""

    def __init__(self, spec: dict[str, Any]):
        self.name = spec["name"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qatune.bench.runner"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.spec = spec

    def start(self) -> dict[str, Any]:
        """Send the configuration; returns the child's answer once it is built and warmed up."""
        return self.request(self.spec)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise ChildError(f"{self.name}: the benchmark process ended (exit {self.process.wait()})") from None
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        raise ChildError(f"{self.name}: the benchmark process ended (exit {self.process.wait()})")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
