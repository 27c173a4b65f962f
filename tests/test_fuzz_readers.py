"""Fuzzing every reader of user files: a malformed input is read, or refused with a one-line `QatuneError` that
names the file -- never a traceback, never a hang, never memory without bound.

Readers: QA JSONL, JSON and CSV, SQuAD JSON (`load_examples`, with and without `skip_invalid`), multiple choice
(`load_mc`), the YAML run config (`load_config`) and the sweep file (`load_sweep`). Each starts from a valid seed
file, and a seeded table (hypothesis is not a dependency; a failure names its case, which reproduces) derives:
truncations, random byte flips, NUL bytes, byte order marks, invalid UTF-8, empty and blank files, very long
lines, deep nesting, huge and non-finite numbers, a wrong-typed value at every field, and paths that are not
files (a directory, `/dev/zero`, a FIFO, nothing).

The table runs in a child process (`python test_fuzz_readers.py OUT_DIR MODE`) whose address space is capped
(RLIMIT_AS) at what its imports took plus `_MEMORY_MARGIN`: a reader that reads without end dies with a
MemoryError (reported as a failure) instead of taking the machine, and one that hangs hits the timeout.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_MEMORY_MARGIN = 768 * 2**20  # bytes above the child's footprint after its imports
_TIMEOUT_S = 300

_QA = [
    {"question": "What is the capital of France?", "answer": "Paris", "aliases": ["Paris", "City of Light"]},
    {"question": "Who wrote Hamlet?", "context": "A play.", "answer": "Shakespeare"},
    {"prompt": "2+2?", "completion": 4},
    {"context": "Question: Largest planet?\nAnswer:", "answers": ["Jupiter"]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello."}]},
]
_SQUAD = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
    {"id": "1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
    {"id": "2", "question": "Where is Rome?", "answers": [], "is_impossible": True}]}]}]}
_MC = [
    {"query": "Question: Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"], "gold": 1},
    {"question": "Largest number?", "choices": ["3", "42"], "answer": "42"},
    {"query": "Q", "choices": ["a", "b", "c"], "label": 2},
]
_CONFIG = """\
model: smollm2-135m
method: lora
data:
  train: sample
  val_fraction: 0.1
  max_length: 128
lora: {r: 8, alpha: 16, dropout: 0.1, targets: [q, v]}
train: {epochs: 4, batch_size: 8, lr: 1.0e-3, warmup_steps: 10, patience: 2}
out: runs/fuzz
"""
_SWEEP = """\
name: fuzz
models: [gpt2]
methods: [full, lora]
ranks: [4, 8]
seeds: [0, 1]
zero_shot: true
few_shot: 2
slices:
  test: {source: sample, start: 0, stop: 30}
  train: {source: sample, start: 30, stop: 200}
base:
  data: {train: slice:train, val_fraction: 0.1, max_length: 128}
  train: {epochs: 1, batch_size: 8}
grid:
  lora: {train.lr: [1.0e-3, 3.0e-3]}
eval:
  data: slice:test
  generation: {max_new_tokens: 8}
extra_eval:
  - {name: facts, data: sample-test, task: qa}
"""

# Values put in place of each field: every JSON type, and edge cases of each.
_WRONG = [None, True, False, 0, -1, 2**40, 1.5, "", "x", [], [None], [1, "a"], {}, {"a": {"b": None}}]
# Raw text put in place of a value (not expressible as a Python value dumped by json/yaml).
_RAW_JSON = ["NaN", "-Infinity", "1e999999", "9" * 5000, '"\\ud800"', '"\\u0000"', '"\\ud83d\\ude00"']
_RAW_YAML = [".nan", "-.inf", "1e999999", "9" * 5000, "!!binary AAAA", "*undefined", "&a [*a]", '"\\0"',
             "!!python/object:os.system x", "!!set {a, b}", "2001-12-14"]
# Deep nesting, at the first and the last field only (a deep YAML flow sequence takes seconds to parse).
_DEEP_JSON = "[" * 50_000 + "]" * 50_000
_DEEP_YAML = "[" * 1_000 + "]" * 1_000
_PLACEHOLDER = "__FUZZ_VALUE__"


# ------------------------------------------------------------------------------------------------ the table


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key/index path into a JSON-like value, the root excluded."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


def _replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def _typed_cases(seed: Any, dump: Callable[[Any], str], raw: list[str], deep: str | None
                 ) -> Iterator[tuple[str, bytes]]:
    """A wrong-typed value and each raw edge case at every field of `seed`; deep nesting at the first and last."""
    paths = list(_paths(seed))
    for path in paths:
        name = ".".join(map(str, path))
        for i, new in enumerate(_WRONG):
            yield f"type:{name}={i}", dump(_replaced(seed, path, new)).encode()
        for i, text in enumerate(raw + ([deep] if deep and path in (paths[0], paths[-1]) else [])):
            placeholder = _PLACEHOLDER if dump is _yaml_dump else json.dumps(_PLACEHOLDER)
            yield f"raw:{name}={i}", dump(_replaced(seed, path, _PLACEHOLDER)).replace(placeholder, text).encode()


def _byte_cases(seed: bytes, rng: random.Random, heavy: bool) -> Iterator[tuple[str, bytes]]:
    """Truncations, flips, inserted NULs/BOMs/invalid UTF-8, and whole-file edge cases."""
    positions = range(len(seed)) if heavy or len(seed) <= 200 else sorted(rng.sample(range(len(seed)), 200))
    for n in positions:
        yield f"truncated:{n}", seed[:n]
    for i in range(400 if heavy else 80):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        yield f"flipped:{i}", bytes(data)
    for i, junk in enumerate([b"\x00", b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\r", b'"', b"\\"]):
        for _ in range(8):
            at = rng.randrange(len(seed) + 1)
            yield f"inserted:{i}:{at}", seed[:at] + junk + seed[at:]
    yield from [("empty", b""), ("bom-only", b"\xef\xbb\xbf"), ("blank", b"\n \n\t\n"), ("nul", b"\x00" * 64),
                ("bom", b"\xef\xbb\xbf" + seed), ("crlf", seed.replace(b"\n", b"\r\n")),
                ("cr", seed.replace(b"\n", b"\r")), ("utf16", seed.decode().encode("utf-16")),
                ("doubled", seed + seed), ("long-line", b"a" * 1_000_000 + b"\n" + seed),
                ("deep-list", b"[" * 20_000), ("deep-map", b"{\"a\":" * 20_000), ("binary", rng.randbytes(4096))]


def _jsonl_dump(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _yaml_dump(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, sort_keys=False)


def _readers() -> dict[str, tuple[str, Any, Callable[[Any], str], list[Callable[[Path], Any]]]]:
    """name -> (file suffix, seed value, how it is written, the calls that read it)."""
    import yaml

    from qatune.compare.sweep import load_sweep
    from qatune.data.readers import load_examples
    from qatune.evaluation.multiple_choice import load_mc
    from qatune.training.config import load_config

    def qa(path: Path) -> Any:
        return load_examples(path)

    def qa_skipping(path: Path) -> Any:
        return load_examples(path, skip_invalid=True, squad_unanswerable="empty")

    def csv_dump(records: list) -> str:
        rows = (",".join(map(str, r)) if isinstance(r, list) else str(r) for r in records)
        return "question,answer,aliases\n" + "".join(row + "\n" for row in rows)

    csv_seed = [["Capital of Peru?", "Lima", "Lima|Ciudad de los Reyes"], ['"Two, lines\nhere?"', "yes", ""],
                ['"A ""quoted"" word?"', "no", "nope"]]
    return {
        "jsonl": (".jsonl", _QA, _jsonl_dump, [qa, qa_skipping]),
        "json": (".json", _QA, json.dumps, [qa, qa_skipping]),
        "csv": (".csv", csv_seed, csv_dump, [qa, qa_skipping]),
        "squad": (".json", _SQUAD, lambda v: json.dumps(v, indent=1), [qa, qa_skipping]),
        "mc": (".jsonl", _MC, _jsonl_dump, [load_mc]),
        "config": (".yaml", yaml.safe_load(_CONFIG), _yaml_dump, [load_config]),
        "sweep": (".yaml", yaml.safe_load(_SWEEP), _yaml_dump, [load_sweep]),
    }


# ------------------------------------------------------------------------------------------------ the child


def _check(call: Callable[[Path], Any], path: Path) -> tuple[str, str] | None:
    """None if the call read the file or refused it with a one-line error naming it; else ("crash" | "unnamed",
    what happened)."""
    from qatune.errors import QatuneError

    try:
        call(path)
    except QatuneError as e:
        message = str(e)
        if "\n" in message:
            return "crash", f"{type(e).__name__} of several lines: {message[:300]!r}"
        if str(path) not in message:
            return "unnamed", f"{type(e).__name__} without the file: {message[:300]!r}"
    except Exception as e:  # noqa: BLE001 -- anything else is the failure this test looks for
        return "crash", f"{type(e).__name__}: {str(e)[:300]!r}"
    return None


def _record(found: dict[str, Any], case: str, calls: list[Callable[[Path], Any]], target: Path) -> None:
    for call in calls:
        problem = _check(call, target)
        if problem:
            found[problem[0]].append(f"{case} ({call.__name__}): {problem[1]}")


def _run_table(out: Path, heavy: bool) -> dict[str, dict[str, Any]]:
    """reader -> {"cases": how many inputs, "crash": [...], "unnamed": [...]} (each failure: "case (call): what")."""
    readers = _readers()
    (out / "folder").mkdir()  # empty: a directory of data files is read (with `datasets`), this one has none
    (out / "pipe").mkdir()
    fifo = out / "pipe" / "fifo.jsonl"  # apart: a reader of the whole directory would wait on it forever
    os.mkfifo(fifo)
    specials = [("directory", out / "folder"), ("fifo", fifo), ("missing", out / "missing" / "data.jsonl")]
    if Path("/dev/zero").exists():
        specials.append(("dev-zero", Path("/dev/zero")))
    results: dict[str, dict[str, Any]] = {}
    for name, (suffix, seed, dump, calls) in readers.items():
        rng = random.Random(f"{name}:{heavy}")
        seed_bytes = dump(seed).encode()
        raw, deep = ((_RAW_YAML, _DEEP_YAML) if suffix == ".yaml" else ([], None) if name == "csv"
                     else (_RAW_JSON, _DEEP_JSON))
        cases = [("seed", seed_bytes), *_byte_cases(seed_bytes, rng, heavy), *_typed_cases(seed, dump, raw, deep)]
        path = out / f"{name}{suffix}"
        found: dict[str, Any] = {"cases": len(cases) + len(specials), "crash": [], "unnamed": []}
        for case, data in cases:
            path.write_bytes(data)
            _record(found, case, calls, path)
        for case, special in specials:
            _record(found, case, calls, special)
        results[name] = found
    return results


def _limit_memory() -> None:
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + _MEMORY_MARGIN, resource.getrlimit(resource.RLIMIT_AS)[1]))


if __name__ == "__main__":
    _readers()  # every import first: the memory cap applies to what reading costs
    if Path("/proc/self/status").exists():
        _limit_memory()
    print(json.dumps(_run_table(Path(sys.argv[1]), heavy=sys.argv[2] == "heavy")))


# ------------------------------------------------------------------------------------------------ the tests


def _fuzz(tmp_path_factory, mode: str) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp(f"fuzz-{mode}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, str(out), mode], capture_output=True, text=True, env=env,
                          timeout=_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory) -> dict[str, dict[str, Any]]:
    return _fuzz(tmp_path_factory, "light")


READERS = ["jsonl", "json", "csv", "squad", "mc", "config", "sweep"]


def _failures(found: dict[str, Any], kind: str) -> str:
    return f"{len(found[kind])} of {found['cases']} inputs, e.g.:\n" + "\n".join(found[kind][:20])


@pytest.mark.parametrize("reader", READERS)
def test_malformed_input_is_read_or_refused_in_one_line(fuzz_results, reader):
    found = fuzz_results[reader]
    assert found["cases"] > 300  # the table is not empty
    assert found["crash"] == [], _failures(found, "crash")


@pytest.mark.parametrize("reader", READERS)
def test_refusals_name_the_file(fuzz_results, reader):
    found = fuzz_results[reader]
    assert found["unnamed"] == [], _failures(found, "unnamed")


@pytest.mark.slow
def test_malformed_input_every_truncation_and_more_flips(tmp_path_factory):
    """The data readers' table with every truncation point and 5x the byte flips."""
    results = _fuzz(tmp_path_factory, "heavy")
    failures = [f"{reader}: {line}" for reader, found in results.items() if reader not in ("config", "sweep")
                for line in found["crash"] + found["unnamed"]]
    assert failures == [], f"{len(failures)} failures, e.g.:\n" + "\n".join(failures[:40])
