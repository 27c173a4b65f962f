"""Run configuration: YAML file + `key=value` overrides with dotted keys, validated into dataclasses.

Every key a user may set is a dataclass field below, so the valid keys, their types and their defaults are
in one place. Unknown keys and wrong types are errors that name the key (with a suggestion for typos).
Method-dependent defaults follow the reference recipe: LoRA 25 epochs, batch 8, lr 5e-4; full fine-tuning
40 epochs, batch 16, lr 5e-5; both AdamW with weight decay 0.01.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qatune.data.prompts import DEFAULT_TEMPLATE, PROMPT_FORMATS
from qatune.data.readers import FORMATS, UNANSWERABLE_POLICIES
from qatune.errors import ConfigError
from qatune.lora.layer import LoRAConfig
from qatune.models.loading import DTYPE_NAMES
from qatune.training.loggers import report_targets
from qatune.training.optim import PRECISIONS, SCHEDULES
from qatune.training.state import EARLY_STOP_METRICS
from qatune.utils.io import atomic_write_text
from qatune.utils.yamlfile import parse_yaml, read_yaml_mapping

METHODS = ("lora", "full")
BACKENDS = ("native", "hf")
# The reference recipe's method-dependent defaults: (epochs, batch size, learning rate).
RECIPE_DEFAULTS = {"lora": (25, 8, 5e-4), "full": (40, 16, 5e-5)}


@dataclass
class DataSection:
    train: str | None = None  # file, directory of files, `hf:NAME`, or "sample" (the QA facts shipped with qatune)
    val: str | None = None  # validation file; default: `val_fraction` of train, split with `seed`
    val_fraction: float = 0.1
    format: str = "auto"  # auto | jsonl | json | csv | squad | e2e | hf
    question_field: str | None = None
    answer_field: str | None = None
    aliases_field: str | None = None
    squad_unanswerable: str = "skip"  # skip | empty (kept, answer "unanswerable") | error
    skip_invalid: bool = False  # skip (and report) malformed records instead of failing
    prompt_format: str = "auto"  # auto (chat when the tokenizer has a chat template) | plain | chat
    template: str = DEFAULT_TEMPLATE  # the plain format's template
    max_length: int | None = None  # tokens per row; default 512, or the model's position limit when lower
    answer_only: bool = True  # loss on answer tokens only
    max_examples: int | None = None  # cap on training examples (quick runs), applied after the split


@dataclass
class TrainSection:
    epochs: int | None = None  # default by method (LoRA 25, full 40)
    max_steps: int | None = None  # optimizer steps; stops earlier than epochs when set
    batch_size: int | None = None  # per device micro-batch; default by method (LoRA 8, full 16)
    grad_accum: int = 1
    lr: float | None = None  # default by method (LoRA 5e-4, full 5e-5)
    weight_decay: float = 0.01  # applied to matrices only, never to biases, norms or LoRA's B init
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up, decays to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0  # the LoRA paper's E2E setting uses 0.1
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 uses a gradient scaler)
    base_dtype: str | None = None  # LoRA: keep the frozen base in bf16/fp16 (LoRA weights stay fp32)
    seed: int = 0
    device: str = "auto"  # auto | cuda | mps | cpu
    eval_every: int | None = None  # optimizer steps between evaluations (and at each epoch end)
    save_every: int | None = None  # optimizer steps between checkpoints (and at each epoch end)
    keep_checkpoints: int = 2  # step checkpoints kept besides `best`
    patience: int | None = None  # early stopping: evaluations without improvement before stopping
    min_delta: float = 0.0
    early_stop_metric: str = "val_loss"  # val_loss | em | f1 | bleu (generation metrics need eval_generate)
    eval_generate: int = 0  # examples of the validation set to answer by generation at each evaluation
    packing: bool = False
    fsdp: bool = False  # with torchrun, full fine-tuning: shard weights/grads/optimizer state (models that do not fit)
    fast_path: bool = True  # native: chunked LM-head loss, CPU-fast dropout/attention (models/fast_ops.py)
    compile: bool = False
    gradient_checkpointing: bool = False
    log_every: int = 1
    tensorboard: bool = False  # the same as report_to including tensorboard
    report_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, mlflow, wandb
    run_group: str | None = None  # trackers' experiment / group (`qatune compare` sets the sweep's name)
    progress: bool = True


@dataclass
class RunConfig:
    model: str = "smollm2-135m"
    tokenizer: str | None = None  # default: the model's own
    method: str = "lora"  # lora | full
    backend: str = "native"  # native | hf (transformers + peft)
    out: str = "runs/run"
    resume: bool = False  # continue the run in `out` from its newest intact checkpoint
    overwrite: bool = False  # start afresh in an `out` that holds a run, replacing it
    data: DataSection = field(default_factory=DataSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def resolved(self) -> RunConfig:
        """A copy with the method-dependent defaults filled in (the reference recipe) and every value checked;
        this config is not modified."""
        _choice("method", self.method, METHODS)
        cfg = copy.deepcopy(self)
        t = cfg.train
        epochs, batch_size, lr = RECIPE_DEFAULTS[cfg.method]
        t.epochs = t.epochs if t.epochs is not None else epochs
        t.batch_size = t.batch_size if t.batch_size is not None else batch_size
        t.lr = t.lr if t.lr is not None else lr
        cfg.check()
        return cfg

    def check(self) -> None:
        """Value ranges and choices; the allowed values come from the modules that use them."""
        t, d = self.train, self.data
        _choice("method", self.method, METHODS)
        _choice("backend", self.backend, BACKENDS)
        _choice("train.schedule", t.schedule, SCHEDULES)
        _choice("train.precision", t.precision, PRECISIONS)
        _choice("train.early_stop_metric", t.early_stop_metric, EARLY_STOP_METRICS)
        _choice("data.squad_unanswerable", d.squad_unanswerable, UNANSWERABLE_POLICIES)
        _choice("data.format", d.format, FORMATS)
        _choice("data.prompt_format", d.prompt_format, PROMPT_FORMATS)
        if t.base_dtype is not None:
            _choice("train.base_dtype", t.base_dtype, DTYPE_NAMES)
        report_targets(t.report_to, t.tensorboard)  # names a tracker that does not exist: ConfigError
        for key, value in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size),
                           ("train.grad_accum", t.grad_accum), ("data.max_length", d.max_length),
                           ("train.log_every", t.log_every)):
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if t.lr is not None and t.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {t.lr}")
        if not 0 <= d.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
        if t.early_stop_metric != "val_loss" and t.eval_generate < 1:
            raise ConfigError(f"train.early_stop_metric={t.early_stop_metric} needs train.eval_generate > 0")
        if t.fsdp and (self.method != "full" or self.backend != "native"):
            raise ConfigError("train.fsdp=true is for method=full with backend=native (LoRA's base is frozen: "
                              "use DDP)")
        if d.train is None:
            raise ConfigError("data.train is required (a file, `hf:NAME`, or `sample` for the built-in QA facts)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(key: str, value: Any, allowed: tuple | dict) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (optional) and apply `a.b=value` overrides (values parsed as YAML scalars)."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(path, "config", "keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-4)")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = parse_yaml(value, f"override {item!r}") if value.strip() else None
    return _build(RunConfig, raw, prefix="")


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """A config from the mapping a YAML file would hold (checked like one; e.g. a sweep's runs, before anything
    is written)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a mapping of keys to values, got {type(raw).__name__}")
    return _build(RunConfig, raw, prefix="")


def _build(cls: type, raw: dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key} must be a section (mapping), got {value!r}")
            kwargs[key] = _build(kind, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, kind)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a section that checks itself (LoRAConfig): name the section
        if not prefix:
            raise
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check `value` against the field's type; ints are accepted for floats and a comma list for lists."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} may not be empty")
    for opt in options:
        origin = typing.get_origin(opt)
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if opt is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(f"{key} must be {names}, got {value!r}")


def save_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe_keys() -> str:
    """Every config key with its default, one per line (for `qatune train --help`)."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                lines.append(f"  {prefix}{f.name} = {default!r}")

    walk(RunConfig, "")
    return "\n".join(lines)
