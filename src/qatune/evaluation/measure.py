"""`evaluate(source, data)`: a model or a run directory, measured on held-out data.

Two measurements, because they answer different questions:
- teacher-forced loss and perplexity on the answers (answer-only, exactly the quantity training's validation
  loss reports, so test and validation numbers are comparable);
- what the model actually generates, scored as QA (SQuAD EM and token F1 against the answer and its aliases)
  or as NLG (the E2E metric suite against every reference of an input, generating once per distinct input,
  as the E2E challenge and the LoRA paper do).

Results go to `metrics.json` (the aggregate) and `predictions.jsonl` (one row per scored input, with its own
scores), so that every number in `metrics.json` can be recomputed from `predictions.jsonl`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qatune.data.batching import encode_dataset
from qatune.data.prompts import DEFAULT_TEMPLATE, PromptFormat, make_prompt_format
from qatune.data.readers import (
    DataReport,
    QAExample,
    group_references,
    load_examples,
    resolve_data,
    split_train_val,
)
from qatune.errors import ConfigError, DataError
from qatune.evaluation.loss import evaluate_loss
from qatune.evaluation.metrics import bleu, generation_scores, per_example_qa, qa_scores, rouge_l
from qatune.generation.answer import answer_questions
from qatune.generation.decode import GenerationConfig
from qatune.generation.runs import load_for_inference, run_data_section
from qatune.models.decoder import Decoder
from qatune.publish.model_card import write_model_card
from qatune.runs.layout import EvalDir, RunDir
from qatune.utils.console import ProgressBar

TASKS = ("auto", "qa", "nlg")
_DEFAULT_MAX_LENGTH = 512  # the training default (RunConfig.data.max_length)


def resolve_task(task: str, fmt: str, data: str) -> str:
    """`auto`: E2E files (format `e2e`, or a `.txt` file under format `auto`) are NLG, everything else QA."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if task != "auto":
        return task
    is_e2e = fmt == "e2e" or (fmt == "auto" and Path(resolve_data(data)).suffix.lower() == ".txt")
    return "nlg" if is_e2e else "qa"


def evaluate(
    source: str | os.PathLike,
    data: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    template: str | None = None,
    prompt_format: str | None = None,
    shots: Sequence[QAExample] = (),
    generation: GenerationConfig | None = None,
    batch_size: int = 16,
    max_examples: int | None = None,
    task: str = "auto",
    fmt: str = "auto",
    max_length: int | None = None,
    loss: bool = True,
    split: tuple[float, int] | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model source or a qatune run directory on `data`; returns (and writes) the metrics.

    `prompt_format` (auto | plain | chat), `template` and `max_length` (for the loss) default to the run's own
    (a run dir): a run is measured the way it was trained; for a model, to `auto` (the model's own chat
    format when its tokenizer has one), the QA default template and 512. `shots`: solved examples put before
    every question (few-shot prompting; the loss is then not computed). `max_examples` keeps the first N
    examples (QA) or the first N distinct inputs (NLG). `out_dir` defaults to `RUN_DIR/eval` for a run
    directory; for a bare model nothing is written unless `out_dir` is given. `loss=False` skips the loss:
    on a slow machine it can cost as much as generating, and training's validation loss measures the same.
    `split=(val_fraction, seed)`: only the questions a training on `data` holds out for validation.
    """
    start = time.perf_counter()
    run = run_data_section(source)
    template, prompt_format, max_length = _run_defaults(run, template, prompt_format, max_length)
    generation = generation or GenerationConfig(max_new_tokens=32)
    data_path = resolve_data(data)
    task = resolve_task(task, fmt, data_path)
    examples, inputs = _read(data_path, fmt, task, max_examples, split)
    _refuse_links(source, run is not None, out_dir)
    model, tokenizer = load_for_inference(source, device=device)
    style = make_prompt_format(prompt_format, template, tokenizer)
    losses: dict[str, Any] = {"loss": None, "perplexity": None, "loss_examples": 0}
    if loss and not shots:
        losses = _answer_loss(model, tokenizer, examples, style, max_length, batch_size)
    predictions = _generate(model, tokenizer, inputs, style, shots, generation, batch_size, progress)
    rows, scores = _score(task, inputs, predictions)
    metrics = {
        "task": task, "source": str(source), "data": data_path, "examples": len(examples), "inputs": len(inputs),
        "split": list(split) if split else None, **losses, **scores, "prompt_format": style.name,
        "template": template, "shots": len(shots), "generation": dataclasses.asdict(generation),
        "eval_time_s": time.perf_counter() - start,
    }
    _save(source, run is not None, out_dir, metrics, rows)
    return metrics


def _run_defaults(run: dict[str, Any] | None, template: str | None, prompt_format: str | None,
                  max_length: int | None) -> tuple[str, str, int]:
    """A run is measured the way it was trained (its `data` section's template, prompt format, max_length);
    a model with the QA default template, its own format (auto) and 512 tokens. Given values win."""
    run = run or {}
    return (template or run.get("template") or DEFAULT_TEMPLATE, prompt_format or run.get("prompt_format") or "auto",
            max_length or run.get("max_length") or _DEFAULT_MAX_LENGTH)


def _refuse_links(source: str | os.PathLike, is_run: bool, out_dir: str | os.PathLike | None) -> None:
    """Before the work: a run's figures (`eval/`) and card (in its result folder) are written inside the run,
    never through a symbolic link (`RunDir.refuse_links`)."""
    if is_run:
        run = RunDir(source)
        run.refuse_links(*(p for p in (run.result, run.eval.path if out_dir is None else None) if p is not None))


def _save(source: str | os.PathLike, is_run: bool, out_dir: str | os.PathLike | None, metrics: dict[str, Any],
          rows: list[dict[str, Any]]) -> None:
    """To `out_dir`, else a run's `eval/` (a bare model without `out_dir` writes nothing); a run's model card
    then shows the new figures."""
    out = EvalDir(Path(out_dir)) if out_dir is not None else (RunDir(source).eval if is_run else None)
    if out is not None:
        out.write(metrics, rows)
    if is_run:
        write_model_card(source)


def _read(data_path: str, fmt: str, task: str, max_examples: int | None,
          split: tuple[float, int] | None) -> tuple[list[QAExample], list[QAExample]]:
    """The examples to evaluate; with `split=(val_fraction, seed)` only the validation questions that a training
    with `data.train=data_path` and that fraction and seed holds out (`split_train_val`): the questions its
    evaluations answer."""
    report = DataReport()
    examples = load_examples(data_path, fmt=fmt, report=report)
    if split is not None:
        examples = split_train_val(examples, *split)[1]
    examples, inputs = _inputs(examples, task, max_examples)
    if not examples:
        raise DataError(f"no examples to evaluate in {data_path} ({report.summary()})")
    return examples, inputs


def generation_metrics(model: torch.nn.Module, tokenizer, examples: list[QAExample], prompt_format: PromptFormat,
                       task: str = "qa") -> dict[str, float]:
    """Generation quality during training (`train.eval_generate`): `em`/`f1` (QA) or the NLG metrics.

    The keys are what `train.early_stop_metric` reads, and `generate_s`, the seconds this took (what selecting
    on answers costs). Greedy decoding, on the model's own device, as the quick in-training signal it is meant
    to be.
    """
    if not isinstance(model, Decoder):
        raise ConfigError("train.eval_generate needs backend=native (generation runs on qatune's Decoder)")
    start = time.perf_counter()
    _, inputs = _inputs(examples, task, None)
    predictions = _generate(model, tokenizer, inputs, prompt_format, (), validation_generation(task), batch_size=16,
                            progress=False)
    _, scores = _score(task, inputs, predictions)
    return {k: v for k, v in scores.items() if isinstance(v, float)} | {"generate_s": time.perf_counter() - start}


def validation_generation(task: str) -> GenerationConfig:
    """How validation questions are answered, in training (`train.eval_generate`) and for the baselines a sweep
    compares with it: greedy, 32 new tokens for QA, 64 for NLG."""
    return GenerationConfig(max_new_tokens=64 if task == "nlg" else 32)


def _inputs(examples: list[QAExample], task: str, max_examples: int | None
            ) -> tuple[list[QAExample], list[QAExample]]:
    """(the examples evaluated, the inputs generated for): for QA one input per example; for NLG one per
    distinct input, its references every answer given for it (multi-reference BLEU)."""
    if task != "nlg":
        examples = examples[:max_examples]
        return examples, examples
    groups = group_references(examples)[:max_examples]
    kept = {question for question, _ in groups}
    inputs = [QAExample(question=q, answer=refs[0], aliases=refs) for q, refs in groups]
    return [ex for ex in examples if ex.question in kept], inputs


# ------------------------------------------------------------------------------------------------ steps


def _answer_loss(model: Decoder, tokenizer, examples: list[QAExample], style: PromptFormat, max_length: int,
                 batch_size: int) -> dict[str, Any]:
    """Teacher-forced answer-only loss with training's own evaluation loop (`evaluation.loss.evaluate_loss`)."""
    report = DataReport()
    features = encode_dataset(tokenizer, examples, style, max_length, answer_only=True, report=report)
    if not features:  # every example longer than max_length
        return {"loss": None, "perplexity": None, "loss_examples": 0}
    device = next(model.parameters()).device
    loss = evaluate_loss(model, features, batch_size=batch_size, pad_id=tokenizer.pad_token_id, device=device)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "loss_examples": len(features)}


def _generate(model: Decoder, tokenizer, inputs: list[QAExample], style: PromptFormat, shots: Sequence[QAExample],
              config: GenerationConfig, batch_size: int, progress: bool) -> list[str]:
    """Answers in input order. Inputs are batched by length, which wastes less on left padding and changes no
    answer (the model takes positions from the attention mask); a progress bar on stderr."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i].question))
    answers: dict[int, str] = {}
    with ProgressBar("generate", len(inputs), enabled=progress) as bar:
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            outputs = answer_questions(model, tokenizer, [inputs[j] for j in chunk], prompt_format=style,
                                       config=config, shots=shots, batch_size=batch_size)
            answers.update(zip(chunk, outputs))
            bar.advance(len(chunk))
    return [answers[i] for i in range(len(inputs))]


def _score(task: str, inputs: list[QAExample], predictions: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """predictions.jsonl rows (with per-input scores) and the aggregate scores."""
    rows = []
    references = [ex.aliases for ex in inputs]
    for ex, pred, refs in zip(inputs, predictions, references):
        if task == "nlg":  # sentence-level BLEU / ROUGE-L: for reading the rows; corpus scores are the result
            own = {"bleu": bleu([pred], [refs]), "rouge_l": rouge_l([pred], [refs])}
        else:
            own = per_example_qa(pred, refs)
        rows.append({"input": ex.question, "prediction": pred, "references": refs, "scores": own})
    scores = generation_scores(predictions, references) if task == "nlg" else qa_scores(predictions, references)
    return rows, scores
