"""Whether a run may start, continue or replace one in its directory, and what a resume may change.

- `check_target` (before any work): `out` must not be a file, and a fresh run does not replace a
  directory that already holds a run unless asked (`resume=true` continues it, `overwrite=true` replaces it);
  a folder that holds no run is never emptied (`RunDir.check_target`).
- `check_resume_config`: a resumed run must be the same run. Keys that shape the model, the data or the optimizer
  state cannot change, nor can the data files' content (size and SHA-256, recorded by each checkpoint); the
  step budget, the evaluation and checkpoint cadence, early stopping and the learning-rate schedule may, and are
  applied and logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qatune.errors import ConfigError
from qatune.runs.layout import RunDir
from qatune.training import checkpoint as ckpt
from qatune.training.config import RunConfig, resumable_keys
from qatune.training.loggers import flatten

# Where the run lives and how it was started are not part of its identity. Which other keys a resume may change
# is declared on the config's fields (`resumable=True`, training/config.py).
_NOT_COMPARED = {"out", "resume", "overwrite"}

logger = logging.getLogger(__name__)


def check_target(cfg: RunConfig) -> None:
    """Refuse an `out` that cannot be this run's directory, before anything is loaded or written."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is an existing file, not a run directory")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true continues the run in out, overwrite=true replaces it: choose one")
    if not cfg.resume and not cfg.overwrite and RunDir(out).holds_run():
        raise ConfigError(f"{out} already holds a run: pass resume=true to continue it, overwrite=true to replace "
                          "it, or another out=")
    RunDir(out).check_target(replace=cfg.overwrite)


def check_resume_config(saved: dict[str, Any], cfg: RunConfig, world: int, where: Path) -> None:
    """Refuse a resume whose config changes the run's identity (every difference listed in one message); log the
    changes that a resume applies."""
    before, now = flatten(saved["config"]), flatten(cfg.to_dict())
    changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k] and k not in _NOT_COMPARED)
    resumable = resumable_keys()
    refused = [f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed if k not in resumable]
    refused += ckpt.data_changes(saved.get("data_files"), ckpt.data_identity(cfg.data.train, cfg.data.val))
    if saved.get("world_size", world) != world:
        refused.append(f"processes: {saved['world_size']} -> {world} (the data position and optimizer state are "
                       "laid out for the original number)")
    if refused:
        raise ConfigError(f"resume=true: the checkpoint {where} was trained with another configuration or "
                          f"other data, which cannot change on resume: {'; '.join(refused)}. Resume with the original "
                          "values and data, or start a new run (another out=, or overwrite=true)")
    for k in changed:
        logger.info(f"resume: {k} {before[k]!r} -> {now[k]!r} (applied)")
