"""The run directory's layout: every file and folder name of a run, and the operations that depend on them.

A run directory is what `qatune train` writes (and `qatune eval` adds to):

    config.yaml     the resolved configuration         summary.json    how the run went (written last)
    metrics.jsonl   one record per logged event         checkpoints/    step-NNNNNN/, last, best
    adapter/        LoRA result (peft format)           model/          full fine-tuning result (HF format)
    eval/           `qatune eval`'s test figures        eval-<name>/    another evaluation (an extra set, mc)
    tensorboard/    trackers.json    mlruns/            the experiment trackers' files
    .lock           held by the process that writes the run
    base.json       the base model: its absolute path (a local one) and the size and SHA-256 of its files

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

from qatune.errors import ConfigError, ModelError
from qatune.utils.io import atomic_write_text, file_identity, identity_change, is_scratch, scratch_beside
from qatune.utils.lock import DirLock
from qatune.utils.yamlfile import read_yaml

logger = logging.getLogger(__name__)

# A config.yaml is a qatune run's when it is a mapping with these keys of these types (what `save_config` writes).
_RUN_CONFIG_KEYS = {"model": str, "method": str, "data": dict, "train": dict}
_MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
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

    @property
    def spec(self) -> Path:
        """What the evaluation was made from (written after metrics.json by `compare/provenance.py`)."""
        return self.path / "spec.json"

    def discard(self) -> None:
        """Remove the folder atomically: one rename to a scratch name (`.eval.tmp-*`, which a run's cleanup also
        removes), then the deletion, so that no half-removed evaluation is ever read as one."""
        if not (self.path.exists() or self.path.is_symlink()):
            return
        with scratch_beside(self.path, directory=True) as scratch:
            os.replace(self.path, scratch)
        _remove(scratch)

    def done(self) -> bool:
        """metrics.json is written last, so its presence means the evaluation is complete."""
        return self.metrics.is_file()

    def write(self, metrics: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """predictions.jsonl, then metrics.json, each atomically: metrics.json exists only when complete (the
        sweep in `compare` treats its presence as "this evaluation is done"). The old metrics.json goes first,
        so that a write interrupted in between (a full disk) never leaves new predictions beside old metrics."""
        refuse_link(self.path)
        if self.metrics.exists() or self.metrics.is_symlink():
            self.metrics.unlink()
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
    def base(self) -> Path:
        """The base model's identity (`record_base`), so that loading the run later checks it is the same."""
        return self.path / "base.json"

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
        """Whether a run was started here: its config.yaml is a qatune run config (a mapping with `model`,
        `method`, `data` and `train`; written before anything else of the run). A folder with other files
        named config.yaml, model/ or eval/ is no run, and `overwrite=true` must not empty it."""
        if not self.path.is_dir() or self.config.is_symlink() or not self.config.is_file():
            return False
        try:
            raw = read_yaml(self.config)
        except ConfigError:
            return False
        return isinstance(raw, dict) and all(isinstance(raw.get(k), t) for k, t in _RUN_CONFIG_KEYS.items())

    def _owned(self) -> tuple[Path, ...]:
        """Every name a run writes at its top level (the lock aside)."""
        return (self.config, self.summary, self.metrics, self.checkpoints, self.adapter, self.model, self.base,
                self.eval.path, self.tensorboard, self.trackers, self.mlruns)

    def check_target(self, *, replace: bool) -> None:
        """Refuse (one `ConfigError` naming a few entries) a folder that holds no run but where a run would
        remove or overwrite something: with `replace` (overwrite=true) any non-empty one, since only a run's
        own outputs are ever removed; otherwise one holding a name that a run writes (config.yaml, model/...)."""
        if not self.path.is_dir() or self.holds_run():
            return
        entries = sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
        if replace and entries:
            raise ConfigError(f"overwrite=true replaces a qatune run, and {self.path} is not one (no qatune "
                              f"config.yaml) but holds {_few(entries)}: nothing was removed; choose another out=")
        owned = [n for n in entries if n in {p.name for p in self._owned()}]
        if owned:
            raise ConfigError(f"{self.path} holds {_few(owned)} but no qatune run (no qatune config.yaml): a run "
                              "would overwrite them; choose another out=")

    def refuse_links(self, *paths: Path) -> None:
        """Writes inside a run never follow a symbolic link: a linked adapter/, checkpoints/ or metrics.jsonl
        would put results outside the run (and a resume would write into whatever the link names). Refused
        rather than replaced: the link may be the user's storage arrangement, whose target holds results.
        `paths`: those a command writes (default: every name of the run)."""
        for p in paths or self._owned():
            refuse_link(p)

    def lock(self) -> DirLock:
        """Take the run directory's lock (one writer per run), held until `release()`."""
        return lock_directory(self.path, "run directory").acquire()

    def previous_outputs(self) -> list[Path]:
        """What `clear` removes: a previous run's checkpoints, metrics, result, evaluation and tracker files,
        those that exist. Only names a run owns are listed (config.yaml is rewritten, the lock is held); a
        check that refuses a folder holding other files belongs before `clear`, in the caller's validation."""
        names = (self.checkpoints, self.metrics, self.summary, self.adapter, self.model, self.eval.path,
                 self.tensorboard, self.trackers, self.base)
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

    # ------------------------------------------------------------------------------------- the base model

    def record_base(self, model: str, local: Path | None) -> None:
        """base.json: the base model as named, its absolute path when it is a local file or folder (`local`),
        and the size, mtime and SHA-256 of its weight files (of the .gguf), computed once here, streamed."""
        record: dict[str, Any] = {"model": model, "path": None, "files": {}}
        if local is not None:
            local = local.expanduser().resolve()
            files = [local] if local.is_file() else sorted({f for pattern in _MODEL_FILES for f in local.glob(pattern)})
            record["path"] = str(local)
            record["files"] = {f.name: file_identity(f) for f in files if f.is_file()}
        atomic_write_text(self.base, json.dumps(record, indent=1) + "\n")

    def recorded_base(self) -> str | None:
        """The local base model recorded in base.json (an absolute path), checked to be the same files (a
        `ModelError` naming the path and what changed otherwise); None when base.json records no local path
        (a hub id, an alias) or is absent (a run written before qatune recorded it)."""
        if not self.base.is_file():
            return None
        try:
            record = json.loads(self.base.read_text(encoding="utf-8"))
            path, files = record["path"], record["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{self.base} is not a base-model record: {e}") from None
        if path is None:
            return None
        local = Path(path)
        for name, recorded in files.items():
            f = local if local.is_file() or local.suffix == ".gguf" else local / name
            change = identity_change(f, recorded)
            if change is not None:
                raise ModelError(f"the base model of {self.path} changed since it was trained: {f}: {change} "
                                 f"(put back the model the run was trained on at {path})")
        return path

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


def refuse_link(path: Path) -> None:
    """A one-line `ConfigError` when `path` is a symbolic link (qatune writes inside a run, never through it)."""
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link (to {os.readlink(path)}): qatune does not write through "
                          "links inside a run; replace the link with the folder or file itself")


def _few(names: list[str], shown: int = 4) -> str:
    """A few names of a listing, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
