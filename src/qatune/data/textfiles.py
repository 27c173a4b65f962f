"""The text of a user's data file, read so that every problem is a one-line `DataError` naming the file (and line).

- Only regular files are read: a directory, a device (`/dev/zero`) or a pipe is refused before it is opened, so a
  reader never waits on a pipe or reads without end.
- Text is UTF-8; a leading byte order mark (Excel and Notepad write one) is dropped.
- JSON is read strictly: an object with the same key twice is an error naming the key and the line (Python's
  `json` keeps the last value silently); nesting too deep for the parser and integers too long to convert are
  errors, not tracebacks. A number with a fraction or exponent keeps the text it was written as, so that an
  answer written `1.50` reads as "1.50", not "1.5". `NaN` and `Infinity` (which Python's `json` accepts but
  JSON does not have) are left for the caller to refuse where a value is used. A `\\uD800` escape that is not
  half of a surrogate pair is an error: it decodes to no character, and no tokenizer can encode it.
"""

from __future__ import annotations

import contextlib
import json
import json.decoder
import json.scanner
import re
import sys
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any

from qatune.errors import DataError

UTF8_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_data_file(path: str | PathLike) -> None:
    """A `DataError` unless `path` is a regular file (or a link to one)."""
    p = Path(path)
    if p.is_file():
        return
    if p.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    if p.exists():
        raise DataError(f"{path}: not a regular file (a device, pipe or socket); pass a data file")
    raise DataError(f"data file not found: {path}")


def read_bytes(path: str | PathLike) -> bytes:
    """A data file's bytes without a leading UTF-8 byte order mark."""
    check_data_file(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    return data.removeprefix(UTF8_BOM)


def read_utf8(path: str | PathLike) -> str:
    """A whole data file as text; not UTF-8 is a `DataError` naming the line."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid encoding: not UTF-8 (byte 0x{data[e.start]:02x})") from None


def utf8_lines(path: str | PathLike) -> Iterator[tuple[str, str | DataError]]:
    """("path:N", text) for every non-blank line of a data file, read one line at a time; a line that is not UTF-8
    comes as the `DataError` naming it (so that `skip_invalid` can skip it like any other bad record)."""
    check_data_file(path)
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                source = f"{path}:{number}"
                if number == 1:
                    raw = raw.removeprefix(UTF8_BOM)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield source, DataError(f"{source}: invalid encoding: not UTF-8 "
                                            f"(byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                    continue
                if line.strip():
                    yield source, line
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


# ------------------------------------------------------------------------------------------------ JSON


class JSONProblem(ValueError):
    """Why a text is not acceptable JSON; `position` is the character offset where it is, when known."""

    def __init__(self, reason: str, position: int | None = None, *, extra_data: bool = False):
        super().__init__(reason)
        self.reason, self.position, self.extra_data = reason, position, extra_data

    def line(self, text: str) -> int | None:
        return None if self.position is None else text.count("\n", 0, self.position) + 1


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class _JSONFloat(float):
    """A JSON number with a fraction or exponent that prints as it was written ("1.50" stays "1.50")."""

    def __new__(cls, literal: str) -> _JSONFloat:
        number = super().__new__(cls, literal)
        number.literal = literal
        return number

    def __str__(self) -> str:
        return self.literal

    __repr__ = __str__


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


def _decoder() -> json.JSONDecoder:
    return json.JSONDecoder(object_pairs_hook=_unique_keys, parse_float=_JSONFloat)


_DECODER = _decoder()


def decode_json(text: str) -> Any:
    """`text` as one JSON value (see the module doc); a `JSONProblem` when it is not acceptable."""
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise JSONProblem(str(e), e.pos, extra_data=e.msg == "Extra data") from None
    except _DuplicateKey as e:
        raise JSONProblem(f"duplicate key {e.key!r} in an object", _duplicate_position(text)) from None
    except RecursionError:
        raise JSONProblem("nested too deeply for the parser") from None
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise JSONProblem(f"an integer with more than {sys.get_int_max_str_digits()} digits") from None
    if _SURROGATE_ESCAPE.search(text) and _holds_lone_surrogate(value):
        raise JSONProblem("a \\uD800-\\uDFFF escape that is not half of a surrogate pair is not a character")
    return value


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether a decoded value holds a string with a lone surrogate (no tokenizer can encode it). A proper pair
    (\\ud83d\\ude00, as `json.dumps` writes an emoji) is decoded into one character and passes."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_json_line(line: str, source: str) -> Any:
    """One line of a JSON Lines file; a `DataError` naming `source` ("path:N") otherwise."""
    try:
        return decode_json(line)
    except JSONProblem as e:
        raise DataError(f"{source}: invalid JSON: {e.reason}") from None


def _duplicate_position(text: str) -> int | None:
    """Where the object holding a duplicate key starts. Python's fast (C) scanner cannot tell, so the text is
    decoded again -- only after a duplicate was found -- by the pure-Python scanner, whose object parser is given
    its start offset."""
    decoder = _decoder()
    starts: list[int] = []

    def parse_object(s_and_end: tuple[str, int], *args: Any) -> Any:
        try:
            return json.decoder.JSONObject(s_and_end, *args)
        except _DuplicateKey:
            starts.append(s_and_end[1])  # the innermost object raises first
            raise

    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    with contextlib.suppress(ValueError, RecursionError):  # the duplicate is what it raises; anything else: no line
        decoder.decode(text)
    return starts[0] if starts else None
