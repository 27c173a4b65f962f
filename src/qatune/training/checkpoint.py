"""Training checkpoints: written atomically, rotated, and complete enough to resume bit-for-bit.

Layout under `RUN/checkpoints/`:
    step-000120/            one directory per checkpoint
        weights.safetensors   the trainable parameters (LoRA weights, or the whole model for full fine-tuning)
        state.pt              optimizer, scheduler, gradient scaler, RNG states, data position, counters
    last -> step-000120     symlinks, replaced atomically
    best -> step-000080

A checkpoint directory is written under a temporary name and renamed into place only when complete, and
the `last`/`best` links are swapped with `os.replace`, so a kill at any moment leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qatune.errors import ModelError
from qatune.utils.io import fsync_dir, write_dir_atomically


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (tied ones once), detached on CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _point(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], *,
                    best: bool, keep: int) -> Path:
    """Write `root/step-NNNNNN` atomically, point `last` (and `best` when `best`) at it, rotate old ones."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "weights.safetensors"))
        torch.save({**state, "rng": rng_state(), "step": step}, tmp / "state.pt")

    # Re-saving the same step (e.g. epoch end right after a periodic save) replaces it whole.
    final = write_dir_atomically(root / name, write, merge=False)
    _point(root / "last", name)
    if best:
        _point(root / "best", name)
    fsync_dir(root)
    _rotate(root, keep)
    return final


def _rotate(root: Path, keep: int) -> None:
    protected = {os.path.realpath(root / link) for link in ("last", "best") if (root / link).is_symlink()}
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in steps[: max(len(steps) - keep, 0)]:
        if os.path.realpath(p) not in protected:
            shutil.rmtree(p)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights, training state) of a checkpoint directory."""
    if not (path / "state.pt").is_file():
        raise ModelError(f"no checkpoint at {path}")
    weights = load_file(str(path / "weights.safetensors"))
    # weights_only=False: the state holds Python RNG tuples and numpy arrays. It is our own file, written by
    # save_checkpoint in this run directory, not a downloaded artefact.
    return weights, torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def load_trainable(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ModelError(f"checkpoint {where} does not fit this model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])


def latest(root: Path, which: str = "last") -> Path | None:
    link = root / which
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None
