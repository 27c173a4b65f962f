"""Declared settings: each config key's type, default, range, choices and resumability, stated once.

A config section is a dataclass whose fields are declared with `setting(...)`; the field's type annotation is
its type, the metadata its rule. One loader (`build`) turns a YAML mapping into such a dataclass and one
checker (`check_fields`) re-checks an instance; both refuse unknown keys (with a did-you-mean), wrong types,
non-finite floats (NaN, inf), values out of range and values outside the choices, and every error names the
dotted key (`train.lr`, `extra_eval[1].task`). Used by the run config, LoRA's hyper-parameters and sweeps.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Collection, Iterator
from dataclasses import MISSING, dataclass
from typing import Any

from qatune.errors import ConfigError

_META = "qatune.setting"


@dataclass(frozen=True)
class Rule:
    """What a value must satisfy besides its type: bounds (for a list, each item's), choices (for a list each
    item, for a mapping each key); `resumable`: a resumed run may change it; `help`: one line for `--help`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: Collection | None = None
    resumable: bool = False
    help: str = ""

    @property
    def bounded(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def describe(self) -> str:
        """`>= 1`, `> 0`, `in [0, 1)`, `one of a, b`, or "" without a rule."""
        if self.choices is not None:
            return f"one of {', '.join(map(str, self.choices))}"
        low, high = self.ge if self.ge is not None else self.gt, self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            return f"in {'[' if self.ge is not None else '('}{low:g}, {high:g}{']' if self.le is not None else ')'}"
        for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)):
            if bound is not None:
                return f"{op} {bound:g}"
        return ""

    def check(self, key: str, value: Any) -> None:
        """`value` is already of the field's type; None (an unset optional key) always passes."""
        items = value if isinstance(value, (list, dict)) else [value]
        for item in items:
            if item is None or isinstance(item, bool):
                continue
            if self.choices is not None and item not in self.choices:
                raise ConfigError(f"{key} must be one of {', '.join(map(str, self.choices))}; got {item!r}")
            if isinstance(item, (int, float)) and self.bounded and not _within(self, item):
                raise ConfigError(f"{key} must be {self.describe()}, got {item!r}")


def _within(rule: Rule, x: float) -> bool:
    return ((rule.ge is None or x >= rule.ge) and (rule.gt is None or x > rule.gt)
            and (rule.le is None or x <= rule.le) and (rule.lt is None or x < rule.lt))


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            choices: Collection | None = None, resumable: bool = False, help: str = "") -> Any:
    """A dataclass field with its rule as metadata; without a default (or factory) the key is required."""
    rule = Rule(ge, gt, le, lt, choices, resumable, help)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_META: rule})


def rule_of(f: dataclasses.Field) -> Rule:
    return f.metadata.get(_META, Rule())


def walk(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every leaf key of a dataclass, nested sections expanded, in order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from walk(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from a YAML mapping, every key checked (errors name `prefix + key`;
    an unknown key is an "unknown {cls.KIND} key", default "config")."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown {getattr(cls, 'KIND', 'config')} key {prefix}{key}{hint}")
        kwargs[key] = check_value(f"{prefix}{key}", value, hints[key], rule_of(fields[key]))
    for name, f in fields.items():
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{prefix}{name} is required")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a class that checks more itself (its __post_init__): name the section
        if not prefix or str(e).startswith(prefix):
            raise
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check (and normalise, e.g. an int given for a float) every field of a dataclass instance in place;
    nested sections too. For `__post_init__` and for values set after loading."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, hints[f.name]):
            check_fields(value, f"{prefix}{f.name}.")
            continue
        object.__setattr__(obj, f.name, check_value(f"{prefix}{f.name}", value, hints[f.name], rule_of(f)))


def check_value(key: str, value: Any, kind: Any, rule: Rule = Rule()) -> Any:
    """`value` as the type `kind` (see `_coerce`), then checked against `rule`."""
    value = _coerce(key, value, kind)
    rule.check(key, value)
    return value


class _Mismatch(Exception):
    """The value's shape is not this union member's (another member may fit)."""


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check `value` against a type; ints are accepted for floats, a comma list for a list of strings. For a
    union the member is chosen by the value's shape; inside a list or mapping the error names the item."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} may not be empty")
    for opt in options:
        try:
            return _coerce_one(key, value, opt)
        except _Mismatch:
            continue
    names = " or ".join(_type_name(o) for o in options if o is not type(None))
    raise ConfigError(f"{key} must be {names}, got {value!r}")


def _coerce_one(key: str, value: Any, opt: Any) -> Any:
    origin, args = typing.get_origin(opt), typing.get_args(opt)
    if opt is Any:
        return value
    if dataclasses.is_dataclass(opt):
        if isinstance(value, opt):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section (mapping), got {value!r}")
        return build(opt, value, f"{key}.")
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if origin is list:
        if isinstance(value, str) and args[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise _Mismatch
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {_coerce(f"{key} key {k!r}", k, args[0]): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    return _scalar(key, value, opt)


def _scalar(key: str, value: Any, opt: Any) -> Any:
    if isinstance(value, (list, dict)):
        raise _Mismatch
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if opt is bool and isinstance(value, bool):
        return value
    if opt is int and number and isinstance(value, int):
        return value
    if opt is float and (number or isinstance(value, str)):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            x = float(value)
        except ValueError:
            raise _Mismatch from None
        if not math.isfinite(x):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return x
    if opt is str and (number or isinstance(value, str)):
        return str(value)
    raise _Mismatch


def _type_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict or dataclasses.is_dataclass(kind):
        return "a mapping"
    if origin is typing.Literal:
        return " or ".join(map(repr, args))
    return getattr(kind, "__name__", str(kind))
