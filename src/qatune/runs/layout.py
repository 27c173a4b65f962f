"""The run directory's layout: every file and folder name of a run, and the operations that depend on them.

A run directory is what `qatune train` writes (and `qatune eval` adds to):

    config.yaml     the resolved configuration         summary.json    how the run went (written last)
    metrics.jsonl   one record per logged event         checkpoints/    step-NNNNNN/, last, best
    adapter/        LoRA result (peft format)           model/          full fine-tuning result (HF format)
    eval/           `qatune eval`'s test figures        eval-<name>/    another evaluation (an extra set, mc)
    tensorboard/    trackers.json    mlruns/            the experiment trackers' files
    .lock           held by the process that writes the run

Each evaluation folder holds `metrics.json` and `predictions.jsonl` (`EvalDir`); the result folder holds the
model card, `README.md`. No other module spells these names: it asks `RunDir` (tests/test_run_layout.py checks
it). What a checkpoint folder holds is the checkpoint format's (`training/checkpoint.py`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatune.utils.io import atomic_write_text, is_scratch
from qatune.utils.lock import DirLock
from qatune.utils.yamlfile import read_yaml

logger = logging.getLogger(__name__)

LOCK = ".lock"  # the lock file of every directory qatune writes (a run, a comparison)
CARD = "README.md"  # the model card, inside the result folder (where the Hugging Face Hub reads it)


def lock_directory(directory: str | os.PathLike, what: str) -> DirLock:
    """An (unacquired) lock on `directory`: one writer at a time (`utils.lock`)."""
    return DirLock(Path(directory) / LOCK, what)


@dataclass(frozen=True)
class EvalDir:
    """One evaluation's folder: `metrics.json` (the aggregate) and `predictions.jsonl` (one row per input)."""

    path: Path

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.jsonl"

    def done(self) -> bool:
        """metrics.json is written last, so its presence means the evaluation is complete."""
        return self.metrics.is_file()

    def write(self, metrics: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """predictions.jsonl, then metrics.json, each atomically: metrics.json exists only when complete (the
        sweep in `compare` treats its presence as "this evaluation is done")."""
        atomic_write_text(self.predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        atomic_write_text(self.metrics, json.dumps(metrics, indent=2) + "\n")


@dataclass(frozen=True)
class RunDir:
    """A run directory at `path` (it need not exist yet)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # ------------------------------------------------------------------------------------------ the names

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def trackers(self) -> Path:
        """Each tracker's run id, so that a resumed training continues the same tracked run."""
        return self.path / "trackers.json"

    @property
    def mlruns(self) -> Path:
        """MLflow's local file store, when no `MLFLOW_TRACKING_URI` names another."""
        return self.path / "mlruns"

    @property
    def eval(self) -> EvalDir:
        """`qatune eval`'s default folder: the test figures (the model card reports them)."""
        return EvalDir(self.path / "eval")

    def eval_named(self, name: str) -> EvalDir:
        """Another evaluation's folder, `eval-<name>` (a sweep's extra set, a multiple-choice file)."""
        return EvalDir(self.path / f"eval-{name}")

    # ---------------------------------------------------------------------------------------- the result

    def result_for(self, method: str) -> Path:
        """Where training writes its result: `adapter/` for LoRA, `model/` for full fine-tuning."""
        return self.adapter if method == "lora" else self.model

    @property
    def result(self) -> Path | None:
        """The result folder that exists (`adapter/`, else `model/`), or None before training has finished."""
        return next((p for p in (self.adapter, self.model) if p.is_dir()), None)

    @property
    def card(self) -> Path | None:
        """The model card inside the result folder (None without a result)."""
        result = self.result
        return result / CARD if result is not None else None

    def read_config(self) -> dict[str, Any] | None:
        """config.yaml as plain YAML (None when absent): using a run must not fail because it was trained by a
        qatune that knows other config keys."""
        return (read_yaml(self.config) or {}) if self.config.is_file() else None

    # ------------------------------------------------------------------------------- writing the directory

    def holds_run(self) -> bool:
        """Whether a run was started here: any of config.yaml, checkpoints/, metrics.jsonl, summary.json."""
        markers = (self.config, self.checkpoints, self.metrics, self.summary)
        return self.path.is_dir() and any(p.exists() or p.is_symlink() for p in markers)

    def lock(self) -> DirLock:
        """Take the run directory's lock (one writer per run), held until `release()`."""
        return lock_directory(self.path, "run directory").acquire()

    def previous_outputs(self) -> list[Path]:
        """What `clear` removes: a previous run's checkpoints, metrics, result, evaluation and tracker files,
        those that exist. Only names a run owns are listed (config.yaml is rewritten, the lock is held); a
        check that refuses a folder holding other files belongs before `clear`, in the caller's validation."""
        names = (self.checkpoints, self.metrics, self.summary, self.adapter, self.model, self.eval.path,
                 self.tensorboard, self.trackers)
        return [p for p in names if p.exists() or p.is_symlink()]

    def clear(self) -> None:
        """`overwrite=true`: the previous run's outputs go (under the lock, once the new run is validated), so
        that nothing of it mixes into the new one."""
        for path in self.previous_outputs():
            _remove(path)

    def remove_interrupted_writes(self) -> list[str]:
        """The temporary files and directories of result writes that a kill interrupted (`.adapter.tmp-*`,
        `.summary.json.tmp-*`...) go; only the lock holder writes here, so none is in use. Returns their names."""
        found = sorted(p for p in self.path.iterdir() if is_scratch(p)) if self.path.is_dir() else []
        for p in found:
            _remove(p)
        return [p.name for p in found]

    # ---------------------------------------------------------------------------------- metrics on resume

    def count_metrics_records(self) -> int:
        """Complete lines in metrics.jsonl: what a checkpoint records, so that a resume can cut back to it."""
        if not self.metrics.is_file():
            return 0
        with open(self.metrics, "rb") as f:
            return sum(1 for line in f if line.endswith(b"\n") and line.strip())

    def repair_metrics(self, records: int | None) -> None:
        """The one rule by which metrics.jsonl is cut back on resume: keep its first `records` records (those
        logged before the resumed checkpoint); a torn or unreadable line, which only a crash mid-write leaves,
        is dropped and said so. `None`: a fresh start, nothing to cut."""
        path = self.metrics
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
            logger.warning(f"{path}: dropped {torn} incomplete line(s) left by an interrupted write")
        atomic_write_text(path, "".join(line + "\n" for line in kept[:records]))  # a kill here loses nothing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
