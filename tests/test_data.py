"""Readers of qatune.data.readers: every format on tiny hand-written files, then the real files in ../shared."""

import json
from pathlib import Path

import pytest

from qatune.data.readers import (
    DataError,
    DataReport,
    QAExample,
    group_references,
    load_examples,
    split_train_val,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "src" / "qatune" / "data" / "sample_data"


def shared_file(relative: str) -> Path:
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- formats -------------------------------------------------------------------------------------------------


def test_jsonl_question_answer_aliases(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": " Capital of France? ", "answer": " Paris ", "aliases": ["paris", "Paris", "City of Light"]},
            {"question": "2+2?", "answer": 4},
        ],
    )
    report = DataReport()
    examples = load_examples(path, report=report)
    assert examples == [
        QAExample("Capital of France?", "Paris", ["Paris", "paris", "City of Light"], None, f"{path}:1"),
        QAExample("2+2?", "4", ["4"], None, f"{path}:2"),
    ]
    assert (report.read, report.kept, report.skipped) == (2, 2, [])


def test_jsonl_prompt_completion_and_blank_lines(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text('{"prompt": "Say hi", "completion": "hi"}\n\n{"prompt": "Say bye", "completion": "bye"}\n')
    examples = load_examples(path)
    assert [(e.question, e.answer, e.source) for e in examples] == [
        ("Say hi", "hi", f"{path}:1"),
        ("Say bye", "bye", f"{path}:3"),
    ]


def test_triviaqa_style_context_becomes_question_other_context_stays(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"context": "Question: Who wrote Hamlet?\nAnswer:", "answer": "Shakespeare", "aliases": ["Will"]},
            {"question": "Who?", "context": "Some paragraph.", "answer": "Him"},
        ],
    )
    first, second = load_examples(path)
    assert (first.question, first.context, first.aliases) == ("Who wrote Hamlet?", None, ["Shakespeare", "Will"])
    assert (second.question, second.context) == ("Who?", "Some paragraph.")


def test_explicit_field_names(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"q": "Q1", "a": "A1", "alts": ["B1"], "passage": "P1"}])
    (ex,) = load_examples(path, question_field="q", answer_field="a", aliases_field="alts", context_field="passage")
    assert (ex.question, ex.answer, ex.aliases, ex.context) == ("Q1", "A1", ["A1", "B1"], "P1")


def test_json_list(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"question": "a?", "answer": "b"}, {"question": "c?", "answer": "d"}]))
    examples = load_examples(path)
    assert [(e.question, e.answer, e.source) for e in examples] == [
        ("a?", "b", f"{path}:[0]"),
        ("c?", "d", f"{path}:[1]"),
    ]


def test_json_extension_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [{"question": "a?", "answer": "b"}, {"question": "c?", "answer": "d"}])
    assert [e.source for e in load_examples(path)] == [f"{path}:1", f"{path}:2"]


def test_csv_with_aliases_and_quoted_newline(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer,aliases\nCapital of Peru?,Lima,Lima|Ciudad de los Reyes\n"Two\nlines?",yes,\n')
    first, second = load_examples(path)
    assert (first.question, first.answer, first.aliases, first.source) == (
        "Capital of Peru?", "Lima", ["Lima", "Ciudad de los Reyes"], f"{path}:2"
    )
    assert (second.question, second.answer, second.aliases) == ("Two\nlines?", "yes", ["yes"])


def test_e2e_text(tmp_path):
    path = tmp_path / "e2e.txt"
    path.write_text("name : A | food : Thai||A serves Thai food . \nname : A | food : Thai||Thai food at A .\n")
    examples = load_examples(path)
    assert [(e.question, e.answer) for e in examples] == [
        ("name : A | food : Thai", "A serves Thai food ."),
        ("name : A | food : Thai", "Thai food at A ."),
    ]
    assert group_references(examples) == [("name : A | food : Thai", ["A serves Thai food .", "Thai food at A ."])]


def test_squad_shape_detected_in_json(tmp_path):
    squad = {
        "version": "v2.0",
        "data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
            {"id": "1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12},
                                                               {"text": "in France", "answer_start": 9}]},
            {"id": "2", "question": "Where is Rome?", "answers": [], "is_impossible": True},
        ]}]}],
    }
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad))
    report = DataReport()
    (ex,) = load_examples(path, report=report)
    assert (ex.question, ex.answer, ex.aliases, ex.context) == (
        "Where is Paris?", "France", ["France", "in France"], "Paris is in France."
    )
    assert ex.source == f"{path}:data[0].paragraphs[0].qas[0]"
    assert report.skipped == [(f"{path}:data[0].paragraphs[0].qas[1]", "unanswerable: squad_unanswerable='skip'")]
    kept = load_examples(path, squad_unanswerable="empty", unanswerable_answer="no answer")
    assert [(e.answer, e.aliases) for e in kept] == [("France", ["France", "in France"]), ("no answer", ["no answer"])]
    with pytest.raises(DataError, match=r"qas\[1\]: unanswerable"):
        load_examples(path, squad_unanswerable="error")


def test_hf_datasets_local_file_offline(tmp_path):
    pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "hf.jsonl", [{"question": "a?", "answer": "b"}, {"question": "c?", "answer": "d"}])
    examples = load_examples(path, fmt="hf", split="train")
    assert [(e.question, e.answer, e.source) for e in examples] == [
        ("a?", "b", f"{path}:train:0"),
        ("c?", "d", f"{path}:train:1"),
    ]


def test_hf_without_datasets_package_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match=r"needs the 'datasets' package"):
        load_examples("hf:some/dataset")


# --- errors and the report ------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": \n')
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON: "):
        load_examples(path)


def test_missing_field_names_field_location_and_present_fields(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "a?", "answer": "b"}, {"question": "c?", "reply": "d"}])
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: missing field 'answer'")
    assert "the record has fields 'question', 'reply' (accepted names: 'answer', 'completion', 'answers')" in message
    with pytest.raises(DataError, match=rf"{path}:1: missing field 'query'"):
        load_examples(path, question_field="query")


def test_empty_answer_and_question_are_invalid(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"question": "a?", "answer": "  "}])
    with pytest.raises(DataError, match=r":1: empty answer"):
        load_examples(path)
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "", "answer": "x"}])
    with pytest.raises(DataError, match=r":1: empty question"):
        load_examples(path)


def test_skip_invalid_counts_every_skip_with_location(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"question": "a?", "answer": "b"}\n'
        "not json\n"
        '{"question": "c?"}\n'
        '{"question": "d?", "answer": ""}\n'
        '{"question": "e?", "answer": "f"}\n'
    )
    report = DataReport()
    examples = load_examples(path, skip_invalid=True, report=report)
    assert [e.answer for e in examples] == ["b", "f"]
    assert (report.read, report.kept) == (5, 2)
    assert [source for source, _ in report.skipped] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    kinds = [reason.split(":")[0] for _, reason in report.skipped]
    assert kinds == ["invalid JSON", "missing field 'answer'", "empty answer"]
    summary = report.summary()
    assert summary.startswith("read 5, kept 2, skipped 3 (invalid JSON: 1, missing field 'answer': 1, empty answer: 1;")
    assert f"first at {path}:2" in summary
    assert report.as_dict()["skipped"][0] == (f"{path}:2", report.skipped[0][1])


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        load_examples(tmp_path / "nope.jsonl")
    weird = tmp_path / "data.xyz"
    weird.write_text("x")
    with pytest.raises(DataError, match=r"cannot tell the format"):
        load_examples(weird)
    with pytest.raises(DataError, match=r"split='test' only applies"):
        load_examples(write_jsonl(tmp_path / "a.jsonl", []), split="test")


# --- split and grouping ---------------------------------------------------------------------------------------


def make(n: int) -> list[QAExample]:
    return [QAExample(f"q{i}", f"a{i}", [f"a{i}"]) for i in range(n)]


def test_split_is_deterministic_disjoint_and_keeps_order():
    examples = make(50)
    train, val = split_train_val(examples, 0.2, seed=3)
    assert (len(train), len(val)) == (40, 10)
    assert split_train_val(examples, 0.2, seed=3) == (train, val)
    assert split_train_val(examples, 0.2, seed=4)[1] != val
    assert sorted(train + val, key=lambda e: int(e.question[1:])) == examples
    assert val == sorted(val, key=lambda e: int(e.question[1:]))


def test_split_never_empty_val_and_never_all_val():
    assert [len(part) for part in split_train_val(make(2), 0.01, seed=0)] == [1, 1]
    assert [len(part) for part in split_train_val(make(3), 0.9, seed=0)] == [1, 2]
    assert split_train_val(make(5), 0.0, seed=0) == (make(5), [])
    with pytest.raises(ValueError):
        split_train_val(make(5), 1.0, seed=0)


def test_split_keeps_all_references_of_a_question_together():
    examples = [QAExample(f"mr{i // 3}", f"ref{i}", [f"ref{i}"]) for i in range(30)]
    train, val = split_train_val(examples, 0.3, seed=0)
    assert len(val) == 9  # 3 of the 10 MRs, with their 3 references each
    assert not {e.question for e in train} & {e.question for e in val}


# --- the real files -------------------------------------------------------------------------------------------


def test_shared_triviaqa():
    report = DataReport()
    examples = load_examples(shared_file("data/triviaqa/triviaqa_sm_sub.jsonl"), report=report)
    assert (len(examples), report.read, report.kept, report.skipped) == (3000, 3000, 3000, [])
    first = examples[0]
    assert first.question == "Brunswick, Lancastrian and Pearl Pickler are types of which vegetable?"
    assert (first.answer, first.context) == ("Onion", None)
    assert first.aliases[:3] == ["Onion", "Onion skins", "Allium angolense"]
    assert all(not e.question.startswith("Question:") and e.aliases[0] == e.answer for e in examples)


def test_shared_squad_unanswerable_options():
    path = shared_file("data/squad/squad2_dev_small.json")
    report = DataReport()
    answerable = load_examples(path, report=report)
    assert (report.read, report.kept, len(report.skipped)) == (626, 293, 333)
    assert "unanswerable: 333" in report.summary()
    assert (answerable[0].question, answerable[0].answer) == ("In what country is Normandy located?", "France")
    assert answerable[0].context.startswith("The Normans")
    report = DataReport()
    everything = load_examples(path, squad_unanswerable="empty", report=report)
    assert (len(everything), report.empty) == (626, 333)
    assert sum(e.answer == "unanswerable" for e in everything) == 333
    with pytest.raises(DataError, match="unanswerable"):
        load_examples(path, squad_unanswerable="error")


def test_shared_e2e_grouped_by_meaning_representation():
    examples = load_examples(shared_file("data/e2e/valid.txt"))
    assert len(examples) == 4672
    groups = group_references(examples)
    assert len(groups) == 547
    mr, references = groups[0]
    assert mr == "name : Alimentum | area : city centre | family friendly : no"
    assert references[0] == "There is a place in the city centre , Alimentum , that is not family - friendly ."
    assert sum(len(refs) for _, refs in groups) == 4672


def test_sample_facts_ship_with_the_package():
    train = load_examples(SAMPLE_DATA / "facts_train.jsonl")
    test = load_examples(SAMPLE_DATA / "facts_test.jsonl")
    assert len(test) == 60 and 250 <= len(train) + len(test) <= 350
    assert not {e.question for e in train} & {e.question for e in test}
    assert all(1 <= len(e.answer.split()) <= 4 for e in train + test)
    capitals = {e.question: e.answer for e in train + test}
    assert capitals["What is the capital of France?"] == "Paris"


# --- nothing silently wrong: CSV rows, value types, strict JSON, paths that are not data files ------------------


def _csv_rows(n: int) -> list[str]:
    return ["question,answer"] + [f"Q{i}?,A{i}" for i in range(n)]


def test_csv_row_with_more_fields_than_the_header_is_an_error(tmp_path):
    rows = _csv_rows(5)
    rows[3] = "Capital of Peru?,Lima,Peru"  # an unquoted comma: the third field used to vanish
    path = tmp_path / "extra.csv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:4: 3 fields but the header has 2"):
        load_examples(path)


@pytest.mark.parametrize("closing_row", [None, 20], ids=["never-closed", "closed-by-a-later-row"])
def test_csv_unterminated_quote_names_the_line_where_it_starts(tmp_path, closing_row):
    rows = _csv_rows(30)
    rows[6] = '"Q5 never closed?,A5'  # line 7
    if closing_row is not None:
        rows[closing_row] = f'"Q{closing_row - 1}?",A{closing_row - 1}'  # its opening quote used to close line 7's
    path = tmp_path / "quote.csv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:7: "):
        load_examples(path)
    report = DataReport()
    examples = load_examples(path, skip_invalid=True, report=report)
    # one bad row costs one row: reading resumes on the next line
    assert [e.question for e in examples] == [f"Q{i}?" for i in range(30) if i != 5]
    assert (report.read, report.kept, [s for s, _ in report.skipped]) == (30, 29, [f"{path}:7"])


def test_csv_skip_invalid_skips_and_counts_bad_rows(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('question,answer\nQ0?,A0\nQ1?,A1,x\nQ2?,A2\n"Q3?,A3\nQ4?,A4\n')
    report = DataReport()
    assert [e.answer for e in load_examples(path, skip_invalid=True, report=report)] == ["A0", "A2", "A4"]
    assert [source for source, _ in report.skipped] == [f"{path}:3", f"{path}:5"]
    assert report.summary().startswith("read 5, kept 3, skipped 2")


def test_csv_excel_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfquestion,answer\r\nCapital of Peru?,Lima\r\n")
    (ex,) = load_examples(path)
    assert (ex.question, ex.answer, ex.source) == ("Capital of Peru?", "Lima", f"{path}:2")


def test_csv_header_with_a_column_twice_is_an_error(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("question,answer,answer\nQ?,A,B\n")
    with pytest.raises(DataError, match=rf"^{path}:1: column 'answer' appears twice"):
        load_examples(path)


def test_byte_order_mark_is_accepted_in_json_and_jsonl(tmp_path):
    record = b'{"question": "a?", "answer": "b"}'
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + record + b"\n")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf[" + record + b"]")
    for name in ("bom.jsonl", "bom.json"):
        assert [(e.question, e.answer) for e in load_examples(tmp_path / name)] == [("a?", "b")]


@pytest.mark.parametrize(("value", "kind"), [
    ("true", "true"), ("false", "false"), ("NaN", "NaN"), ("-Infinity", "-Infinity"),
    ('{"value": "Paris"}', "an object with 'value'"), ('["Paris", true]', "true"), ('["Paris", ["x"]]', "a list"),
])
def test_answer_that_is_not_text_is_an_error_naming_the_field(tmp_path, value, kind):
    path = tmp_path / "types.jsonl"
    path.write_text('{"question": "q?", "answer": "ok"}\n{"question": "Capital of France?", "answer": ' + value + "}\n")
    with pytest.raises(DataError, match=rf"^{path}:2: invalid field 'answer(\[1\])?': expected text") as info:
        load_examples(path)
    assert kind in str(info.value)


@pytest.mark.parametrize("value", ["true", "NaN", '{"q": "x"}', '["x"]'])
def test_question_that_is_not_text_is_an_error_naming_the_field(tmp_path, value):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": ' + value + ', "answer": "a"}\n')
    with pytest.raises(DataError, match=rf"^{path}:1: invalid field 'question': expected text"):
        load_examples(path)


def test_numbers_are_read_as_the_text_they_are_written_as(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text('{"question": "Year of the end of WWII?", "answer": 1945, "aliases": [1945, "1945 AD"]}\n'
                    '{"question": "Pi to two decimals, then a round price?", "answer": 3.14, "aliases": [1.50, 1e3]}\n'
                    '{"question": 42, "answer": -0.0}\n')
    assert [(e.question, e.aliases) for e in load_examples(path)] == [
        ("Year of the end of WWII?", ["1945", "1945 AD"]),
        ("Pi to two decimals, then a round price?", ["3.14", "1.50", "1e3"]),
        ("42", ["-0.0"]),
    ]


def test_an_object_answer_is_not_an_unanswerable_question(tmp_path):
    path = write_jsonl(tmp_path / "obj.jsonl", [{"question": "q?", "answer": {"answer_start": [3]}}])
    report = DataReport()
    with pytest.raises(DataError, match=rf"^{path}:1: invalid field 'answer': .*got an object with 'answer_start'"):
        load_examples(path, report=report)
    assert report.skipped == []  # it used to be skipped as "unanswerable"
    squad_hf = write_jsonl(tmp_path / "hf.jsonl", [{"question": "q?", "answers": {"text": [], "answer_start": []}},
                                                   {"question": "r?", "answers": {"text": ["x"], "answer_start": [0]}}])
    report = DataReport()
    assert [e.answer for e in load_examples(squad_hf, report=report)] == ["x"]
    assert report.skipped == [(f"{squad_hf}:1", "unanswerable: squad_unanswerable='skip'")]


def test_duplicate_json_key_names_the_key_and_line(tmp_path):
    jsonl = tmp_path / "dup.jsonl"
    jsonl.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": "d", "answer": "e"}\n')
    with pytest.raises(DataError, match=rf"^{jsonl}:2: invalid JSON: duplicate key 'answer'"):
        load_examples(jsonl)
    report = DataReport()
    assert [e.answer for e in load_examples(jsonl, skip_invalid=True, report=report)] == ["b"]
    assert report.skipped[0][0] == f"{jsonl}:2"
    whole = tmp_path / "dup.json"
    whole.write_text('[\n  {"question": "a?", "answer": "b"},\n  {"question": "c?",\n   "answer": "d",\n'
                     '   "aliases": {"x": 1, "x": 2}}\n]\n')
    with pytest.raises(DataError, match=rf"^{whole}:5: invalid JSON: duplicate key 'x'"):
        load_examples(whole)


@pytest.mark.parametrize("name", ["deep.jsonl", "deep.json"])
def test_deep_nesting_and_huge_integers_are_one_error(tmp_path, name):
    path = tmp_path / name
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=rf"^{path}(:1)?: invalid JSON: nested too deeply"):
        load_examples(path)
    path.write_text('{"question": "q?", "answer": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match=rf"^{path}(:1)?: invalid JSON: an integer with more than"):
        load_examples(path)


@pytest.mark.parametrize("squad", [
    {"data": [{"paragraphs": "text"}]},
    {"data": [{"paragraphs": ["text"]}]},
    {"data": [{"paragraphs": [{"context": "c", "qas": {"question": "q"}}]}]},
    {"data": [{"paragraphs": [{"context": "c", "qas": ["q"]}]}]},
    {"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": [1, {"text": True}]}]}]}]},
    {"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": [], "is_impossible": "no"}]}]}]},
    {"data": [{"paragraphs": [{"context": ["c"], "qas": [{"question": "q", "answers": [{"text": "a"}]}]}]}]},
])
def test_squad_of_the_wrong_shape_is_an_error_naming_the_part(tmp_path, squad):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad))
    with pytest.raises(DataError, match=rf"^{path}:data\[0\]\.paragraphs"):
        load_examples(path)


def test_paths_that_are_not_data_files_are_one_error(tmp_path, monkeypatch):
    import qatune.data.readers as readers

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path went to the Hugging Face Hub")

    monkeypatch.setattr(readers, "_read_hf", no_hub)
    with pytest.raises(DataError, match=r"^data file not found: .*trian \(a Hugging Face dataset is written hf:NAME"):
        load_examples(tmp_path / "data" / "trian")  # a typo, no extension
    if Path("/dev/zero").exists():
        for fmt in ("auto", "jsonl", "csv", "json"):
            with pytest.raises(DataError, match=r"^/dev/zero: not a regular file"):
                load_examples("/dev/zero", fmt=fmt)
    with pytest.raises(DataError, match=rf"^{tmp_path}: is a directory"):
        load_examples(tmp_path, fmt="jsonl")


def test_a_directory_of_data_files_is_read_with_datasets(tmp_path):
    """config.py documents `data.train` as "a file, directory of files, hf:NAME": a directory goes to
    `datasets`, and a directory it cannot read is one DataError."""
    pytest.importorskip("datasets")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part.jsonl", [{"question": "a?", "answer": "b"}])
    assert [(e.question, e.answer) for e in load_examples(folder)] == [("a?", "b")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"^{empty}: could not be loaded with datasets: "):
        load_examples(empty)


def test_hub_dataset_while_offline_says_it_could_not_be_fetched(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"^hf:x/y: could not be fetched from the Hugging Face Hub \(.*\); fetch it"):
        load_examples("hf:x/y")


def test_lone_surrogate_escape_is_an_error_but_a_pair_is_a_character(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"question": "Smile?", "answer": "\\ud83d\\ude00"}\n{"question": "Half?", "answer": "\\ud83d"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON: a \\uD800-\\uDFFF escape that is not half"):
        load_examples(path)
    assert [e.answer for e in load_examples(path, skip_invalid=True)] == ["\U0001f600"]
