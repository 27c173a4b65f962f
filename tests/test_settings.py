"""Declared settings: every config key's type and range is declared once and enforced by one loader, for run
configs, LoRA's hyper-parameters and sweep files; errors name the dotted key."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import pytest
import yaml

from qatune.compare.sweep import EvalSection, ExtraEval, SelectSection, SliceSpec, SweepFile, load_sweep
from qatune.errors import ConfigError
from qatune.lora.layer import LoRAConfig
from qatune.training.config import RunConfig, describe_keys, load_config, resumable_keys
from qatune.utils.settings import build, rule_of, setting, walk

# The values (accepted before, or crashing later), then the rest of the declared ranges.
BAD_VALUES = [
    ("train.min_lr_ratio", "-1", "in [0, 1]"),
    ("train.label_smoothing", "2", "in [0, 1)"),
    ("train.warmup_steps", "-3", ">= 0"),
    ("train.max_steps", "0", ">= 1"),
    ("train.lr", ".nan", "finite"),
    ("train.lr", "nan", "finite"),
    ("train.lr", ".inf", "finite"),
    ("train.lr", "0", "> 0"),
    ("train.weight_decay", "-0.1", ">= 0"),
    ("train.weight_decay", "-.inf", "finite"),
    ("train.grad_clip", "0", "> 0"),
    ("train.min_lr_ratio", "1.5", "in [0, 1]"),
    ("train.label_smoothing", "1", "in [0, 1)"),
    ("train.epochs", "0", ">= 1"),
    ("train.batch_size", "0", ">= 1"),
    ("train.grad_accum", "0", ">= 1"),
    ("train.log_every", "0", ">= 1"),
    ("train.eval_every", "0", ">= 1"),
    ("train.save_every", "-1", ">= 1"),
    ("train.keep_checkpoints", "0", ">= 1"),
    ("train.patience", "0", ">= 1"),
    ("train.min_delta", "-0.01", ">= 0"),
    ("train.eval_generate", "-1", ">= 0"),
    ("train.seed", "-1", ">= 0"),
    ("train.schedule", "cosinus", "one of cosine, linear, constant"),
    ("train.precision", "fp8", "one of fp32, bf16, fp16"),
    ("train.base_dtype", "int8", "one of fp32, bf16, fp16"),
    ("train.early_stop_metric", "acc", "one of val_loss, em, f1, contains, bleu"),
    ("data.val_fraction", "1", "in [0, 1)"),
    ("data.val_fraction", "-0.1", "in [0, 1)"),
    ("data.max_length", "0", ">= 1"),
    ("data.max_examples", "0", ">= 1"),
    ("data.format", "xml", "one of auto"),
    ("data.prompt_format", "markdown", "one of auto, plain, chat"),
    ("data.squad_unanswerable", "drop", "one of skip, empty, error"),
    ("lora.r", "0", ">= 1"),
    ("lora.alpha", "0", "> 0"),
    ("lora.alpha", ".nan", "finite"),
    ("lora.dropout", "1", "in [0, 1)"),
    ("lora.dropout", "-0.1", "in [0, 1)"),
    ("lora.bias", "some", "one of none, all, lora_only"),
    ("method", "qlora", "one of lora, full"),
    ("backend", "jax", "one of native, hf"),
]


@pytest.mark.parametrize("key,value,expected", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_each_bad_value_is_a_config_error_naming_its_key(key, value, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train=x.jsonl", f"{key}={value}"]).resolved()
    message = str(err.value)
    assert message.startswith(f"{key} must be ") and expected in message, message


@pytest.mark.parametrize("override", [
    "train.min_lr_ratio=1", "train.min_lr_ratio=0", "train.label_smoothing=0", "train.warmup_steps=0",
    "train.grad_clip=null", "train.grad_clip=", "data.val_fraction=0", "train.eval_generate=0", "lora.dropout=0",
    "train.seed=0", "train.lr=1e-3", "train.base_dtype=bf16", "train.max_steps=1"])
def test_the_bounds_themselves_are_accepted(override):
    load_config(None, ["data.train=x.jsonl", override]).resolved()


def test_a_value_set_after_loading_is_checked_by_resolved():
    cfg = load_config(None, ["data.train=x.jsonl"])
    cfg.train.warmup_steps = -3
    with pytest.raises(ConfigError, match=r"train.warmup_steps must be >= 0, got -3"):
        cfg.resolved()
    cfg.train.warmup_steps, cfg.train.lr = 0, float("inf")
    with pytest.raises(ConfigError, match="train.lr must be a finite number"):
        cfg.resolved()


def _sections() -> list[type]:
    """Every dataclass a config or sweep file is read into."""
    found, todo = [], [RunConfig, SweepFile]
    while todo:
        cls = todo.pop()
        found.append(cls)
        for kind in typing.get_type_hints(cls).values():
            for inner in (kind, *typing.get_args(kind)):
                if dataclasses.is_dataclass(inner) and inner not in found + todo:
                    todo.append(inner)
    return found


def _numeric(kind) -> bool:
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, type(int | None)) else (kind,)
    scalars = [typing.get_args(o)[0] if typing.get_origin(o) is list else o for o in options]
    return any(o in (int, float) for o in scalars)


def test_every_numeric_key_declares_its_range():
    sections = _sections()
    assert {LoRAConfig, EvalSection, ExtraEval, SliceSpec, SelectSection} <= set(sections)
    numeric = [(cls.__name__, key) for cls in sections for key, f, kind in walk(cls) if _numeric(kind)]
    assert len(numeric) > 30  # the walk sees the keys
    unbounded = [(cls.__name__, key) for cls in sections for key, f, kind in walk(cls)
                 if _numeric(kind) and not rule_of(f).bounded]
    assert not unbounded, f"numeric keys without a declared range (setting(ge=/gt=/le=/lt=)): {unbounded}"


def test_the_range_check_catches_a_key_declared_without_a_range():
    @dataclass
    class Section:
        steps: int = setting(3)
        ratio: float | None = setting(None, ge=0, le=1)

    assert [key for key, f, kind in walk(Section) if _numeric(kind) and not rule_of(f).bounded] == ["steps"]


def test_resumable_keys_are_declared_on_the_fields():
    expected = {  # the separate string set that the declared `resumable=True` fields replaced
        "train.max_steps", "train.epochs", "train.eval_every", "train.save_every", "train.patience",
        "train.min_delta", "train.keep_checkpoints", "train.lr", "train.schedule", "train.warmup_steps",
        "train.min_lr_ratio", "train.eval_generate", "train.log_every", "train.progress", "train.tensorboard",
        "train.report_to", "train.run_group", "train.device", "train.compile", "train.fast_path",
        "train.gradient_checkpointing",
    }
    assert resumable_keys() == expected


def test_help_lists_each_keys_range_or_choices():
    lines = {line.split(" = ")[0].strip(): line for line in describe_keys().splitlines()}
    assert "(in [0, 1];" in lines["train.min_lr_ratio"] and "resumable" in lines["train.min_lr_ratio"]
    assert "(> 0;" in lines["train.lr"] and "(>= 1;" in lines["lora.r"]
    assert "one of cosine, linear, constant" in lines["train.schedule"]
    assert "resumable" not in lines["train.batch_size"]
    assert set(lines) == {key for key, _, _ in walk(RunConfig)}


@dataclass
class Inner:
    steps: list[int] = setting(default_factory=list, ge=1)


@dataclass
class Outer:
    name: str = setting(help="required")
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_the_loader_names_the_key_of_a_typo_a_wrong_type_or_a_list_item():
    assert build(Outer, {"name": "a", "inner": {"steps": [1, 2]}}) == Outer("a", Inner([1, 2]))
    for raw, message in [
        ({"name": "a", "inner": {"step": [1]}}, "unknown config key inner.step (did you mean inner.steps?)"),
        ({"name": "a", "inner": {"steps": [1, "two"]}}, "inner.steps[1] must be int, got 'two'"),
        ({"name": "a", "inner": {"steps": [1, 0]}}, "inner.steps must be >= 1, got 0"),
        ({"name": "a", "inner": {"steps": 3}}, "inner.steps must be a list of int, got 3"),
        ({"name": "a", "inner": [1]}, "inner must be a section (mapping), got [1]"),
        ({"inner": {}}, "name is required"),
        ({"name": None}, "name may not be empty"),
    ]:
        with pytest.raises(ConfigError) as err:
            build(Outer, raw)
        assert str(err.value) == message


def test_lora_config_built_in_code_is_checked_and_normalised():
    config = LoRAConfig(alpha=32, targets="c_attn")
    assert config.alpha == 32.0 and isinstance(config.alpha, float) and config.targets == ["c_attn"]
    with pytest.raises(ConfigError, match="lora.alpha must be a finite number"):
        LoRAConfig(alpha=float("nan"))
    with pytest.raises(ConfigError, match="lora.dropout must be float, got 'high'"):
        LoRAConfig(dropout="high")


def _write_sweep(tmp_path, **changes):
    sweep = {"models": ["gpt2"], "methods": ["lora"], "eval": {"data": "sample-test"}}
    for key, value in changes.items():
        node = sweep
        *sections, leaf = key.split("__")
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize("changes,message", [
    ({"few_shot": "three"}, "few_shot must be int, got 'three'"),
    ({"few_shot": -1}, "few_shot must be >= 0, got -1"),
    ({"seeds": [0, 1.5]}, "seeds[1] must be int, got 1.5"),
    ({"ranks": [4, 0]}, "ranks must be >= 1, got 0"),
    ({"eval__max_examples": 0}, "eval.max_examples must be >= 1, got 0"),
    ({"eval__batch_size": "big"}, "eval.batch_size must be int, got 'big'"),
    ({"eval__task": "summarise"}, "eval.task must be one of auto, qa, nlg; got 'summarise'"),
    ({"eval__generation": {"max_new_token": 3}},
     "unknown config key eval.generation.max_new_token (did you mean eval.generation.max_new_tokens?)"),
    ({"eval__generation": {"max_new_tokens": "many"}}, "eval.generation.max_new_tokens must be int, got 'many'"),
    ({"extra_eval": [{"name": "mc", "data": "x", "task": "mc"}, {"name": "u", "data": "y", "task": "cloze"}]},
     "extra_eval[1].task must be one of qa, nlg, mc; got 'cloze'"),
    ({"extra_eval": [{"name": "mc", "data": "x", "batch_size": 0}]}, "extra_eval[0].batch_size must be >= 1, got 0"),
    ({"extra_eval": [{"name": "mc"}]}, "extra_eval[0].data is required"),
    ({"slices": {"train": {"source": "sample", "stop": -5}}}, "slices.train.stop must be >= 0, got -5"),
    ({"slices": {"train": {"source": "sample", "stops": 5}}},
     "unknown sweep key slices.train.stops (did you mean slices.train.stop?)"),
    ({"select": {"metric": "acc"}}, "select.metric must be one of val_loss, em, f1, contains, bleu; got 'acc'"),
    ({"grid": {"lroa": {"train.lr": [1e-4]}}}, "grid must be one of full, lora, dora, pissa, olora; got 'lroa'"),
    ({"grid": {"lora": {"train.lr": 1e-4}}}, "grid.lora.train.lr must be a list of Any, got 0.0001"),
    ({"eval": {"max_examples": 5}}, "eval.data is required"),
])
def test_a_bad_sweep_value_names_its_key_path(tmp_path, changes, message):
    path = _write_sweep(tmp_path, **changes)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert str(err.value) == f"{path}: {message}"


def test_a_sweep_reads_into_typed_sections(tmp_path):
    path = _write_sweep(tmp_path, eval__max_examples=6, extra_eval=[{"name": "mc", "data": "x.jsonl", "task": "mc"}],
                        grid={"lora": {"train.lr": [1e-4, 3e-4]}}, seeds=[0, 1])
    sweep = load_sweep(path)
    assert sweep.eval == EvalSection(data="sample-test", max_examples=6)
    assert sweep.extra_eval == [ExtraEval(name="mc", data="x.jsonl", task="mc")]
    assert (sweep.ranks, sweep.seeds, sweep.select_metric) == ([8], [0, 1], "f1")  # a QA test set: its answers
    assert sweep.grid == {"lora": [(("train.lr", 1e-4),), (("train.lr", 3e-4),)]}
