"""Multiple choice (`qatune eval --task mc`): the reader, and every per-choice log-probability and prediction
checked against an independent computation with transformers (full sequences, one at a time, no cache)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qatune.cli.commands import main
from qatune.errors import ConfigError, DataError
from qatune.evaluation.multiple_choice import (
    DEFAULT_DELIMITER,
    load_mc,
    score_multiple_choice,
)
from qatune.generation.runs import load_for_inference

SHARED_MC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mc"

# Contexts and choices of very different lengths (padding in both passes), a query ending in a newline (PIQA's
# shape), a non-ASCII choice (bytes != characters), 2 to 5 choices, and single-token choices.
ITEMS = [
    {"query": "Question: Who wrote Hamlet?", "choices": ["x", "William Shakespeare wrote the play Hamlet."],
     "gold": 1},
    {"query": "Question: What is the capital of France?", "choices": ["Paris", "Rome", "Berlin", "Madrid"],
     "gold": 0},
    {"query": "Question: how do I boil an egg?\n",
     "choices": ["Put it in boiling water for ten minutes.", "Put it in a cold drawer for ten minutes."], "gold": 0},
    {"question": "Which number is the largest?", "choices": ["3", "42", "1999", "seven", "nine"], "answer": "1999"},
    {"query": "Question: Where is the café?", "choices": ["über den Fluß, à côté", "here", "the quick brown fox"],
     "label": 2},
    {"query": "Q", "choices": ["a", "b"], "gold": 1},
]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qa_llama_dir(tmp_path_factory, qa_tokenizer_dir) -> Path:
    """A tiny random Llama (grouped-query attention, RoPE) with the small test tokenizer beside it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(qa_tokenizer_dir)
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, initializer_range=0.5)
    path = tmp_path_factory.mktemp("qa-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    for f in qa_tokenizer_dir.iterdir():
        shutil.copy(f, path)
    return path


def _reference(model_dir: Path, items, delimiter: str = DEFAULT_DELIMITER, max_positions: int | None = None
               ) -> list[list[float]]:
    """Summed choice log-probabilities with transformers, written from lm-eval-harness's description: trailing
    whitespace of the context moves to the continuation; continuation tokens = encode(whole)[len(encode(ctx)):];
    the full sequence through the model, log_softmax, gather. With `max_positions`, the context loses its first
    tokens so that the longest choice fits (qatune's documented rule)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for item in items:
        context = item.query + delimiter
        stripped = context.rstrip()
        ctx_ids = tok(stripped, add_special_tokens=False)["input_ids"]
        conts = [tok(stripped + context[len(stripped):] + choice, add_special_tokens=False)["input_ids"][len(ctx_ids):]
                 for choice in item.choices]
        if max_positions is not None:
            ctx_ids = ctx_ids[-(max_positions + 1 - max(map(len, conts))):]
        sums = []
        for cont_ids in conts:
            ids = torch.tensor([(ctx_ids + cont_ids)[:-1]])  # the last token is predicted, never read
            with torch.no_grad():
                logp = model(ids).logits[0].float().log_softmax(-1)
            sums.append(float(logp[len(ctx_ids) - 1:].gather(1, torch.tensor(cont_ids)[:, None]).sum()))
        out.append(sums)
    return out


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def _assert_same_logprobs(rows: list[dict], reference: list[list[float]], atol: float = 1e-4) -> None:
    """Every choice's log-probability within `atol` of transformers'; a failure names the item and the choice."""
    assert len(rows) == len(reference)
    for i, (row, ref) in enumerate(zip(rows, reference)):
        torch.testing.assert_close(torch.tensor(row["logprobs"], dtype=torch.float64),
                                   torch.tensor(ref, dtype=torch.float64), rtol=0, atol=atol,
                                   msg=lambda m, i=i: f"item {i}: {m}")


# ------------------------------------------------------------------------------------------------ reader


def test_reader_reads_llm_foundry_and_friendly_records(tmp_path):
    items = load_mc(_write_jsonl(tmp_path / "mc.jsonl", [ITEMS[0], "", ITEMS[3], ITEMS[4]]))
    assert [it.gold for it in items] == [1, 2, 2]
    assert items[0].query == "Question: Who wrote Hamlet?"
    assert items[1].query == "Question: Which number is the largest?"  # `question` gets llm-foundry's prefix
    assert items[1].choices == ("3", "42", "1999", "seven", "nine")
    assert items[2].source.endswith("mc.jsonl:4")  # the blank line 2 still counts
    assert len(load_mc(tmp_path / "mc.jsonl", max_examples=2)) == 2


@pytest.mark.parametrize("record, expected", [
    ({"choices": ["a", "b"], "gold": 0}, "missing field 'query'"),
    ({"query": "Q", "gold": 0}, "missing field 'choices'"),
    ({"query": "Q", "choices": ["a", "b"]}, "missing field 'gold'"),
    ({"query": "Q", "choices": ["a", "b"], "gold": 2}, "field 'gold': index 2 out of range for 2 choices"),
    ({"query": "Q", "choices": ["a", "b"], "gold": -1}, "field 'gold': index -1 out of range"),
    ({"query": "Q", "choices": ["a", "b"], "gold": "0"}, "field 'gold': expected a choice index"),
    ({"query": "Q", "choices": ["a", "b"], "label": True}, "field 'label': expected a choice index"),
    ({"query": "Q", "choices": ["a"], "gold": 0}, "field 'choices': expected at least 2 choices, got 1"),
    ({"query": "Q", "choices": "a b", "gold": 0}, "field 'choices': expected a list of strings, got str"),
    ({"query": "Q", "choices": ["a", 3], "gold": 0}, "field 'choices' [1]: expected non-empty text"),
    ({"query": "Q", "choices": ["a", ""], "gold": 0}, "field 'choices' [1]: expected non-empty text"),
    ({"query": "", "choices": ["a", "b"], "gold": 0}, "field 'query': expected non-empty text"),
    ({"question": "Q", "choices": ["a", "b"], "answer": "c"}, "field 'answer': 'c' is not exactly one of"),
    (["Q", ["a", "b"], 0], "expected a JSON object, got list"),
    ("{not json", "invalid JSON"),
])
def test_reader_errors_name_file_line_and_field(tmp_path, record, expected):
    path = _write_jsonl(tmp_path / "bad.jsonl", [ITEMS[1], record if isinstance(record, str) else json.dumps(record)])
    with pytest.raises(DataError) as e:
        load_mc(path)
    assert "bad.jsonl:2: " in str(e.value) and expected in str(e.value)


_GOOD_LINE = json.dumps(ITEMS[1]).encode()


@pytest.mark.parametrize("line, expected", [
    (b'{"query": "Caf\xe9?", "choices": ["a", "b"], "gold": 0}', "bad.jsonl:2: invalid encoding: not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "bad.jsonl:2: invalid JSON: nested too deeply"),
    (b'{"query": "Q", "choices": ["a", "b"], "gold": 0, "gold": 1}', "bad.jsonl:2: invalid JSON: duplicate key 'gold'"),
    (b'{"query": "Q", "choices": ["a", "b"], "gold": ' + b"1" * 5000 + b"}", "bad.jsonl:2: invalid JSON: an integer"),
    (b'{"query": "Q", "choices": ["a", "b"], "gold": NaN}', "bad.jsonl:2: invalid field 'gold': expected a choice"),
])
def test_reader_bad_bytes_are_one_error_naming_the_line(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(_GOOD_LINE + b"\n" + line + b"\n")
    with pytest.raises(DataError) as e:
        load_mc(path)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_reader_accepts_a_byte_order_mark_and_refuses_what_is_not_a_file(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _GOOD_LINE + b"\n")
    assert [it.gold for it in load_mc(path)] == [0]
    with pytest.raises(DataError, match=rf"^{tmp_path}: is a directory"):
        load_mc(tmp_path)
    with pytest.raises(DataError, match=r"^data file not found: .*nope\.jsonl"):
        load_mc(tmp_path / "nope.jsonl")
    if Path("/dev/zero").exists():  # a device is never read (it would never end)
        with pytest.raises(DataError, match=r"^/dev/zero: not a regular file"):
            load_mc("/dev/zero")
    with pytest.raises(ConfigError, match=r"max_examples must be at least 1, got -1"):
        load_mc(path, max_examples=-1)


def test_reader_reads_the_shared_files():
    if not (SHARED_MC / "arc_easy.jsonl").is_file():
        pytest.skip(f"no multiple-choice data at {SHARED_MC}")
    arc, piqa = load_mc(SHARED_MC / "arc_easy.jsonl"), load_mc(SHARED_MC / "piqa.jsonl")
    assert (len(arc), len(piqa)) == (2376, 1838)
    assert {len(it.choices) for it in piqa} == {2} and all(it.query.startswith("Question: ") for it in arc)


# ------------------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("model_fixture", ["qa_gpt2_dir", "qa_llama_dir"])
def test_scores_and_predictions_match_transformers(tmp_path, request, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    items = load_mc(_write_jsonl(tmp_path / "mc.jsonl", ITEMS))
    reference = _reference(model_dir, items)
    model, tokenizer = load_for_inference(model_dir)
    for batch_size in (1, 4):
        rows = score_multiple_choice(model, tokenizer, items, batch_size=batch_size)
        _assert_same_logprobs(rows, reference)
        for row, ref, item in zip(rows, reference, items):
            per_byte = [lp / len(c.encode("utf-8")) for lp, c in zip(ref, item.choices)]
            assert (row["pred_acc"], row["pred_norm"]) == (_argmax(ref), _argmax(per_byte))
            assert row["correct_acc"] == (row["pred_acc"] == item.gold)
    # the normalisation is really exercised: "x" vs a long sentence splits the two conventions
    assert any(r["pred_acc"] != r["pred_norm"] for r in rows)


def test_shared_items_match_transformers(qa_llama_dir):
    """Real ARC-Easy and PIQA text (first items) through a tiny model: the same check on real prompts."""
    if not (SHARED_MC / "arc_easy.jsonl").is_file():
        pytest.skip(f"no multiple-choice data at {SHARED_MC}")
    items = load_mc(SHARED_MC / "arc_easy.jsonl", max_examples=6) + load_mc(SHARED_MC / "piqa.jsonl", max_examples=6)
    reference = _reference(qa_llama_dir, items)
    model, tokenizer = load_for_inference(qa_llama_dir)
    rows = score_multiple_choice(model, tokenizer, items, batch_size=5)
    _assert_same_logprobs(rows, reference)
    assert [r["pred_acc"] for r in rows] == [_argmax(ref) for ref in reference]


def test_long_contexts_lose_their_first_tokens(tmp_path, qa_gpt2_dir):
    """A context longer than GPT-2's 128 positions, batched with an item whose choices are longer than its own:
    the context is cut on the left for every choice, and the padding never reaches past the position table."""
    query = "Question: " + "The quick brown fox jumps over the lazy dog. " * 30 + "What jumps?"
    items = load_mc(_write_jsonl(tmp_path / "mc.jsonl", [{"query": query, "choices": ["fox", "dog"], "gold": 0},
                                                         ITEMS[2]]))
    model, tokenizer = load_for_inference(qa_gpt2_dir)
    rows = score_multiple_choice(model, tokenizer, items, batch_size=2)
    assert [r["truncated"] for r in rows] == [True, False]
    reference = _reference(qa_gpt2_dir, items, max_positions=128)
    _assert_same_logprobs(rows, reference)


def test_cli_eval_mc_writes_metrics_and_predictions(tmp_path, qa_gpt2_dir, capsys):
    data = _write_jsonl(tmp_path / "mc.jsonl", ITEMS)
    out = tmp_path / "out"
    assert main(["eval", str(qa_gpt2_dir), "--data", str(data), "--task", "mc", "--out", str(out),
                 "--batch-size", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert metrics["task"] == "mc" and metrics["items"] == len(rows) == len(ITEMS)
    assert metrics["acc"] == pytest.approx(sum(r["correct_acc"] for r in rows) / len(rows))
    assert metrics["acc_norm"] == pytest.approx(sum(r["correct_norm"] for r in rows) / len(rows))
    assert metrics["acc_stderr"] > 0 or metrics["acc"] in (0.0, 1.0)
    assert json.loads(capsys.readouterr().out)["acc"] == metrics["acc"]


def test_run_directory_results_go_beside_the_run(tmp_path, qa_gpt2_dir):
    """A run directory (here a full fine-tuning one: config.yaml + model/) is loaded as a run, and without --out its
    results go to RUN_DIR/eval-mc-<data stem>, beside (not over) the QA evaluation in RUN_DIR/eval."""
    run = tmp_path / "run"
    shutil.copytree(qa_gpt2_dir, run / "model")
    (run / "config.yaml").write_text(f"model: {qa_gpt2_dir}\n")
    data = _write_jsonl(tmp_path / "arc.jsonl", ITEMS[:2])
    assert main(["eval", str(run), "--data", str(data), "--task", "mc", "--mc-delimiter", "\nA:"]) == 0
    metrics = json.loads((run / "eval-mc-arc" / "metrics.json").read_text())
    assert metrics["items"] == 2 and metrics["delimiter"] == "\nA:"


def test_cli_eval_mc_reports_bad_data(tmp_path, qa_gpt2_dir, capsys):
    data = _write_jsonl(tmp_path / "mc.jsonl", [{"query": "Q", "choices": ["a"], "gold": 0}])
    assert main(["eval", str(qa_gpt2_dir), "--data", str(data), "--task", "mc", "--out", str(tmp_path)]) == 2
    assert "mc.jsonl:1: invalid field 'choices'" in capsys.readouterr().err


def test_cli_eval_mc_reports_undecodable_data_in_one_line(tmp_path, qa_gpt2_dir, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(_GOOD_LINE + b"\n" + b'{"query": "Caf\xe9?", "choices": ["a", "b"], "gold": 0}\n')
    assert main(["eval", str(qa_gpt2_dir), "--data", str(data), "--task", "mc", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"qatune: error: {data}:2: invalid encoding: not UTF-8 (byte 0xe9 at column 15)\n"
