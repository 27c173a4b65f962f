"""Run configuration: YAML file + `key=value` overrides with dotted keys, validated into dataclasses.

Every key a user may set is a dataclass field below, declared with `setting` (utils/settings.py): its type,
default, range or choices, whether a resume may change it, in one place. Unknown keys, wrong types, non-finite
floats and values out of range are errors that name the key (with a suggestion for typos).
Method-dependent defaults follow the reference recipe: LoRA 25 epochs, batch 8, lr 5e-4; full fine-tuning
40 epochs, batch 16, lr 5e-5; both AdamW with weight decay 0.01.
"""

from __future__ import annotations

import copy
import dataclasses
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
from qatune.utils.settings import build, check_fields, default_of, rule_of, setting, walk
from qatune.utils.yamlfile import parse_yaml, read_yaml_mapping

METHODS = ("lora", "full")
BACKENDS = ("native", "hf")
# The reference recipe's method-dependent defaults: (epochs, batch size, learning rate).
RECIPE_DEFAULTS = {"lora": (25, 8, 5e-4), "full": (40, 16, 5e-5)}


S = setting  # short, so that each key's declaration fits its line


@dataclass
class DataSection:
    train: str | None = S(None, help='file, directory of files, `hf:NAME`, or "sample" (the QA facts shipped with '
                          'qatune); required')
    val: str | None = S(None, help="validation file; default: `val_fraction` of train, split with `seed`")
    val_fraction: float = S(0.1, ge=0, lt=1)
    format: str = S("auto", choices=FORMATS)
    question_field: str | None = None
    answer_field: str | None = None
    aliases_field: str | None = None
    squad_unanswerable: str = S("skip", choices=UNANSWERABLE_POLICIES,
                                help='empty: kept, with the answer "unanswerable"')
    skip_invalid: bool = S(False, help="skip (and report) malformed records instead of failing")
    prompt_format: str = S("auto", choices=PROMPT_FORMATS,
                           help="auto: chat when the tokenizer has a chat template")
    template: str = S(DEFAULT_TEMPLATE, help="the plain format's template")
    max_length: int | None = S(None, ge=1, help="tokens per row; default 512, or the model's position limit when "
                               "lower")
    answer_only: bool = S(True, help="loss on answer tokens only")
    max_examples: int | None = S(None, ge=1, help="cap on training examples (quick runs), applied after the split")


@dataclass
class TrainSection:
    epochs: int | None = S(None, ge=1, resumable=True, help="default by method (LoRA 25, full 40)")
    max_steps: int | None = S(None, ge=1, resumable=True, help="optimizer steps; stops earlier than epochs when set")
    batch_size: int | None = S(None, ge=1, help="per device micro-batch; default by method (LoRA 8, full 16)")
    grad_accum: int = S(1, ge=1)
    lr: float | None = S(None, gt=0, resumable=True, help="default by method (LoRA 5e-4, full 5e-5)")
    weight_decay: float = S(0.01, ge=0, help="applied to matrices only, never to biases, norms or LoRA's B init")
    loraplus_ratio: float | None = S(None, gt=0, help="LoRA+: LoRA B (and trained biases) learn at ratio x lr, as "
                                     "peft's create_loraplus_optimizer (its paper suggests 16)")
    warmup_steps: int = S(0, ge=0, resumable=True)
    schedule: str = S("cosine", choices=SCHEDULES, resumable=True,
                      help="after warm-up, decays to min_lr_ratio * lr")
    min_lr_ratio: float = S(0.0, ge=0, le=1, resumable=True)
    grad_clip: float | None = S(1.0, gt=0, help="max gradient norm; null: no clipping")
    label_smoothing: float = S(0.0, ge=0, lt=1, help="the LoRA paper's E2E setting uses 0.1")
    precision: str = S("fp32", choices=PRECISIONS, help="autocast; fp16 uses a gradient scaler")
    base_dtype: str | None = S(None, choices=DTYPE_NAMES,
                               help="LoRA: keep the frozen base in bf16/fp16 (LoRA weights stay fp32)")
    seed: int = S(0, ge=0)
    device: str = S("auto", resumable=True, help="auto | cuda | mps | cpu")
    eval_every: int | None = S(None, ge=1, resumable=True,
                               help="optimizer steps between evaluations (and at each epoch end)")
    save_every: int | None = S(None, ge=1, resumable=True,
                               help="optimizer steps between checkpoints (and at each epoch end)")
    keep_checkpoints: int = S(2, ge=1, resumable=True, help="step checkpoints kept besides `best`")
    patience: int | None = S(None, ge=1, resumable=True,
                             help="early stopping: evaluations without improvement before stopping")
    min_delta: float = S(0.0, ge=0, resumable=True)
    early_stop_metric: str = S("val_loss", choices=EARLY_STOP_METRICS,
                               help="generation metrics need eval_generate")
    eval_generate: int = S(0, ge=0, resumable=True,
                           help="examples of the validation set to answer by generation at each evaluation")
    packing: bool = False
    fsdp: bool = S(False, help="with torchrun, full fine-tuning: shard weights/grads/optimizer state (models that "
                   "do not fit)")
    fast_path: bool = S(True, resumable=True,
                        help="native: chunked LM-head loss, CPU-fast dropout/attention (models/fast_ops.py)")
    compile: bool = S(False, resumable=True)
    gradient_checkpointing: bool = S(False, resumable=True)
    log_every: int = S(1, ge=1, resumable=True)
    tensorboard: bool = S(False, resumable=True, help="the same as report_to including tensorboard")
    report_to: list[str] = S(default_factory=list, resumable=True,
                             help="experiment trackers: tensorboard, mlflow, wandb")
    run_group: str | None = S(None, resumable=True,
                              help="trackers' experiment / group (`qatune compare` sets the sweep's name)")
    progress: bool = S(True, resumable=True)


@dataclass
class RunConfig:
    model: str = "smollm2-135m"
    tokenizer: str | None = S(None, help="default: the model's own")
    method: str = S("lora", choices=METHODS)
    backend: str = S("native", choices=BACKENDS, help="hf: transformers + peft")
    out: str = "runs/run"
    resume: bool = S(False, help="continue the run in `out` from its newest intact checkpoint")
    overwrite: bool = S(False, help="start afresh in an `out` that holds a run, replacing it")
    data: DataSection = field(default_factory=DataSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def resolved(self) -> RunConfig:
        """A copy with the method-dependent defaults filled in (the reference recipe) and every value checked;
        this config is not modified."""
        cfg = copy.deepcopy(self)
        check_fields(cfg)  # a valid method before its defaults are looked up
        t = cfg.train
        epochs, batch_size, lr = RECIPE_DEFAULTS[cfg.method]
        t.epochs = t.epochs if t.epochs is not None else epochs
        t.batch_size = t.batch_size if t.batch_size is not None else batch_size
        t.lr = t.lr if t.lr is not None else lr
        cfg.check()
        return cfg

    def check(self) -> None:
        """Every key against its declaration (type, range, choices), then the rules that tie keys together."""
        check_fields(self)
        t = self.train
        report_targets(t.report_to, t.tensorboard)  # names a tracker that does not exist: ConfigError
        if t.early_stop_metric != "val_loss" and t.eval_generate < 1:
            raise ConfigError(f"train.early_stop_metric={t.early_stop_metric} needs train.eval_generate > 0")
        if t.fsdp and (self.method != "full" or self.backend != "native"):
            raise ConfigError("train.fsdp=true is for method=full with backend=native (LoRA's base is frozen: "
                              "use DDP)")
        if t.loraplus_ratio is not None and self.method != "lora":
            raise ConfigError("train.loraplus_ratio is for method=lora (it sets LoRA B's learning rate)")
        if self.method == "lora" and self.lora.init != "default" and self.backend != "native":
            raise ConfigError(f"lora.init={self.lora.init} needs backend=native (backend=hf would need peft's "
                              "initial-adapter conversion, which qatune does not run)")
        if self.data.train is None:
            raise ConfigError("data.train is required (a file, `hf:NAME`, or `sample` for the built-in QA facts)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    try:
        return build(RunConfig, raw)
    except ConfigError as e:
        # A bad value names its key; one that came from the file names the file too (an override names itself).
        if path is None or any(item.partition("=")[0].strip() in str(e) for item in overrides):
            raise
        raise ConfigError(f"{path}: {e}") from None


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """A config from the mapping a YAML file would hold (checked like one; e.g. a sweep's runs, before anything
    is written)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a mapping of keys to values, got {type(raw).__name__}")
    return build(RunConfig, raw)


def save_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe_keys() -> str:
    """Every config key with its default, range or choices, and what it is for, one per line (for `qatune train
    --help`)."""
    lines = []
    for key, f, _ in walk(RunConfig):
        rule = rule_of(f)
        notes = "; ".join(n for n in (rule.describe(), rule.help, "resumable" if rule.resumable else "") if n)
        lines.append(f"  {key} = {default_of(f)!r}" + (f"  ({notes})" if notes else ""))
    return "\n".join(lines)


def resumable_keys() -> set[str]:
    """The dotted keys that a resumed run may change (declared `resumable=True`); every other difference from
    the checkpoint's config is refused."""
    return {key for key, f, _ in walk(RunConfig) if rule_of(f).resumable}
