"""YAML read for configs and sweeps: a syntax error is one line, `file:line:column: problem`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from qatune.errors import ConfigError


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load(text)`; a syntax error becomes a `ConfigError` located at `source:line:column`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        raise ConfigError(f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")) from None


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file's content; unreadable, non-UTF-8 or malformed files are one-line `ConfigError`s."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not valid UTF-8 (byte 0x{e.object[e.start]:02x})") from None
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror or e}") from None
    return parse_yaml(text, str(p))


def read_yaml_mapping(path: str | os.PathLike, kind: str, contents: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a config, a sweep): missing file, bad YAML and any other top level
    are one-line `ConfigError`s naming the file. `kind` names the file, `contents` what its keys are."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{kind} file not found: {p}")
    raw = read_yaml(p) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of {contents}")
    return raw
