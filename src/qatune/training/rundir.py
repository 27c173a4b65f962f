"""The run directory: who may write it, when a run may start or continue in it, and what a resume may change.

- `check_target` (before any work): `out` must not be a file, and a fresh run does not replace a directory that
  already holds a run unless asked (`resume=true` continues it, `overwrite=true` replaces it).
- `lock_run`: one writer per run directory (`utils.lock`); taken after everything is validated, before the first
  write, and held until the run ends.
- `check_resume_config`: a resumed run must be the same run. Keys that shape the model, the data or the optimizer
  state cannot change; the step budget, the evaluation and checkpoint cadence, early stopping and the learning-rate
  schedule may, and are applied and logged.
- `repair_metrics`: `metrics.jsonl` cut back to what the resumed checkpoint had seen (a torn last line included).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from qatune.errors import ConfigError
from qatune.training.config import RunConfig
from qatune.training.loggers import flatten
from qatune.utils.io import atomic_write_text, is_scratch
from qatune.utils.lock import DirLock

# What makes a directory a run's; `overwrite=true` removes these (config.yaml is rewritten).
RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.jsonl", "summary.json")
_RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "adapter", "model", "eval", "tensorboard",
              "trackers.json")
DEFAULT_MAX_LENGTH = 512
# Keys a resume may change: how long to train, how often to evaluate and save, early stopping, the learning-rate
# schedule of the remaining steps, logging, and how the same computation is run. Every other key (model, method,
# data, LoRA shape, seed, batch and accumulation, precision, optimizer settings) is the run's identity.
RESUMABLE_CHANGES = {
    "train.max_steps", "train.epochs", "train.eval_every", "train.save_every", "train.patience", "train.min_delta",
    "train.keep_checkpoints", "train.lr", "train.schedule", "train.warmup_steps", "train.min_lr_ratio",
    "train.eval_generate", "train.log_every", "train.progress", "train.tensorboard", "train.report_to",
    "train.run_group", "train.device", "train.compile", "train.fast_path", "train.gradient_checkpointing",
}
_NOT_COMPARED = {"out", "resume", "overwrite"}


def holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / name).exists() or (out / name).is_symlink() for name in RUN_MARKERS)


def check_target(cfg: RunConfig) -> None:
    """Refuse an `out` that cannot be this run's directory, before anything is loaded or written."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is an existing file, not a run directory")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true continues the run in out, overwrite=true replaces it: choose one")
    if not cfg.resume and not cfg.overwrite and holds_run(out):
        raise ConfigError(f"{out} already holds a run: pass resume=true to continue it, overwrite=true to replace "
                          "it, or another out=")


def lock_run(out: Path) -> DirLock:
    return DirLock(out, "run directory").acquire()


def clear_previous_run(out: Path) -> None:
    """`overwrite=true`: the previous run's checkpoints, metrics and result go (under the lock, once the new run
    is validated), so that nothing of it mixes into the new one."""
    for name in _RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def remove_interrupted_writes(out: Path) -> list[str]:
    """The temporary files and directories of result writes that a kill interrupted (`.adapter.tmp-*`,
    `.summary.json.tmp-*`...) go; only the lock holder writes here, so none is in use. Returns their names."""
    found = sorted(p for p in out.iterdir() if is_scratch(p)) if out.is_dir() else []
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return [p.name for p in found]


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence the model has positions for (native `Decoder` or a transformers model)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "max_positions"):
        return config.max_positions
    hf = getattr(getattr(model, "model", None), "config", None)
    return getattr(hf, "n_positions", None) or getattr(hf, "max_position_embeddings", None)


def resolve_max_length(max_length: int | None, limit: int | None) -> int:
    """`data.max_length`: 512 by default (the model's position limit when lower); an explicit value above the
    limit is refused, naming both (rows that long would index positions the model does not have)."""
    if max_length is None:
        return min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    if limit is not None and max_length > limit:
        raise ConfigError(f"data.max_length={max_length} is above the model's position limit of {limit} tokens; "
                          f"use data.max_length={limit} or less")
    return max_length


def check_resume_config(saved: dict[str, Any], cfg: RunConfig, world: int, where: Path,
                        say: Callable[[str], None]) -> None:
    """Refuse a resume whose config changes the run's identity (every difference listed in one message); log the
    changes that a resume applies."""
    before, now = flatten(saved["config"]), flatten(cfg.to_dict())
    changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k] and k not in _NOT_COMPARED)
    refused = [f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed if k not in RESUMABLE_CHANGES]
    if saved.get("world_size", world) != world:
        refused.append(f"processes: {saved['world_size']} -> {world} (the data position and optimizer state are "
                       "laid out for the original number)")
    if refused:
        raise ConfigError(f"resume=true: the checkpoint {where} was trained with another configuration, and these "
                          f"keys cannot change on resume: {'; '.join(refused)}. Resume with the original values, "
                          "or start a new run (another out=, or overwrite=true)")
    for k in changed:
        say(f"resume: {k} {before[k]!r} -> {now[k]!r} (applied)")


def count_records(path: Path) -> int:
    """Complete lines in `metrics.jsonl` (what a checkpoint records, so that a resume can cut back to it)."""
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.endswith(b"\n") and line.strip())


def repair_metrics(path: Path, records: int | None, say: Callable[[str], None]) -> None:
    """Keep the first `records` records of `metrics.jsonl` (those logged before the resumed checkpoint); a torn
    or unreadable line, which only a crash mid-write leaves, is dropped and said so. `None`: a fresh start."""
    if records is None or not path.is_file():
        return
    kept, torn = [], 0
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            torn += 1
            continue
        kept.append(line.decode("utf-8"))
    if torn:
        say(f"{path}: dropped {torn} incomplete line(s) left by an interrupted write")
    atomic_write_text(path, "".join(line + "\n" for line in kept[:records]))
