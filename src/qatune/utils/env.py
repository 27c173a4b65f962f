"""The machine a measurement ran on: recorded next to every benchmark and sweep result."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Date, CPU, threads, load, library versions, and the GPU when `device` is CUDA (or CUDA is present)."""
    device = torch.device(device) if device is not None else None
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "transformers": _version("transformers"), "peft": _version("peft"),
                     "qatune": _version("qatune")},
        "device": str(device) if device is not None else None,
        "gpu": None,
    }
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device or 0)
        info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                       "capability": f"{props.major}.{props.minor}"}
    return info
