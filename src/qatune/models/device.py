"""`usable_device(name, key)`: a device name checked against what this machine has, before anything is loaded.

`torch.device("tpu")` raises a RuntimeError listing torch's twenty device types, and `torch.device("cuda")` on
a machine without CUDA only fails at the first tensor moved there, with an AssertionError deep in a load. Both
become one `ConfigError` naming the setting (`--device`, `train.device`) and what this machine offers.
"""

from __future__ import annotations

import torch

from qatune.errors import ConfigError

DEVICE_CHOICES = "cpu, cuda, cuda:N, mps"  # the device types qatune runs on


def available_devices() -> list[str]:
    """The devices of this machine qatune can run on, for messages."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def usable_device(name: str | torch.device | None, key: str = "device") -> torch.device:
    """`name` (None: cpu) as a torch device, refused with a `ConfigError` naming `key` when it is not a device
    name, not a type qatune runs on, or not present on this machine."""
    try:
        device = torch.device(name if name is not None else "cpu")
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{key}={name!r:.80} is not a device name; choices: {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{key}={name}: qatune does not run on {device.type} devices; choices: {DEVICE_CHOICES}")
    here = available_devices()
    if device.type == "cpu" or (device.type == "mps" and "mps" in here):
        return device
    if device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count():
        return device
    raise ConfigError(f"{key}={name}: this device is not available on this machine (available: {', '.join(here)})")
