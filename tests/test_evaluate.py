"""Evaluation: metrics.json agrees with predictions.jsonl, NLG groups references, early stopping on EM/F1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qatune.cli.commands import main
from qatune.data.prompts import PromptTemplate
from qatune.data.readers import SAMPLE_DATA, group_references, load_examples
from qatune.evaluation.measure import evaluate, generation_metrics, resolve_task
from qatune.evaluation.metrics import generation_scores, qa_scores
from qatune.generation.decode import GenerationConfig
from qatune.training.config import load_config
from qatune.training.recipe import train_model

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
E2E_TEST = SHARED / "data" / "e2e" / "test.txt"


def _read(out: Path) -> tuple[dict, list[dict]]:
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return json.loads((out / "metrics.json").read_text()), rows


def test_qa_metrics_match_predictions(qa_gpt2_dir, tmp_path):
    out = tmp_path / "eval"
    # Through the CLI: the subcommand, its flags and the `sample-test` alias are part of what is tested.
    assert main(["eval", str(qa_gpt2_dir), "--data", "sample-test", "--out", str(out), "--max-examples", "20",
                 "--max-new-tokens", "4"]) == 0
    metrics, rows = _read(out)
    test = load_examples(SAMPLE_DATA / "facts_test.jsonl")[:20]
    assert metrics["task"] == "qa" and metrics["examples"] == len(rows) == 20
    assert [r["input"] for r in rows] == [ex.question for ex in test]
    assert [r["references"] for r in rows] == [ex.aliases for ex in test]
    recomputed = qa_scores([r["prediction"] for r in rows], [r["references"] for r in rows])
    assert metrics["em"] == pytest.approx(recomputed["em"]) and metrics["f1"] == pytest.approx(recomputed["f1"])
    assert metrics["f1"] == pytest.approx(100 * sum(r["scores"]["f1"] for r in rows) / len(rows))
    assert metrics["contains"] == pytest.approx(100 * sum(r["scores"]["contains"] for r in rows) / len(rows))
    assert metrics["answer_length"] == pytest.approx(sum(len(r["prediction"].split()) for r in rows) / len(rows))
    assert metrics["loss"] > 0 and metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item())
    assert metrics["generation"]["max_new_tokens"] == 4


def test_an_answer_that_is_right_scores_right(qa_gpt2_dir, tmp_path, monkeypatch):
    """Scoring path end to end with known answers: the model 'answers' each question's first alias."""
    test = load_examples(SAMPLE_DATA / "facts_test.jsonl")[:6]
    truth = {ex.question: ex.aliases[0] for ex in test}
    import qatune.evaluation.measure as ev

    monkeypatch.setattr(ev, "answer_questions",
                        lambda model, tok, questions, **kw: [truth[q.question] if i % 2 else "wrong" for i, q in
                                                             enumerate(questions)])
    metrics = evaluate(qa_gpt2_dir, "sample-test", out_dir=tmp_path, max_examples=6, batch_size=6)
    _, rows = _read(tmp_path)
    # Batches are ordered by length, so which questions got the right answer is read back from the rows.
    right = sum(r["prediction"] == truth[r["input"]] for r in rows)
    assert right == 3 and metrics["em"] == pytest.approx(50.0)


def test_eval_writes_contains_and_answer_length(qa_gpt2_dir, tmp_path, monkeypatch):
    """Hand-made answers through `qatune eval`'s scoring and files: metrics.json has `contains` (percent) and the
    mean answer length (words); every predictions.jsonl row has its own `contains` (0/1) and length. The expected
    values are written out by hand from the rule (the gold answer as whole words of the normalised answer)."""
    cases = [  # question, gold answer and aliases, the model's answer, contains, words
        ("capital of France?", ["Paris"], "I think it is Paris, France.", 1, 6),
        ("French city?", ["Lyon"], "Paris or Lyon", 1, 3),
        ("Where is the Louvre?", ["Paris"], "Parisian", 0, 1),
        ("Which country?", ["United States of America", "the United States"], "It is the United States.", 1, 5),
        ("Full name?", ["United States of America"], "the United States", 0, 3),
        ("Year?", ["1990"], "in 19901", 0, 2),
        ("How many?", ["1,000"], "About 1000.", 1, 2),
        ("Animal?", ["The Cat"], "cat!", 1, 1),
    ]
    data = tmp_path / "hand.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": gold[0], "aliases": gold}) + "\n"
                            for q, gold, _, _, _ in cases))
    answer_of = {q: answer for q, _, answer, _, _ in cases}
    import qatune.evaluation.measure as ev

    monkeypatch.setattr(ev, "answer_questions", lambda model, tok, questions, **kw: [answer_of[q.question]
                                                                                     for q in questions])
    out = tmp_path / "eval"
    metrics = evaluate(qa_gpt2_dir, data, out_dir=out, loss=False, progress=False)
    written, rows = _read(out)
    assert written["contains"] == metrics["contains"] == pytest.approx(100 * 5 / 8)
    assert written["answer_length"] == pytest.approx((6 + 3 + 1 + 5 + 3 + 2 + 2 + 1) / 8)
    assert written["em"] == pytest.approx(100 * 1 / 8)  # only "cat!": EM judges the sentences wrong
    by_question = {r["input"]: r["scores"] for r in rows}
    for question, _, _, contains, words in cases:
        assert by_question[question]["contains"] == contains, question
        assert by_question[question]["answer_length"] == words, question


def test_demo_before_after_line_shows_contains():
    """`make demo`'s score line: a sentence holding the answer is wrong by EM, half right by F1, right by contains."""
    from qatune.cli.demo import _scores
    from qatune.data.readers import QAExample

    examples = [QAExample("Capital of France?", "Paris", ["Paris"]), QAExample("Capital of Italy?", "Rome", ["Rome"])]
    # "capital is paris" vs "paris": precision 1/3, recall 1, F1 0.5; "Rome": all 1. Lengths 4 and 1 words.
    assert _scores(["The capital is Paris.", "Rome"], examples) == \
        "EM 50.0%, F1 75.0, contains 100.0%, 2.5 words/answer"


def test_nlg_generates_once_per_input_with_grouped_references(qa_gpt2_dir, tmp_path):
    if not E2E_TEST.is_file():
        pytest.skip("../shared/data/e2e not present")
    metrics = evaluate(qa_gpt2_dir, E2E_TEST, out_dir=tmp_path, max_examples=3,
                       generation=GenerationConfig(max_new_tokens=6), template="{question} || {answer}")
    _, rows = _read(tmp_path)
    groups = group_references(load_examples(E2E_TEST))[:3]
    assert metrics["task"] == "nlg" and metrics["inputs"] == 3 == len(rows)
    assert metrics["examples"] == sum(len(refs) for _, refs in groups)
    assert [(r["input"], r["references"]) for r in rows] == [(q, refs) for q, refs in groups]
    recomputed = generation_scores([r["prediction"] for r in rows], [r["references"] for r in rows])
    for key in ("bleu", "rouge_l", "nist", "cider"):
        assert metrics[key] == pytest.approx(recomputed[key])


def test_task_resolution():
    assert resolve_task("auto", "auto", "x/test.txt") == "nlg"
    assert resolve_task("auto", "e2e", "x/test") == "nlg"
    assert resolve_task("auto", "auto", "x/test.jsonl") == "qa"
    assert resolve_task("qa", "e2e", "x/test.txt") == "qa"


def test_early_stopping_on_generated_f1(qa_gpt2_dir, tmp_path):
    """train.eval_generate + early_stop_metric=f1, end to end: every question's answer is "yes", which even a
    tiny random model learns within a few steps, so F1 rises from 0 and then stops improving. Training must
    stop `patience` evaluations after the last improvement and keep that evaluation's step as the best.
    (lr 0.02 suits `qa_gpt2_dir`'s 1024-token vocabulary; with GPT-2's 50257 tokens 0.05 did.)"""
    data = tmp_path / "yes.jsonl"
    questions = [ex.question for ex in load_examples(SAMPLE_DATA / "facts_train.jsonl")[:80]]
    data.write_text("".join(json.dumps({"question": q, "answer": "yes"}) + "\n" for q in questions))
    cfg = load_config(None, [f"model={qa_gpt2_dir}", "method=full", f"data.train={data}", "train.epochs=30",
                             "train.batch_size=8", "train.lr=0.02", "train.schedule=constant", "train.eval_every=1",
                             "train.eval_generate=8", "train.early_stop_metric=f1", "train.patience=4",
                             "train.progress=false", f"out={tmp_path / 'run'}"])
    summary = train_model(cfg)
    events = map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    f1s = [(r["step"], r["f1"]) for r in events if r["event"] == "eval"]
    best = max(range(len(f1s)), key=lambda i: (f1s[i][1], -i))  # improvements are strict: the first maximum
    assert f1s[best][1] > f1s[0][1], f1s  # it did learn
    assert summary["early_stopped"] and len(f1s) == best + 5, f1s  # four evaluations without improvement
    assert summary["best_metric"] == {"f1": f1s[best][1]} and summary["best_step"] == f1s[best][0]


def test_generation_metrics_keys(qa_gpt2_dir):
    from qatune import load_model, load_tokenizer

    model, tok = load_model(qa_gpt2_dir), load_tokenizer(qa_gpt2_dir)
    examples = load_examples(SAMPLE_DATA / "facts_test.jsonl")[:3]
    scores = generation_metrics(model, tok, examples, PromptTemplate("Question: {question}\nAnswer: {answer}"))
    assert set(scores) == {"em", "f1", "contains", "answer_length", "generate_s"} and scores["generate_s"] > 0
