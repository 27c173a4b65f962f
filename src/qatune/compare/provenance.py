"""What each result of a sweep was made from, so that a rerun never reports a result of other settings.

`qatune compare` skips work that is done; "done" means done with the settings the sweep gives now:

- an evaluation records its spec in `eval*/spec.json` (`EvalDir.spec`): the model it scored (a trained run's
  summary.json digest, or the base model), the data file (path, SHA-256, size) and every setting it was called
  with (task, format, template, prompt format, shots, generation, max examples...). An evaluation whose spec
  differs from the sweep's, or that has none, is removed and made again: evaluating is cheap;
- a training is described by the run's own config.yaml (what `qatune train` resolved) and by the data files it
  read (SHA-256 and size of data.train and data.val, recorded in OUT/trainings.json when it starts). A run
  whose config differs from the sweep's in a key that changes the result, whose data file changed, or whose
  slice would be rewritten (its source file changed), is refused before anything is written: training is
  expensive, and resuming it with other settings would mix two. The error names each run and key; use another
  --out or remove those runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from qatune.compare.sweep import Sweep, slice_paths, slice_text
from qatune.data.readers import resolve_data
from qatune.errors import ConfigError
from qatune.runs.layout import EvalDir, RunDir
from qatune.training.config import config_from_dict
from qatune.training.loggers import flatten
from qatune.utils.io import atomic_write_text, sha256_file

# Config keys that do not change what a training computes: where it writes, how it reports, how often it saves.
_NOT_RESULTS = {"out", "resume", "overwrite", "train.progress", "train.log_every", "train.report_to",
                "train.tensorboard", "train.run_group", "train.keep_checkpoints", "train.save_every"}
_PATH_KEYS = ("model", "tokenizer", "data.train", "data.val")  # the same file however the path is spelled
_DATA_KEYS = ("data.train", "data.val")
TRAINING_INPUTS = "trainings.json"  # OUT/trainings.json: run name -> the data files it was trained from


# ------------------------------------------------------------------------------------------------ evaluations


def evaluation_spec(function: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The spec of calling `function(**kwargs)`: the source as its identity, the data file as its fingerprint,
    the shots as a digest, every other argument as given (JSON-normalised, so that it compares with a read one)."""
    spec: dict[str, Any] = {"function": function}
    for key, value in kwargs.items():
        if key == "source":
            spec[key] = _model_identity(value)
        elif key == "data":
            spec[key] = file_fingerprint(value)
        elif key == "shots":
            rows = [dataclasses.asdict(shot) for shot in value]
            spec[key] = {"count": len(rows), "sha256": _digest(json.dumps(rows, sort_keys=True).encode())}
        elif dataclasses.is_dataclass(value):
            spec[key] = dataclasses.asdict(value)
        else:
            spec[key] = value
    return json.loads(json.dumps(spec, default=str))


def is_current(where: EvalDir, spec: dict[str, Any]) -> bool:
    """Whether `where` holds a finished evaluation made from exactly `spec`."""
    if not (where.done() and where.spec.is_file()):
        return False
    try:
        return json.loads(where.spec.read_text()) == spec
    except (ValueError, OSError):  # a spec that cannot be read proves nothing
        return False


def record_spec(where: EvalDir, spec: dict[str, Any]) -> None:
    """Written after metrics.json: a kill in between leaves an evaluation without a spec, which is redone."""
    atomic_write_text(where.spec, json.dumps(spec, indent=2) + "\n")


def file_fingerprint(data: str | Path) -> dict[str, Any]:
    """A data argument's path and, for a local file or directory of files, the SHA-256 and size of its content
    (`hf:` data has only its name)."""
    path = Path(resolve_data(data))
    if path.is_file():
        return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else []
    if not files:
        return {"path": str(data)}
    listing = "".join(f"{f.relative_to(path)}\0{sha256_file(f)}\n" for f in files)  # names and contents
    return {"path": str(path), "sha256": _digest(listing.encode()), "bytes": sum(f.stat().st_size for f in files)}


def _model_identity(source: str | Path) -> dict[str, Any]:
    """A trained run by its summary.json's digest (what training it was), a base model by its name."""
    summary = RunDir(Path(source)).summary
    if summary.is_file():
        return {"run": str(source), "summary_sha256": _digest(summary.read_bytes())}
    return {"model": str(source)}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------------------------- trainings


def refuse_changed_trainings(sweep: Sweep, out: Path, configs: dict[str, dict[str, Any]]) -> None:
    """Refuse, before anything is written, when a run already started in `out` was trained with other settings
    than the sweep now gives it: every such run and key in one error."""
    rewritten = changed_slices(sweep, out / "data")
    recorded = _read_record(out / TRAINING_INPUTS)
    problems = []
    for name, config in configs.items():
        saved = RunDir(out / "runs" / name).read_config()
        if saved is None:
            continue
        wanted = config_from_dict(config).resolved().to_dict()
        differences = config_differences(saved, wanted)
        differences += [f"{key}: {slice_name} changed (its source file is not what the run was trained on)"
                        for key, slice_name in _slices_read(wanted, rewritten)]
        differences += _data_differences(recorded.get(name, {}), wanted)
        if differences:
            problems.append(f"{out / 'runs' / name} ({'; '.join(differences)})")
    if problems:
        raise ConfigError(f"these runs were trained with other settings than the sweep gives them now: "
                          f"{', '.join(problems)}. Use another --out, or remove those runs to train them again")


def record_training_inputs(out: Path, name: str, config: dict[str, Any]) -> None:
    """Before a run trains: the content of the data files it reads, for the next rerun to compare with."""
    record = _read_record(out / TRAINING_INPUTS)
    record[name] = training_inputs(config)
    atomic_write_text(out / TRAINING_INPUTS, json.dumps(record, indent=2) + "\n")


def training_inputs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """data.train / data.val -> SHA-256 and size of their content (local files only; the path is the config's)."""
    flat = flatten(config)
    found = {key: file_fingerprint(flat[key]) for key in _DATA_KEYS if isinstance(flat.get(key), str)}
    return {key: {"sha256": f["sha256"], "bytes": f["bytes"]} for key, f in found.items() if "sha256" in f}


def _data_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    now = training_inputs(wanted)
    return [f"{key}: the content of {flatten(wanted)[key]} changed since the run was trained on it (SHA-256 "
            f"{recorded[key]['sha256'][:12]}... -> {now[key]['sha256'][:12]}...)"
            for key in sorted(recorded.keys() & now.keys()) if recorded[key] != now[key]]


def _read_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): remove it, or use another --out") from None


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """`key: saved -> wanted` for each key both configs have that differs and changes results."""
    before, now = flatten(saved), flatten(wanted)
    keys = sorted(k for k in before.keys() & now.keys() if k not in _NOT_RESULTS)
    return [f"{k}: {before[k]!r} -> {now[k]!r}" for k in keys if not _same(k, before[k], now[k])]


def changed_slices(sweep: Sweep, data_dir: Path) -> dict[str, str]:
    """The slice files that `write_slices` would rewrite (their source changed): path -> slice name."""
    paths = slice_paths(sweep, data_dir)
    changed = {}
    for name, spec in sweep.slices.items():
        target = Path(paths[f"slice:{name}"])
        if target.is_file() and target.read_text(encoding="utf-8") != slice_text(spec):
            changed[str(target.resolve())] = f"slice {name}"
    return changed


def _slices_read(config: dict[str, Any], rewritten: dict[str, str]) -> list[tuple[str, str]]:
    flat = flatten(config)
    return [(key, rewritten[str(Path(flat[key]).resolve())]) for key in _DATA_KEYS
            if isinstance(flat.get(key), str) and str(Path(flat[key]).resolve()) in rewritten]


def _same(key: str, before: Any, now: Any) -> bool:
    if before == now:
        return True
    if key in _PATH_KEYS and isinstance(before, str) and isinstance(now, str):
        return Path(before).resolve() == Path(now).resolve()
    return False
