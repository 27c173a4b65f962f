"""The sweep file of `qatune compare`: which runs a comparison is made of, checked before anything runs.

A sweep names base models, methods (full, lora), LoRA ranks and seeds; the training config every run shares
(`base`, as a `train` config mapping, and `method_overrides`); a hyper-parameter `grid` per method, whose
points are trained with the first seed and picked by their validation metric (`select`); baselines (the
untrained model zero-shot, and `few_shot`: k solved training examples in the prompt); the test set (`eval`) and
further sets (`extra_eval`: unseen QA sets for generalisation, multiple-choice sets for forgetting). Keys are
documented in `configs/sweeps/*.yaml`; `run.py` carries a sweep out.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qatune.data.readers import resolve_data
from qatune.errors import ConfigError
from qatune.generation.decode import GenerationConfig
from qatune.training.state import EARLY_STOP_METRICS
from qatune.utils.io import atomic_write_text
from qatune.utils.yamlfile import read_yaml_mapping

SWEEP_KEYS = {"name", "description", "models", "methods", "ranks", "seeds", "zero_shot", "few_shot", "grid", "select",
              "base", "method_overrides", "eval", "extra_eval", "slices"}
EVAL_KEYS = {"data", "format", "max_examples", "task", "batch_size", "template", "generation", "loss", "prompt_format"}
EXTRA_KEYS = {"name", "data", "format", "task", "max_examples", "batch_size"}
EXTRA_TASKS = ("qa", "nlg", "mc")
METHODS = ("full", "lora")
Point = tuple[tuple[str, Any], ...]  # a grid point: (dotted config key, value) pairs
_IDENTIFIER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # slice names: one plain file name, never a path
MAX_NAME_BYTES = 100  # a run's name, before its seed: it becomes directory and file names (255 bytes at most)


def model_label(model: str) -> str:
    """A short, file-name-safe name for a model source: a local directory's name, or the hub id."""
    return Path(model).name if Path(model).exists() else model.replace("/", "_")


def _value_tag(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def bounded_name(name: str) -> str:
    """`name` when it fits MAX_NAME_BYTES; else a readable prefix and 10 hex digits of the whole name's SHA-256,
    so that a long grid value (a template) still makes a valid file name, and two that differ only at the end
    still make different ones."""
    raw = name.encode("utf-8")
    if len(raw) <= MAX_NAME_BYTES:
        return name
    head = raw[:MAX_NAME_BYTES - 11].decode("utf-8", errors="ignore")  # never half a character
    return f"{head}-{hashlib.sha256(raw).hexdigest()[:10]}"


@dataclass(frozen=True)
class Run:
    """One run. `method` is "zero-shot" or "k-shot" for an untrained model (evaluation only)."""

    model: str
    method: str
    rank: int | None = None
    seed: int | None = None
    point: Point = ()
    shots: int = 0

    @property
    def trained(self) -> bool:
        return self.method in METHODS

    @property
    def cell(self) -> tuple[str, str, int | None]:
        """The configuration this run belongs to, whatever its grid point and seed (what the report compares)."""
        return self.model, self.method, self.rank

    @property
    def name(self) -> str:
        label = model_label(self.model)
        if self.method == "zero-shot":
            return bounded_name(f"{label}-zero-shot")
        if self.method == "k-shot":
            return bounded_name(f"{label}-{self.shots}-shot")
        tag = "".join(f"-{key.rpartition('.')[2]}{_value_tag(value)}" for key, value in self.point)
        return bounded_name(f"{label}-{self.method}" + (f"-r{self.rank}" if self.rank else "") + tag) + f"-s{self.seed}"


@dataclass
class Sweep:
    path: Path
    name: str
    description: str
    models: list[str]
    methods: list[str]
    ranks: list[int]
    seeds: list[int]
    zero_shot: bool
    few_shot: int
    grid: dict[str, list[Point]]  # method -> its points ([()] without a grid)
    select_metric: str
    base: dict[str, Any]
    method_overrides: dict[str, dict[str, Any]]
    eval: dict[str, Any]
    extra_eval: list[dict[str, Any]] = field(default_factory=list)
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cells(self) -> list[tuple[str, str, int | None]]:
        return [(model, method, rank) for model in self.models for method in self.methods
                for rank in (self.ranks if method == "lora" else [None])]

    def candidates(self) -> list[Run]:
        """Every grid point of every configuration, with the first seed: what the selection compares."""
        return [Run(model, method, rank, self.seeds[0], point) for model, method, rank in self.cells()
                for point in self.grid[method]]

    def finals(self, picks: dict[tuple[str, str, int | None], Point]) -> list[Run]:
        """The picked point of every configuration, with every seed: what the test set scores."""
        return [Run(model, method, rank, seed, picks[(model, method, rank)]) for model, method, rank in self.cells()
                for seed in self.seeds]

    def every_trainable(self) -> list[Run]:
        return [Run(*cell, seed, point) for cell in self.cells() for point in self.grid[cell[1]] for seed in self.seeds]

    def baselines(self) -> list[Run]:
        runs = [Run(m, "zero-shot") for m in self.models] if self.zero_shot else []
        return runs + ([Run(m, "k-shot", shots=self.few_shot) for m in self.models] if self.few_shot else [])

    def train_config(self, run: Run, run_dir: Path) -> dict[str, Any]:
        """`base`, then the method's overrides, then the grid point, then what the run fixes."""
        cfg = _merge(self.base, self.method_overrides.get(run.method, {}))
        for key, value in run.point:
            *sections, leaf = key.split(".")
            node = cfg
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = value
        cfg.update(model=run.model, method=run.method, out=str(run_dir))
        cfg.setdefault("train", {})["seed"] = run.seed
        cfg["train"].setdefault("run_group", self.name)  # experiment trackers group the sweep's runs
        if run.method == "lora" and run.rank is not None:
            cfg.setdefault("lora", {})["r"] = run.rank
        return cfg


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every run's train config is validated (by `run.py`) before anything runs."""
    p = Path(path)
    raw = read_yaml_mapping(p, "sweep", "sweep keys")
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{p}: unknown sweep key(s) {sorted(unknown)}; valid: {sorted(SWEEP_KEYS)}")
    ev = raw.get("eval") or {}
    if "data" not in ev or set(ev) - EVAL_KEYS:
        raise ConfigError(f"{p}: `eval` needs `data` and takes only {sorted(EVAL_KEYS)}")
    methods = raw.get("methods", list(METHODS))
    if set(methods) - set(METHODS):
        raise ConfigError(f"{p}: methods must be among {METHODS}, got {methods}")
    models, seeds = raw.get("models") or [], raw.get("seeds", [0])
    if not models:
        raise ConfigError(f"{p}: `models` must list at least one model")
    grid = {method: _grid_points(p, method, (raw.get("grid") or {}).get(method)) for method in methods}
    uses_rank_grid = any(key == "lora.r" for point in grid.get("lora", [()]) for key, _ in point)
    ranks = raw.get("ranks", [None] if uses_rank_grid else [8])
    _check_lists(p, seeds=seeds, ranks=ranks, few_shot=raw.get("few_shot", 0), rank_grid=uses_rank_grid)
    select = raw.get("select") or {}
    metric = select.get("metric", "val_loss")
    if set(select) - {"metric"} or metric not in EARLY_STOP_METRICS:
        raise ConfigError(f"{p}: `select` takes `metric`, one of {', '.join(EARLY_STOP_METRICS)}")
    sweep = Sweep(p, raw.get("name", p.stem), raw.get("description", ""), models, methods, ranks, seeds,
                  bool(raw.get("zero_shot", False)), raw.get("few_shot", 0), grid, metric, raw.get("base") or {},
                  raw.get("method_overrides") or {}, ev, _extra_evals(p, raw.get("extra_eval") or []),
                  _check_slices(p, raw.get("slices") or {}))
    GenerationConfig(**ev.get("generation", {}))  # fail now on a bad decoding option, not after training
    for run in sweep.every_trainable() + sweep.baselines():  # run names become directory and file names
        if Path(run.name).name != run.name or run.name in ("", ".", ".."):
            raise ConfigError(f"{p}: run name {run.name!r} (from its model, method and grid values) is not a plain "
                              "file name; use grid values without path separators")
    return sweep


def _check_slices(path: Path, slices: Any) -> dict[str, dict[str, Any]]:
    """Slice names are identifiers (each becomes `data/NAME<suffix>` inside --out), sources existing files."""
    if not isinstance(slices, dict):
        raise ConfigError(f"{path}: `slices` must map names to {{source, start, stop}}")
    for name, spec in slices.items():
        if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name) or ".." in name:
            raise ConfigError(f"{path}: slice name {name!r} must be an identifier (letters, digits, '_', '-', '.'; "
                              "no path separators, no '..')")
        if not isinstance(spec, dict) or "source" not in spec or set(spec) - {"source", "start", "stop"}:
            raise ConfigError(f"{path}: slice {name} needs `source` and takes only `start` and `stop`")
        bounds = [spec.get(k) for k in ("start", "stop")]
        if any(v is not None and (isinstance(v, bool) or not isinstance(v, int)) for v in bounds):
            raise ConfigError(f"{path}: slice {name}: `start` and `stop` must be line numbers, got {bounds}")
        if not Path(resolve_data(spec["source"])).is_file():
            raise ConfigError(f"{path}: slice {name}: source file not found: {spec['source']}")
    return slices


def confined(root: Path, *parts: str) -> Path:
    """`root/parts...`, refused unless it lies inside `root`: every path a sweep writes goes through here or
    under a directory that did."""
    path = root.joinpath(*parts)
    inside = path.resolve().is_relative_to(root.resolve())
    if not inside or any(Path(part).is_absolute() or ".." in Path(part).parts for part in parts):
        raise ConfigError(f"{path} is outside the output directory {root}: sweep names must be plain identifiers")
    return path


def _grid_points(path: Path, method: str, spec: Any) -> list[Point]:
    """`{train.lr: [1e-4, 3e-4], lora.alpha: [16, 32]}` -> every combination, in key order."""
    if spec is None:
        return [()]
    if not isinstance(spec, dict) or not spec or not all(isinstance(v, list) and v for v in spec.values()):
        raise ConfigError(f"{path}: grid.{method} must map dotted config keys to non-empty lists of values")
    keys = list(spec)
    return [tuple(zip(keys, values)) for values in itertools.product(*(spec[k] for k in keys))]


def _check_lists(path: Path, *, seeds: Any, ranks: Any, few_shot: Any, rank_grid: bool) -> None:
    def ints(values: Any) -> bool:
        return isinstance(values, list) and bool(values) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in values)

    if not ints(seeds):
        raise ConfigError(f"{path}: `seeds` must be a non-empty list of integers, got {seeds!r}")
    if rank_grid and ranks != [None]:
        raise ConfigError(f"{path}: give LoRA ranks either as `ranks` or in `grid.lora` (lora.r), not both")
    if not rank_grid and not (ints(ranks) and all(r > 0 for r in ranks)):
        raise ConfigError(f"{path}: `ranks` must be a non-empty list of positive integers, got {ranks!r}")
    if isinstance(few_shot, bool) or not isinstance(few_shot, int) or few_shot < 0:
        raise ConfigError(f"{path}: `few_shot` must be a number of examples >= 0, got {few_shot!r}")


def _extra_evals(path: Path, specs: Any) -> list[dict[str, Any]]:
    if not isinstance(specs, list):
        raise ConfigError(f"{path}: `extra_eval` must be a list of {{name, data, task, max_examples}}")
    names = set()
    for spec in specs:
        if not isinstance(spec, dict) or {"name", "data"} - set(spec) or set(spec) - EXTRA_KEYS:
            raise ConfigError(f"{path}: each extra_eval needs `name` and `data` and takes only {sorted(EXTRA_KEYS)}")
        if not str(spec["name"]).replace("_", "").replace("-", "").isalnum() or spec["name"] in names:
            raise ConfigError(f"{path}: extra_eval name {spec['name']!r} must be a unique identifier")
        if spec.get("task", "qa") not in EXTRA_TASKS:
            raise ConfigError(f"{path}: extra_eval {spec['name']}: task must be one of {', '.join(EXTRA_TASKS)}")
        names.add(spec["name"])
    return [dict(spec, task=spec.get("task", "qa")) for spec in specs]


def slice_paths(sweep: Sweep, data_dir: Path) -> dict[str, str]:
    """`slice:NAME` -> the file `write_slices` writes it to (`data/NAME<suffix>`, checked to lie inside
    `data_dir`); nothing is written."""
    return {f"slice:{name}": str(confined(data_dir, f"{name}{Path(resolve_data(spec['source'])).suffix}"))
            for name, spec in sweep.slices.items()}


def write_slices(sweep: Sweep, data_dir: Path) -> dict[str, str]:
    """`slices: {NAME: {source, start, stop}}`: lines [start, stop) of a line-based file (JSONL, E2E .txt),
    written to `data/NAME<suffix>` so that `slice:NAME` can stand for a fixed, documented split."""
    paths = slice_paths(sweep, data_dir)
    for name, spec in sweep.slices.items():
        text = slice_text(spec)
        target = Path(paths[f"slice:{name}"])
        data_dir.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            atomic_write_text(target, text)
    return paths


def slice_text(spec: dict[str, Any]) -> str:
    """What a slice's file holds: lines [start, stop) of its source, as they are now."""
    source = Path(resolve_data(spec["source"]))
    return "".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[spec.get("start", 0):spec.get("stop")])


def substitute(node: Any, paths: dict[str, str]) -> Any:
    """`slice:NAME` strings anywhere in a config replaced by the slice's file."""
    if isinstance(node, dict):
        return {k: substitute(v, paths) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, paths) for v in node]
    if isinstance(node, str) and node.startswith("slice:"):
        if node not in paths:
            raise ConfigError(f"{node}: no such slice (defined: {sorted(paths) or 'none'})")
        return paths[node]
    return node


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge, `extra` winning; inputs are not modified."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
