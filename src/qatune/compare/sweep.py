"""The sweep file of `qatune compare`: which runs a comparison is made of, checked before anything runs.

A sweep names base models, methods (full, lora), LoRA ranks and seeds; the training config every run shares
(`base`, as a `train` config mapping, and `method_overrides`); a hyper-parameter `grid` per method, whose
points are trained with the first seed and picked by their validation metric (`select`); baselines (the
untrained model zero-shot, and `few_shot`: k solved training examples in the prompt); the test set (`eval`) and
further sets (`extra_eval`: unseen QA sets for generalisation, multiple-choice sets for forgetting). Every key is
declared below (`SweepFile` and its sections: type, default, range, choices; read by utils/settings.py's loader,
like a run config) and shown in use in `configs/sweeps/*.yaml`; `run.py` carries a sweep out.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from qatune.data.prompts import PROMPT_FORMATS
from qatune.data.readers import FORMATS, resolve_data
from qatune.errors import ConfigError
from qatune.evaluation.measure import TASKS, resolve_task
from qatune.generation.decode import GenerationConfig
from qatune.training.state import EARLY_STOP_METRICS
from qatune.utils.io import atomic_write_text
from qatune.utils.settings import build, setting
from qatune.utils.yamlfile import read_yaml_mapping

EXTRA_TASKS = ("qa", "nlg", "mc")
# LoRA variants a sweep compares as methods of their own: each trains as `method: lora` with these `lora` keys,
# and takes `grid.lora` and `method_overrides.lora` unless it has its own.
LORA_VARIANTS = {"dora": {"use_dora": True}, "pissa": {"init": "pissa"}, "olora": {"init": "olora"}}
METHODS = ("full", "lora", *LORA_VARIANTS)
METHOD_LABELS = {"lora": "LoRA", "dora": "DoRA", "pissa": "PiSSA", "olora": "OLoRA"}
BASELINE_FORMATS = ("plain", "chat")
VALIDATION = "validation"  # the baselines' evaluation on the validation set: RUN/eval-validation
Point = tuple[tuple[str, Any], ...]  # a grid point: (dotted config key, value) pairs
_IDENTIFIER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # slice names: one plain file name, never a path
MAX_NAME_BYTES = 100  # a run's name, before its seed: it becomes directory and file names (255 bytes at most)


def trains_lora(method: str) -> bool:
    return method == "lora" or method in LORA_VARIANTS


def model_label(model: str) -> str:
    """A short, file-name-safe name for a model source: a local directory's name, or the hub id."""
    return Path(model).name if Path(model).exists() else model.replace("/", "_")


def _value_tag(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # lora.targets: [q, v] -> q+v
        return "+".join(map(_value_tag, value))
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
    """One run. `method` is "zero-shot" or "k-shot" for an untrained model (evaluation only), prompted in
    `prompt_format`; a trained run is evaluated in the format it was trained in."""

    model: str
    method: str
    rank: int | None = None
    seed: int | None = None
    point: Point = ()
    shots: int = 0
    prompt_format: str | None = None

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
        prompted = f"-{self.prompt_format}" if self.prompt_format else ""
        if self.method == "zero-shot":
            return bounded_name(f"{label}-zero-shot{prompted}")
        if self.method == "k-shot":
            return bounded_name(f"{label}-{self.shots}-shot{prompted}")
        tag = "".join(f"-{key.rpartition('.')[2]}{_value_tag(value)}" for key, value in self.point)
        return bounded_name(f"{label}-{self.method}" + (f"-r{self.rank}" if self.rank else "") + tag) + f"-s{self.seed}"


class _SweepSection:
    KIND: ClassVar[str] = "sweep"  # unknown keys are "unknown sweep key"s


@dataclass
class SelectSection(_SweepSection):
    """How a configuration's grid point is picked, on the validation set only. A QA test set defaults to F1 of
    the answers generated for the validation questions (what users want is better answers, and a validation
    loss is not comparable across prompt formats); other tasks to the validation loss."""

    metric: str | None = setting(None, choices=EARLY_STOP_METRICS,
                                 help="the validation metric that picks each configuration's grid point; "
                                 "default: f1 for a QA test set, else val_loss")
    examples: int = setting(1000, ge=1, help="validation questions answered at each evaluation of a training "
                            "when the metric is a generation metric (its train.eval_generate)")


@dataclass
class EvalSection(_SweepSection):
    """The test set and how it is scored (`generation`: GenerationConfig's options, checked when loaded)."""

    data: str = setting(help="the test set (a file, `hf:NAME`, `slice:NAME`, ...); required")
    format: str = setting("auto", choices=FORMATS)
    task: str = setting("auto", choices=TASKS)
    max_examples: int | None = setting(None, ge=1)
    batch_size: int = setting(16, ge=1)
    template: str | None = None
    prompt_format: str | None = setting(None, choices=PROMPT_FORMATS)
    generation: dict[str, Any] = field(default_factory=dict)
    loss: bool = True


@dataclass
class ExtraEval(_SweepSection):
    """A further set: unseen QA or NLG data (generalisation), or multiple choice (forgetting)."""

    name: str = setting(help="a unique identifier; required")
    data: str = setting(help="required")
    format: str = setting("auto", choices=FORMATS)
    task: str = setting("qa", choices=EXTRA_TASKS)
    max_examples: int | None = setting(None, ge=1)
    batch_size: int = setting(16, ge=1)


@dataclass
class SliceSpec(_SweepSection):
    """Lines [start, stop) of a line-based file."""

    source: str = setting(help="required")
    start: int | None = setting(None, ge=0)
    stop: int | None = setting(None, ge=0)


@dataclass
class SweepFile(_SweepSection):
    """The keys of a sweep file, as written (`load_sweep` turns them into a `Sweep`)."""

    models: list[str] = setting(help="base models; at least one; required")
    eval: EvalSection = setting(help="required")
    name: str | None = setting(None, help="default: the file's name")
    description: str = ""
    methods: list[str] = setting(default_factory=lambda: ["full", "lora"], choices=METHODS,
                                 help="full, lora, and LoRA variants: dora, pissa (PiSSA init), olora (OLoRA init)")
    ranks: list[int] | None = setting(None, ge=1, help="LoRA ranks; default [8], or none with a lora.r grid")
    seeds: list[int] = setting(default_factory=lambda: [0], ge=0)
    zero_shot: bool = False
    few_shot: int = setting(0, ge=0, help="k of the k-shot baseline; 0: none")
    baseline_formats: list[str] | None = setting(None, choices=BASELINE_FORMATS,
                                                 help="prompt formats of the baselines; default: plain, and chat "
                                                 "for a model whose tokenizer has a chat template")
    grid: dict[str, dict[str, list[Any]] | list[dict[str, list[Any]]]] = setting(
        default_factory=dict, choices=METHODS,
        help="per method: {dotted key: [values]} (every combination), or a list of such mappings (the union)")
    select: SelectSection = field(default_factory=SelectSection)
    base: dict[str, Any] = setting(default_factory=dict, help="the train config every run shares")
    method_overrides: dict[str, dict[str, Any]] = setting(default_factory=dict, choices=METHODS)
    extra_eval: list[ExtraEval] = field(default_factory=list)
    slices: dict[str, SliceSpec] = field(default_factory=dict)


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
    select_examples: int
    baseline_formats: dict[str, list[str]]  # model -> the prompt formats its baselines are asked in
    formats_declared: bool  # baseline_formats written in the file (else chat is dropped for a model without one)
    base: dict[str, Any]
    method_overrides: dict[str, dict[str, Any]]
    eval: EvalSection
    extra_eval: list[ExtraEval] = field(default_factory=list)
    slices: dict[str, SliceSpec] = field(default_factory=dict)

    def cells(self) -> list[tuple[str, str, int | None]]:
        return [(model, method, rank) for model in self.models for method in self.methods
                for rank in (self.ranks if trains_lora(method) else [None])]

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
        """The untrained models, zero-shot and k-shot, in every prompt format of `baseline_formats`."""
        kinds = ([("zero-shot", 0)] if self.zero_shot else []) + ([("k-shot", self.few_shot)] if self.few_shot else [])
        return [Run(m, method, shots=shots, prompt_format=fmt) for m in self.models for method, shots in kinds
                for fmt in self.baseline_formats[m]]

    @property
    def selects_on_answers(self) -> bool:
        return self.select_metric != "val_loss"

    def train_config(self, run: Run, run_dir: Path) -> dict[str, Any]:
        """`base`, then the method's overrides, then the grid point, then what the run fixes."""
        cfg = _merge(self.base, self.method_overrides.get("lora", {}) if run.method in LORA_VARIANTS else {})
        cfg = _merge(cfg, self.method_overrides.get(run.method, {}))
        if run.method in LORA_VARIANTS:
            cfg = _merge(cfg, {"lora": LORA_VARIANTS[run.method]})
        for key, value in point_dict(run.point).items():
            *sections, leaf = key.split(".")
            node = cfg
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = value
        cfg.update(model=run.model, method="lora" if trains_lora(run.method) else run.method, out=str(run_dir))
        cfg.setdefault("train", {})["seed"] = run.seed
        cfg["train"].setdefault("run_group", self.name)  # experiment trackers group the sweep's runs
        if trains_lora(run.method) and run.rank is not None:
            cfg.setdefault("lora", {})["r"] = run.rank
        if self.selects_on_answers:  # every evaluation answers the validation questions; the result is the best
            cfg["train"].setdefault("eval_generate", self.select_examples)  # checkpoint by the same metric
            cfg["train"].setdefault("early_stop_metric", self.select_metric)
        return cfg


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every run's train config is validated (by `run.py`) before anything runs."""
    p = Path(path)
    try:
        raw = build(SweepFile, read_yaml_mapping(p, "sweep", "sweep keys"))
        build(GenerationConfig, raw.eval.generation, "eval.generation.")  # a bad decoding option fails now
        sweep = _sweep(p, raw)
    except ConfigError as e:
        raise ConfigError(e.args[0] if e.args[0].startswith(str(p)) else f"{p}: {e}") from None
    for run in sweep.every_trainable() + sweep.baselines():  # run names become directory and file names
        if Path(run.name).name != run.name or run.name in ("", ".", ".."):
            raise ConfigError(f"{p}: run name {run.name!r} (from its model, method and grid values) is not a plain "
                              "file name; use grid values without path separators")
    return sweep


def _sweep(path: Path, raw: SweepFile) -> Sweep:
    """The rules that tie keys together, and the grid expanded."""
    for key in ("models", "methods", "seeds"):
        if not getattr(raw, key):
            raise ConfigError(f"`{key}` must list at least one value")
    inherited = {method: raw.grid.get("lora") for method in LORA_VARIANTS}  # a variant takes LoRA's grid
    grid = {method: _grid_points(method, raw.grid.get(method, inherited.get(method))) for method in raw.methods}
    uses_rank_grid = any(key == "lora.r" for method in grid if trains_lora(method) for point in grid[method]
                         for key, _ in point)
    if uses_rank_grid and raw.ranks is not None:
        raise ConfigError("give LoRA ranks either as `ranks` or in `grid.lora` (lora.r), not both")
    ranks = raw.ranks if raw.ranks is not None else [None] if uses_rank_grid else [8]
    if not ranks:
        raise ConfigError("`ranks` must list at least one value")
    names = [spec.name for spec in raw.extra_eval]
    for i, name in enumerate(names):
        if not name.replace("_", "").replace("-", "").isalnum() or name in names[:i]:
            raise ConfigError(f"extra_eval[{i}].name {name!r} must be a unique identifier")
    if VALIDATION in names:
        raise ConfigError(f"extra_eval name {VALIDATION!r} is reserved for the baselines' validation scores")
    _check_slices(raw.slices)
    formats = raw.baseline_formats or list(BASELINE_FORMATS)
    return Sweep(path, raw.name or path.stem, raw.description, raw.models, raw.methods, ranks, raw.seeds,
                 raw.zero_shot, raw.few_shot, grid, raw.select.metric or _default_metric(raw),
                 raw.select.examples, {model: list(formats) for model in raw.models},
                 raw.baseline_formats is not None, raw.base,
                 raw.method_overrides, raw.eval, raw.extra_eval, raw.slices)


def _default_metric(raw: SweepFile) -> str:
    """F1 of the validation answers for a QA test set, the validation loss otherwise."""
    data = raw.eval.data
    if data.startswith("slice:") and data[len("slice:"):] in raw.slices:
        data = raw.slices[data[len("slice:"):]].source
    return "f1" if resolve_task(raw.eval.task, raw.eval.format, data) == "qa" else "val_loss"


def _check_slices(slices: dict[str, SliceSpec]) -> None:
    """Slice names are identifiers (each becomes `data/NAME<suffix>` inside --out), sources existing files."""
    for name, spec in slices.items():
        if not _IDENTIFIER.fullmatch(name) or ".." in name:
            raise ConfigError(f"slice name {name!r} must be an identifier (letters, digits, '_', '-', '.'; "
                              "no path separators, no '..')")
        if not Path(resolve_data(spec.source)).is_file():
            raise ConfigError(f"slices.{name}.source: file not found: {spec.source}")


def confined(root: Path, *parts: str) -> Path:
    """`root/parts...`, refused unless it lies inside `root`: every path a sweep writes goes through here or
    under a directory that did."""
    path = root.joinpath(*parts)
    inside = path.resolve().is_relative_to(root.resolve())
    if not inside or any(Path(part).is_absolute() or ".." in Path(part).parts for part in parts):
        raise ConfigError(f"{path} is outside the output directory {root}: sweep names must be plain identifiers")
    return path


def _grid_points(method: str, spec: dict[str, list[Any]] | list[dict[str, list[Any]]] | None) -> list[Point]:
    """`{train.lr: [1e-4, 3e-4], lora.alpha: [16, 32]}` -> every combination, in key order; a list of such
    mappings -> the union of their combinations, in order, each point once (a study that varies one thing at a
    time around a centre, instead of every combination)."""
    if spec is None:
        return [()]
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"grid.{method} is an empty list")
        points = [point for part in spec for point in _grid_points(method, part)]
        return list(dict.fromkeys(points))
    if not spec or not all(spec.values()):
        raise ConfigError(f"grid.{method} must map dotted config keys to non-empty lists of values")
    keys = list(spec)
    return [tuple(zip(keys, values)) for values in itertools.product(*(map(_frozen, spec[k]) for k in keys))]


def _frozen(value: Any) -> Any:
    """A list value (lora.targets) as a tuple, so that points and runs can be compared and hashed."""
    return tuple(value) if isinstance(value, list) else value


def point_dict(point: Point) -> dict[str, Any]:
    """A point as the config mapping it stands for (tuples back to the lists they were written as)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in point}


def slice_paths(sweep: Sweep, data_dir: Path) -> dict[str, str]:
    """`slice:NAME` -> the file `write_slices` writes it to (`data/NAME<suffix>`, checked to lie inside
    `data_dir`); nothing is written."""
    return {f"slice:{name}": str(confined(data_dir, f"{name}{Path(resolve_data(spec.source)).suffix}"))
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


def slice_text(spec: SliceSpec) -> str:
    """What a slice's file holds: lines [start, stop) of its source, as they are now."""
    source = Path(resolve_data(spec.source))
    return "".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[spec.start or 0:spec.stop])


def substitute(node: Any, paths: dict[str, str]) -> Any:
    """`slice:NAME` strings anywhere in a config or sweep section replaced by the slice's file."""
    if dataclasses.is_dataclass(node):
        return dataclasses.replace(node, **{f.name: substitute(getattr(node, f.name), paths)
                                            for f in dataclasses.fields(node)})
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
