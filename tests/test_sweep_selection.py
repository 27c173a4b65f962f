"""A QA sweep picks on answers: F1 of the validation answers by default, the union of grids, and baselines asked in
every prompt format the model has, scored on the same validation questions the trainings answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from qatune.compare.run import _drop_missing_chat, _shots, prepare, select
from qatune.compare.sweep import load_sweep
from qatune.data.readers import SAMPLE_DATA, load_examples, split_train_val
from qatune.errors import ConfigError
from qatune.evaluation.measure import evaluate


def _write_sweep(tmp_path: Path, **keys) -> Path:
    sweep = {"models": ["m"], "methods": ["lora"], "ranks": [8], "seeds": [0], "eval": {"data": "sample-test"}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep | keys))
    return path


def _write_run(out: Path, name: str, evals: list[dict]) -> None:
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"event": "eval", **e}) + "\n" for e in evals))


def test_a_qa_sweep_picks_the_best_answers_where_the_loss_disagrees(tmp_path):
    """lr 1e-3 has the lowest validation loss, lr 3e-3 the best validation F1: the F1 pick wins, and the
    selection record shows both numbers for every point."""
    sweep = load_sweep(_write_sweep(tmp_path, grid={"lora": {"train.lr": [1e-4, 1e-3, 3e-3]}}))
    assert sweep.select_metric == "f1"  # not set: a QA test set selects on F1
    out = tmp_path / "out"
    low, mid, high = sweep.candidates()
    _write_run(out, low.name, [{"step": 1, "val_loss": 2.4, "f1": 10.0}, {"step": 2, "val_loss": 2.3, "f1": 12.0}])
    _write_run(out, mid.name, [{"step": 1, "val_loss": 2.1, "f1": 20.0}, {"step": 2, "val_loss": 2.0, "f1": 18.0}])
    _write_run(out, high.name, [{"step": 1, "val_loss": 2.2, "f1": 31.0}, {"step": 2, "val_loss": 2.5, "f1": 25.0}])
    assert select(sweep, out) == {("m", "lora", 8): (("train.lr", 3e-3),)}
    record = json.loads((out / "selection.json").read_text())
    assert record["metric"] == "f1" and record["picked"] == [high.name]
    assert [(c["val_loss"], c["f1"]) for c in record["candidates"]] == [(2.3, 12.0), (2.0, 20.0), (2.2, 31.0)]

    by_loss = load_sweep(_write_sweep(tmp_path, grid={"lora": {"train.lr": [1e-4, 1e-3, 3e-3]}},
                                      select={"metric": "val_loss"}))
    assert select(by_loss, out) == {("m", "lora", 8): (("train.lr", 1e-3),)}


def test_selecting_on_answers_makes_every_training_answer_its_validation_questions(tmp_path):
    sweep = load_sweep(_write_sweep(tmp_path, select={"examples": 50}))
    config = sweep.train_config(sweep.candidates()[0], tmp_path / "run")
    assert config["train"]["eval_generate"] == 50 and config["train"]["early_stop_metric"] == "f1"
    own = load_sweep(_write_sweep(tmp_path, base={"train": {"eval_generate": 7, "early_stop_metric": "em"}}))
    config = own.train_config(own.candidates()[0], tmp_path / "run")  # what the user wrote wins
    assert config["train"]["eval_generate"] == 7 and config["train"]["early_stop_metric"] == "em"
    nlg = load_sweep(_write_sweep(tmp_path, eval={"data": "data.txt", "format": "e2e"}))
    assert nlg.select_metric == "val_loss" and "eval_generate" not in nlg.train_config(nlg.candidates()[0],
                                                                                        tmp_path / "run")["train"]


def test_a_grid_list_is_the_union_of_its_grids(tmp_path):
    grid = {"lora": [{"lora.targets": [["q", "v"], ["all-linear"]], "train.lr": [1e-3]},
                     {"lora.targets": [["all-linear"]], "train.lr": [1e-3, 3e-3]}]}
    sweep = load_sweep(_write_sweep(tmp_path, ranks=None, grid=grid))
    points = [dict(p) for p in sweep.grid["lora"]]
    assert points == [{"lora.targets": ("q", "v"), "train.lr": 1e-3},
                      {"lora.targets": ("all-linear",), "train.lr": 1e-3},  # once, though both grids have it
                      {"lora.targets": ("all-linear",), "train.lr": 3e-3}]
    run = sweep.candidates()[0]
    assert run.name == "m-lora-r8-targetsq+v-lr0.001-s0"
    assert sweep.train_config(run, tmp_path / "r")["lora"]["targets"] == ["q", "v"]  # a list again, for YAML
    with pytest.raises(ConfigError, match="empty list"):
        load_sweep(_write_sweep(tmp_path, grid={"lora": []}))


def test_baselines_are_asked_in_each_format_the_model_has(qa_gpt2_dir, tmp_path):
    chatty = tmp_path / "chatty"
    shutil.copytree(qa_gpt2_dir, chatty)
    config = json.loads((chatty / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (chatty / "tokenizer_config.json").write_text(json.dumps(config))
    sweep = load_sweep(_write_sweep(tmp_path, models=[str(qa_gpt2_dir), str(chatty)], zero_shot=True, few_shot=2))
    _drop_missing_chat(sweep)
    names = [run.name for run in sweep.baselines()]
    assert names == [f"{qa_gpt2_dir.name}-zero-shot-plain", f"{qa_gpt2_dir.name}-2-shot-plain",
                     "chatty-zero-shot-plain", "chatty-zero-shot-chat", "chatty-2-shot-plain", "chatty-2-shot-chat"]
    declared = load_sweep(_write_sweep(tmp_path, models=[str(qa_gpt2_dir)], zero_shot=True,
                                       baseline_formats=["chat"]))
    _drop_missing_chat(declared)  # asked for: kept, and refused where the model has no template
    assert [run.prompt_format for run in declared.baselines()] == ["chat"]


def test_baselines_answer_the_validation_questions_of_the_first_seed(qa_gpt2_dir, tmp_path):
    """`split` gives evaluate the questions training holds out, and the k-shot examples never come from them."""
    sweep = load_sweep(_write_sweep(tmp_path, models=[str(qa_gpt2_dir)], seeds=[3, 4], zero_shot=True, few_shot=3,
                                    base={"data": {"train": "sample", "val_fraction": 0.2}}))
    prepare(sweep, tmp_path / "out")
    examples = load_examples(SAMPLE_DATA / "facts_train.jsonl")
    train, val = split_train_val(examples, 0.2, 3)
    assert {ex.question for ex in _shots(sweep)} <= {ex.question for ex in train}
    metrics = evaluate(qa_gpt2_dir, "sample", split=(0.2, 3), loss=False, max_examples=5, progress=False,
                       out_dir=tmp_path / "eval")
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [row["input"] for row in rows] == [ex.question for ex in val[:5]] and metrics["split"] == [0.2, 3]
