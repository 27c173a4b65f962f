"""YAML read for configs and sweeps: a syntax error is one line, `file:line:column: problem`.

What a few hundred bytes of YAML could otherwise make of a reader is refused before it is built: aliases
(`*name`, the "billion laughs": nine lines that expand to a billion strings for whatever walks the result) and
nesting deeper than `MAX_DEPTH` (Python's recursion limit). A NUL character in any value is refused with the
key that holds it: no path or name may contain one, and the operating system would refuse it later with a
traceback instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from qatune.errors import ConfigError

MAX_DEPTH = 64  # nested mappings/lists: a config needs 3


class _Refused(Exception):
    """Raised inside the loader; `parse_yaml` turns it into a located `ConfigError`."""

    def __init__(self, mark: yaml.Mark | None, problem: str):
        super().__init__(problem)
        self.mark, self.problem = mark, problem


class _QatuneLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases and deep nesting while composing, before any value is built."""

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(event.start_mark, f"alias *{event.anchor} refused: YAML anchors and aliases have no use "
                                             "in qatune files (write the value out)")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(self.peek_event().start_mark, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        """An integer too long for Python to convert (over 4300 digits) is refused at its position."""
        try:
            return super().construct_yaml_int(node)
        except ValueError as e:
            raise _Refused(node.start_mark, f"integer refused: {e}") from None


_QatuneLoader.add_constructor("tag:yaml.org,2002:int", _QatuneLoader.construct_yaml_int)


def _where(source: str, mark: yaml.Mark | None) -> str:
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source


def _nul_key(value: Any, key: str = "") -> str | None:
    """The dotted key of the first string (key or value) holding a NUL character, or None."""
    if isinstance(value, str):
        return key if "\0" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        name = f"{key}.{k}" if key else str(k)
        if isinstance(k, str) and "\0" in k:
            return name
        found = _nul_key(v, name)
        if found is not None:
            return found
    return None


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load(text)` without aliases; a syntax error becomes a `ConfigError` located at
    `source:line:column`."""
    try:
        value = yaml.load(text, Loader=_QatuneLoader)  # a SafeLoader subclass: safe
    except _Refused as e:
        raise ConfigError(f"{_where(source, e.mark)}: {e.problem}") from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        raise ConfigError(f"{_where(source, getattr(e, 'problem_mark', None))}: invalid YAML: {problem}"
                          + (f" ({context})" if context else "")) from None
    key = _nul_key(value)
    if key is not None:
        raise ConfigError(f"{source}: {key or 'the value'} holds a NUL character (\\0), which no path or name may "
                          "contain")
    return value


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
