"""How the process's C allocator keeps freed memory, for training on CPU.

A training step allocates and frees the same large buffers every step: activations, weight gradients, the
LM head's casts (49,152 x 576 for SmolLM2). glibc serves allocations above its mmap threshold (at most 32 MiB
by its own adaptation) with fresh pages from the kernel and gives freed heap tops back; every fresh page then
costs a page fault on first touch (about 1 us each on the virtual machines measured: 0.25 ms per MiB). Kept
in the process, the same pages serve the next step. PyTorch's CPU launcher (`torch.backends.xeon.run_cpu`)
does the same with jemalloc (`dirty_decay_ms:-1`).

Measured (benchmarks/README.md): SmolLM2-135M full fine-tuning on 2 CPU threads, 6-10% less time per step and
+2% peak RSS; LoRA unchanged. The cost: memory freed after a peak stays with the process until it exits.
`qatune train`, `compare`, `demo` and `bench` (each of its configurations) apply it, whatever the backend;
`QATUNE_KEEP_FREED_MEMORY=0` turns it off. Other allocators (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 2**30  # allocations up to 1 GiB from the heap; up to 1 GiB free at its top kept


def keep_freed_memory() -> bool:
    """Set glibc's allocator to keep freed memory for reuse (module docstring); True when it was applied."""
    if os.environ.get("QATUNE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
