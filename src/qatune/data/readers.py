"""Question-answer readers: every supported format becomes a list of `QAExample`.

Readers never drop a record silently: a record is either kept, rejected with a `DataError` that names its
location ("train.jsonl:17: ..."), or -- with `skip_invalid=True`, or SQuAD's unanswerable questions with
`squad_unanswerable="skip"` -- skipped and listed in the `DataReport` with its location and reason.

Supported inputs (`fmt="auto"` picks by extension; files are UTF-8, a leading byte order mark is ignored):
- JSONL (`.jsonl`, `.ndjson`): one record per line.
- JSON (`.json`): a list of records, or SQuAD v1/v2 (`{"data": [{"paragraphs": [...]}]}`), detected by shape.
  JSON is read strictly (`textfiles.py`): a key twice in one object is an error naming the key and line.
- CSV (`.csv`): header row; an `aliases` cell holds several answers separated by `|`. A row with more fields
  than the header, or a quote never closed, is an invalid record naming the line where it starts; a row with
  fewer fields leaves the missing ones empty.
- E2E NLG (`.txt`): `meaning representation||reference` per line.
- Hugging Face datasets: `hf:NAME` (the Hub), a local directory of data files, or a local file with `fmt="hf"`.
  A path that does not exist is an error, never a request to the Hub.
Only regular files are read: a device or a pipe is refused.

Record fields: question from `question`, `prompt` or `qText` (WebQuestions), or extracted from a TriviaQA-style
`context` of the form "Question: ...\\nAnswer:"; answer from `answer`, `completion` or `answers` (a string, a list
of accepted answers, or SQuAD's `{"text": [...]}`); optional `aliases` and `context`. Explicit `*_field` arguments
override the defaults. A value must be text; a number is taken as the text it is written as (an answer 1945 is
"1945"); true/false, NaN, objects and lists where text is expected are errors naming the field. A record with
`messages` is a conversation (`conversations.py`): its final assistant turn is the answer, and the chat prompt
format trains on every assistant turn.
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qatune.data.conversations import last_exchange, parse_messages
from qatune.data.textfiles import (
    JSONProblem,
    check_data_file,
    decode_json,
    parse_json_line,
    read_bytes,
    read_utf8,
    utf8_lines,
)
from qatune.errors import ConfigError, DataError

QUESTION_KEYS = ("question", "prompt", "qText")  # qText: WebQuestions (Berant et al. 2013)
ANSWER_KEYS = ("answer", "completion", "answers")
PROMPT_CONTEXT = re.compile(r"^Question:\s*(.*?)\s*\nAnswer:\s*$", re.DOTALL)
UNANSWERABLE_POLICIES = ("skip", "empty", "error")
FORMATS = ("auto", "jsonl", "json", "csv", "e2e", "hf")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".txt": "e2e"}
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, as surrogateescape keeps them
_REPORT_EXAMPLES = 5  # how many locations of truncated/dropped examples the report keeps

SAMPLE_DATA = Path(__file__).parent / "sample_data"
# Names for the QA facts shipped with qatune, so that configs, commands and tests need no file paths.
DATA_ALIASES = {"sample": SAMPLE_DATA / "facts_train.jsonl", "sample-test": SAMPLE_DATA / "facts_test.jsonl"}


def resolve_data(path_or_name: str | Path) -> str:
    """A data argument as a path: `sample` / `sample-test` name the shipped QA facts; anything else as given."""
    return str(DATA_ALIASES.get(str(path_or_name), path_or_name))


@dataclass
class QAExample:
    """One training/evaluation pair; `aliases` (answer first) are every answer that counts as correct."""

    question: str
    answer: str
    aliases: list[str]
    context: str | None = None
    source: str = ""
    messages: list[dict[str, str]] | None = None  # a conversation (system/user/assistant turns), else None


@dataclass
class DataReport:
    """What happened to every record, so that nothing is lost silently between the file and the batches.

    `skipped` holds (source, reason) with reasons of the form "kind: detail"; `empty` counts unanswerable
    questions kept with a placeholder answer; `truncated`/`dropped` are filled by `batching.encode_dataset`
    (prompt cut on the left / example longer than `max_length` even without its prompt).
    """

    read: int = 0
    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty: int = 0
    truncated: int = 0
    dropped: int = 0
    truncated_sources: list[str] = field(default_factory=list)
    dropped_sources: list[str] = field(default_factory=list)

    def skip(self, source: str, reason: str) -> None:
        self.skipped.append((source, reason))

    def note_truncated(self, source: str) -> None:
        self.truncated += 1
        if len(self.truncated_sources) < _REPORT_EXAMPLES:
            self.truncated_sources.append(source)

    def note_dropped(self, source: str) -> None:
        self.dropped += 1
        if len(self.dropped_sources) < _REPORT_EXAMPLES:
            self.dropped_sources.append(source)

    def summary(self) -> str:
        """One line for logs, e.g. "read 626, kept 293, skipped 333 (unanswerable: 333), truncated 0, dropped 0"."""
        parts = [f"read {self.read}", f"kept {self.kept}"]
        if self.skipped:
            kinds = Counter(reason.split(":", 1)[0] for _, reason in self.skipped)
            detail = ", ".join(f"{kind}: {n}" for kind, n in kinds.most_common())
            parts.append(f"skipped {len(self.skipped)} ({detail}; first at {self.skipped[0][0]})")
        else:
            parts.append("skipped 0")
        if self.empty:
            parts.append(f"unanswerable kept {self.empty}")
        parts.append(_with_examples("truncated", self.truncated, self.truncated_sources))
        parts.append(_with_examples("dropped", self.dropped, self.dropped_sources))
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _with_examples(label: str, count: int, sources: list[str]) -> str:
    return f"{label} {count} (e.g. {', '.join(sources)})" if sources else f"{label} {count}"


@dataclass(frozen=True)
class _Fields:
    question: str | None
    answer: str | None
    aliases: str | None
    context: str | None


@dataclass(frozen=True)
class _Options:
    fields: _Fields
    unanswerable: str
    unanswerable_answer: str
    skip_invalid: bool
    aliases_sep: str | None = None  # CSV cells are strings: split aliases on this


def load_examples(
    path_or_name: str | Path,
    *,
    fmt: str = "auto",
    question_field: str | None = None,
    answer_field: str | None = None,
    aliases_field: str | None = None,
    context_field: str | None = None,
    squad_unanswerable: str = "skip",
    unanswerable_answer: str = "unanswerable",
    skip_invalid: bool = False,
    split: str | None = None,
    report: DataReport | None = None,
) -> list[QAExample]:
    """Read QA examples from a file or a Hugging Face dataset.

    `squad_unanswerable` decides what happens to questions without an answer (SQuAD v2 `is_impossible`, or an
    empty answer list): "skip" (listed in the report), "empty" (kept with `unanswerable_answer` as the answer)
    or "error". `skip_invalid=True` turns malformed records into report entries instead of a `DataError`.
    `split` selects the Hugging Face split (default "train"); it is an error for local file formats.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if squad_unanswerable not in UNANSWERABLE_POLICIES:
        raise DataError(f"squad_unanswerable must be one of {UNANSWERABLE_POLICIES}, got {squad_unanswerable!r}")
    report = report if report is not None else DataReport()
    name = resolve_data(path_or_name)
    fmt = _detect_format(name) if fmt == "auto" else fmt
    if name.startswith("hf:"):
        name = name[3:]
    if fmt != "hf" and split is not None:
        raise DataError(f"split={split!r} only applies to Hugging Face datasets, not to the {fmt} file {name}")
    if fmt != "hf":
        check_data_file(name)
    options = _Options(
        _Fields(question_field, answer_field, aliases_field, context_field),
        squad_unanswerable,
        unanswerable_answer,
        skip_invalid,
        aliases_sep="|" if fmt == "csv" else None,
    )
    if fmt == "e2e":
        records = _read_e2e(name)
    elif fmt == "hf":
        records = _read_hf(name, split or "train")
    else:
        records = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[fmt](name)
    return _convert(records, options, report)


def _detect_format(name: str) -> str:
    if name.startswith("hf:") or Path(name).is_dir():
        return "hf"
    suffix = Path(name).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    if not Path(name).exists():  # a typo must not become a request to the Hugging Face Hub
        raise DataError(f"data file not found: {name} (a Hugging Face dataset is written hf:NAME)")
    check_data_file(name)
    raise DataError(f"cannot tell the format of {name} from its extension; pass fmt= one of {FORMATS[1:]}")


# Readers yield (source, record or DataError): errors travel as values so that `skip_invalid` is applied in
# one place, `_convert`.
_Item = tuple[str, dict[str, Any] | DataError]


def _read_jsonl(path: str) -> Iterator[_Item]:
    yield from _jsonl_records(utf8_lines(path))


def _jsonl_records(lines: Iterator[tuple[str, str | DataError]]) -> Iterator[_Item]:
    for source, line in lines:
        if isinstance(line, DataError):
            yield source, line
            continue
        try:
            record = parse_json_line(line, source)
        except DataError as e:
            yield source, e
            continue
        if isinstance(record, dict):
            yield source, record
        else:
            yield source, DataError(f"{source}: invalid record: expected a JSON object, got {_kind(record)}")


def _read_json(path: str) -> Iterator[_Item]:
    text = read_utf8(path)
    try:
        data = decode_json(text)
    except JSONProblem as e:
        if e.extra_data:  # JSON Lines saved as .json, common with Hugging Face exports
            lines = ((f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), start=1) if line.strip())
            yield from _jsonl_records(lines)
            return
        line = e.line(text)
        raise DataError(f"{path}{'' if line is None else f':{line}'}: invalid JSON: {e.reason}") from None
    if isinstance(data, dict) and _is_squad(data):
        yield from _squad_items(path, data)
    elif isinstance(data, list):
        for i, record in enumerate(data):
            source = f"{path}:[{i}]"
            if isinstance(record, dict):
                yield source, record
            else:
                yield source, DataError(f"{source}: invalid record: expected an object, got {_kind(record)}")
    else:
        raise DataError(f"{path}: expected a JSON list of records or SQuAD {{'data': [...]}}, got {_kind(data)}")


def _is_squad(data: dict[str, Any]) -> bool:
    articles = data.get("data")
    return isinstance(articles, list) and all(isinstance(a, dict) and "paragraphs" in a for a in articles)


def _squad_items(path: str, data: dict[str, Any]) -> Iterator[_Item]:
    """Flatten SQuAD into plain records; `is_impossible` travels along for the unanswerable policy. A part of the
    wrong shape is one invalid item naming where it is."""
    for i, article in enumerate(data["data"]):
        where = f"{path}:data[{i}].paragraphs"
        paragraphs = article["paragraphs"]
        if not isinstance(paragraphs, list):
            yield where, DataError(f"{where}: expected a list of paragraphs, got {_kind(paragraphs)}")
            continue
        for j, paragraph in enumerate(paragraphs):
            yield from _squad_paragraph(paragraph, f"{where}[{j}]")


def _squad_paragraph(paragraph: Any, where: str) -> Iterator[_Item]:
    if not isinstance(paragraph, dict):
        yield where, DataError(f"{where}: invalid paragraph: expected an object, got {_kind(paragraph)}")
        return
    qas = paragraph.get("qas", [])
    if not isinstance(qas, list):
        yield where, DataError(f"{where}: invalid field 'qas': expected a list, got {_kind(qas)}")
        return
    for k, qa in enumerate(qas):
        source = f"{where}.qas[{k}]"
        if not isinstance(qa, dict):
            yield source, DataError(f"{source}: invalid question: expected an object, got {_kind(qa)}")
            continue
        answers, impossible = qa.get("answers", []), qa.get("is_impossible", False)
        if not isinstance(impossible, bool):
            yield source, DataError(f"{source}: invalid field 'is_impossible': expected true or false, "
                                    f"got {_kind(impossible)}")
            continue
        if isinstance(answers, list):  # an answer object without "text" is an empty answer (an error), not none
            answers = [a.get("text") if isinstance(a, dict) else a for a in answers]
        yield source, {"question": qa.get("question"), "context": paragraph.get("context"), "answers": answers,
                       "is_impossible": impossible}


def _read_csv(path: str) -> Iterator[_Item]:
    """Rows as records. Python's csv module is lenient where a spreadsheet user needs to hear about it: a quote
    left open swallows the following lines, a row with too many fields loses the extra ones. Here both are errors
    naming the line where the record starts, and reading resumes on the next line, so that with `skip_invalid`
    one bad row costs one row."""
    # surrogateescape keeps bytes that are not UTF-8 as lone surrogates, so the row holding them can be named
    lines = io.StringIO(read_bytes(path).decode("utf-8", errors="surrogateescape"), newline="").readlines()
    header: list[str] | None = None
    resume = 0
    while resume is not None:
        rows, resume = _csv_rows(path, lines, resume)
        for source, row in rows:
            if header is None and not isinstance(row, DataError):
                header = _csv_header(source, row)
            elif header is None:  # the header itself is unreadable: nothing after it can be mapped to fields
                raise row
            else:
                yield source, row if isinstance(row, DataError) else _csv_record(source, header, row)


def _csv_rows(path: str, lines: list[str], start: int) -> tuple[list[tuple[str, list[str] | DataError]], int | None]:
    """The rows from line index `start` on, up to and including the first malformed record; and the line index to
    resume from after it (None at the end)."""
    reader = csv.reader((lines[i] for i in range(start, len(lines))), strict=True)
    rows: list[tuple[str, list[str] | DataError]] = []
    while True:
        first = start + reader.line_num + 1  # the line (1-based) where the next record starts
        try:
            row = next(reader)
        except StopIteration:
            return rows, None
        except csv.Error as e:
            reason = ("unterminated quote: a quoted field starting on this line is never closed"
                      if "unexpected end of data" in str(e) else f"invalid CSV: {e} (a stray or unclosed quote?)")
            rows.append((f"{path}:{first}", DataError(f"{path}:{first}: {reason}")))
            return rows, first
        if row:  # a blank line is no record
            rows.append((f"{path}:{first}", row))


def _csv_header(source: str, row: list[str]) -> list[str]:
    if _UNDECODED.search("".join(row)):
        raise DataError(f"{source}: invalid encoding: not UTF-8 (in the header)")
    repeated = [name for name, n in Counter(row).items() if n > 1]
    if repeated:
        raise DataError(f"{source}: column {repeated[0]!r} appears twice in the header")
    return row


def _csv_record(source: str, header: list[str], row: list[str]) -> dict[str, Any] | DataError:
    if len(row) > len(header):
        return DataError(f"{source}: {len(row)} fields but the header has {len(header)} "
                         "(a field holding a comma must be quoted)")
    if _UNDECODED.search("".join(row)):
        return DataError(f"{source}: invalid encoding: not UTF-8")
    return {name: (row[i] if i < len(row) else None) for i, name in enumerate(header)}  # short rows: None as csv


def _read_e2e(path: str) -> Iterator[_Item]:
    for source, line in utf8_lines(path):
        if isinstance(line, DataError):
            yield source, line
            continue
        if "||" not in line:
            yield source, DataError(f"{source}: invalid E2E line: expected 'meaning representation||reference'")
            continue
        mr, reference = line.split("||", 1)
        yield source, {"question": mr, "answer": reference}


def _read_hf(name: str, split: str) -> Iterator[_Item]:
    try:
        import datasets  # imported lazily: optional dependency, slow to import
    except ImportError as e:
        raise DataError(
            f"reading the Hugging Face dataset {name!r} needs the 'datasets' package: pip install 'qatune[datasets]'"
        ) from e
    try:
        dataset = _load_hf(datasets, name, split)
    except ConnectionError as e:  # offline, or the Hub unreachable (after datasets' own retries)
        raise DataError(f"hf:{name}: could not be fetched from the Hugging Face Hub ({_first_line(e)}); fetch it "
                        "once online (datasets keeps it in its cache), or download its files and pass their path"
                        ) from None
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:  # not found, no data files, bad split
        cause = f" ({_first_line(e.__cause__)})" if e.__cause__ else ""
        raise DataError(f"{name}: could not be loaded with datasets: {_first_line(e)}{cause}") from None
    for i, record in enumerate(dataset):
        yield f"{name}:{split}:{i}", record


def _load_hf(datasets: Any, name: str, split: str) -> Any:
    path = Path(name)
    if path.is_file():  # a local data file: use the matching generic builder
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"cannot load {name} with datasets: unsupported extension {path.suffix!r}")
        return datasets.load_dataset(builder, data_files=str(path), split=split)
    if path.exists() and not path.is_dir():
        check_data_file(name)  # a device or a pipe
    return datasets.load_dataset(name, split=split)  # a directory of data files, or a dataset on the Hub


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _convert(items: Iterator[_Item], options: _Options, report: DataReport) -> list[QAExample]:
    examples = []
    for source, record in items:
        report.read += 1
        try:
            if isinstance(record, DataError):
                raise record
            example = _to_example(record, source, options, report)
        except DataError as e:
            if not options.skip_invalid:
                raise
            report.skip(source, str(e).removeprefix(f"{source}: "))
            continue
        if example is not None:
            examples.append(example)
            report.kept += 1
    return examples


def _to_example(record: dict[str, Any], source: str, options: _Options, report: DataReport) -> QAExample | None:
    """Map one record to a QAExample; None means skipped as unanswerable (already reported)."""
    if "messages" in record:
        messages = parse_messages(record["messages"], source)
        question, answer = last_exchange(messages)
        return QAExample(question, answer, [answer], None, source, messages)
    fields = options.fields
    context_key = fields.context or ("context" if "context" in record else None)
    context = _text(record, context_key, source) if context_key else None
    question_key = fields.question or _first_present(record, QUESTION_KEYS)
    if question_key is not None:
        question = _text(record, question_key, source)
    else:
        match = PROMPT_CONTEXT.match(context or "")
        if match is None:
            raise _missing(record, source, "question", QUESTION_KEYS)
        question, context = match.group(1), None
    answer_key = fields.answer or _first_present(record, ANSWER_KEYS)
    if answer_key is None or answer_key not in record:
        raise _missing(record, source, answer_key or "answer", () if fields.answer else ANSWER_KEYS)
    answers = _texts(record, answer_key, source, options.aliases_sep)
    if not question.strip():
        raise DataError(f"{source}: empty question: field {question_key or 'context'!r}")
    if record.get("is_impossible") or not answers:
        return _unanswerable(question, context, source, options, report)
    aliases_key = fields.aliases or ("aliases" if "aliases" in record else None)
    if aliases_key is not None and aliases_key not in record:
        raise _missing(record, source, aliases_key, ())
    extra = _texts(record, aliases_key, source, options.aliases_sep) if aliases_key else []
    if not answers[0]:
        raise DataError(f"{source}: empty answer: field {answer_key!r}")
    return QAExample(question.strip(), answers[0], _dedupe(answers + extra), context, source)


def _unanswerable(
    question: str, context: str | None, source: str, options: _Options, report: DataReport
) -> QAExample | None:
    if options.unanswerable == "error":
        raise DataError(f"{source}: unanswerable question (pass squad_unanswerable='skip' or 'empty')")
    if options.unanswerable == "skip":
        report.skip(source, "unanswerable: squad_unanswerable='skip'")
        return None
    report.empty += 1
    placeholder = options.unanswerable_answer
    return QAExample(question.strip(), placeholder, [placeholder], context, source)


def _first_present(record: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in record), None)


def _missing(record: dict[str, Any], source: str, name: str, alternatives: tuple[str, ...]) -> DataError:
    has = ", ".join(repr(k) for k in record) or "none"
    accepted = f" (accepted names: {', '.join(repr(k) for k in alternatives)})" if alternatives else ""
    return DataError(f"{source}: missing field {name!r}: the record has fields {has}{accepted}")


def _text(record: dict[str, Any], key: str, source: str) -> str:
    if key not in record:
        raise _missing(record, source, key, ())
    return _as_text(record[key], source, key)


def _as_text(value: Any, source: str, field: str) -> str:
    """A field's text. A number is accepted as the text it is written as (an answer "1945" written 1945); true,
    false, NaN, objects and lists are not text: an error naming the field."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(value)  # a JSON number keeps its written form ("1.50"), see textfiles
    raise DataError(f"{source}: invalid field {field!r}: expected text, got {_kind(value)}")


def _texts(record: dict[str, Any], key: str, source: str, sep: str | None) -> list[str]:
    """Answers in any of the usual shapes -> stripped strings, first one is the main answer: a string (split on
    `sep` for CSV cells), a list of them, or Hugging Face SQuAD's {"text": [...], "answer_start": [...]}."""
    value, field = record[key], key
    if isinstance(value, dict):
        if "text" not in value:  # an object is not "no answer": say what it lacks
            raise DataError(f"{source}: invalid field {field!r}: expected text, a list of texts or an object with "
                            f"'text' (SQuAD), got an object with {', '.join(map(repr, value)) or 'no fields'}")
        value, field = value["text"], f"{key}.text"
    if value is None:
        return [""]  # a null answer is an empty (invalid) answer, not an unanswerable question
    if isinstance(value, str):
        return [v.strip() for v in (value.split(sep) if sep else [value])]
    if isinstance(value, (list, tuple)):
        return [_as_text(v, source, f"{field}[{i}]").strip() for i, v in enumerate(value)]
    return [_as_text(value, source, field).strip()]


def _kind(value: Any) -> str:
    """A value's type as JSON names it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("nan", "NaN").replace("inf", "Infinity")
    names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
             type(None): "null"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), type(value).__name__)


def _dedupe(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(t for t in texts if t))


def split_train_val(
    examples: list[QAExample], val_fraction: float, seed: int
) -> tuple[list[QAExample], list[QAExample]]:
    """Deterministic train/validation split, by question so that one E2E MR never sits on both sides.

    The validation set gets round(fraction * number of questions) questions, at least one when
    `val_fraction > 0` and there are two or more questions, and never all of them. Both halves keep the input
    order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    questions = list(dict.fromkeys(ex.question for ex in examples))
    n_val = round(val_fraction * len(questions))
    if val_fraction > 0 and len(questions) >= 2:
        n_val = min(max(n_val, 1), len(questions) - 1)
    val_questions = set(random.Random(seed).sample(questions, n_val))
    train = [ex for ex in examples if ex.question not in val_questions]
    val = [ex for ex in examples if ex.question in val_questions]
    return train, val


def group_references(examples: list[QAExample]) -> list[tuple[str, list[str]]]:
    """(question, [answers...]) in first-appearance order: one E2E MR has several references (multi-reference
    BLEU). Grouping is by question text only, so use it for context-free data."""
    groups: dict[str, list[str]] = {}
    for ex in examples:
        groups.setdefault(ex.question, []).append(ex.answer)
    return list(groups.items())
