"""Multiple-choice evaluation (`qatune eval --task mc`): which choice does the model find most likely?

Data: JSONL, one item per line (blank lines are skipped). llm-foundry's format, in which ARC-Easy and PIQA of
../shared/data/mc come:

    {"query": "Question: Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"], "gold": 1}

and, for your own sets, a friendlier variant:

    {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"], "answer": 1}

- `query` is used verbatim; `question` becomes `"Question: {question}"` (the shape of llm-foundry's queries);
  one of the two is required.
- `choices`: a list of at least 2 non-empty strings.
- the correct choice: `gold`, `answer` or `label` (the first present, in that order), a 0-based index into
  `choices`; `answer` may also be the text of exactly one of the choices.
- the file is UTF-8 JSON Lines, read strictly (`qatune.data.textfiles`): a key twice in a record is an error.
A record that breaks a rule is a `DataError` naming `file:line` and the field.

Scoring, as lm-eval-harness scores multiple choice (and llm-foundry builds the prompt): for each choice, the
context is `query + delimiter` (default `"\\nAnswer: "`, llm-foundry's continuation delimiter for these tasks)
and the continuation is the choice text; its score is the summed log-probability of the continuation's tokens
given the context (teacher forcing). Two predictions per item:
- `acc`: the choice with the highest summed log-probability;
- `acc_norm`: the highest log-probability per UTF-8 byte of the choice text. lm-eval-harness divides by the
  choice's length in characters; for ASCII text (all of ARC-Easy and PIQA here) bytes and characters are the
  same count, so the two agree; elsewhere "per byte" is the tokenizer-independent unit the issue asks for.
Ties go to the first choice (numpy's argmax, as lm-eval-harness).

Tokenisation follows lm-eval-harness's `_encode_pair`: trailing whitespace of the context moves onto the
continuation (`"...\\nAnswer:"` + `" Paris"`), because BPE tokenizers attach a space to the word after it; the
context is encoded alone, the continuation tokens are those of `encode(context + continuation)` after the
context's token count, and the model reads context tokens + continuation tokens. No special tokens are added
(lm-eval-harness's default for causal LMs: GPT-2 adds no BOS, SmolLM2's tokenizer has `add_bos_token` false).
A context too long for the model loses its first tokens, as in lm-eval-harness, but by the same count for
every choice (the longest choice decides; lm-eval-harness truncates per choice): items so cut are counted in
`truncated` (none of ARC-Easy or PIQA with SmolLM2's 8,192 positions, nor with GPT-2's 1,024).

Speed: the choices of an item share their context, so it runs through the model once and its keys/values are
reused for every choice (a KV cache expanded per choice); the LM head runs only where a continuation token is
predicted; items are batched by length. Results: `metrics.json` and `predictions.jsonl` (one row per item,
with each choice's log-probability and the per-item correctness a paired bootstrap needs).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qatune.data.textfiles import parse_json_line, utf8_lines
from qatune.errors import ConfigError, DataError
from qatune.generation.runs import load_for_inference
from qatune.models.decoder import Decoder, KVCache
from qatune.runs.layout import EvalDir, RunDir
from qatune.utils.console import ProgressBar

DEFAULT_DELIMITER = "\nAnswer: "
GOLD_KEYS = ("gold", "answer", "label")


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: the prompt (`query`), the choices and the index of the correct one."""

    query: str
    choices: tuple[str, ...]
    gold: int
    source: str = ""  # file:line


# ------------------------------------------------------------------------------------------------ reading


def load_mc(path: str | os.PathLike, *, max_examples: int | None = None) -> list[MCItem]:
    """The items of a multiple-choice JSONL file (the first `max_examples`), validated (see the module doc)."""
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples must be at least 1, got {max_examples}")
    items: list[MCItem] = []
    for source, line in utf8_lines(path):  # a regular UTF-8 file; a bad line is a DataError naming it
        if max_examples is not None and len(items) >= max_examples:
            break
        if isinstance(line, DataError):
            raise line
        items.append(parse_mc_record(parse_json_line(line, source), source))
    if not items:
        raise DataError(f"{path}: no multiple-choice items")
    return items


def parse_mc_record(record: Any, source: str) -> MCItem:
    """One record -> `MCItem`; a `DataError` naming `source` (file:line) and the field otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{source}: invalid record: expected a JSON object, got {type(record).__name__}")
    choices = _choices(record, source)
    return MCItem(_query(record, source), choices, _gold(record, choices, source), source)


def _missing(record: dict[str, Any], source: str, *names: str) -> DataError:
    has = ", ".join(repr(k) for k in record) or "none"
    alternatives = f" (or {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""
    return DataError(f"{source}: missing field {names[0]!r}{alternatives}: the record has fields {has}")


def _query(record: dict[str, Any], source: str) -> str:
    key = "query" if "query" in record else "question" if "question" in record else None
    if key is None:
        raise _missing(record, source, "query", "question")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{source}: invalid field {key!r}: expected non-empty text, got {value!r:.60}")
    return value if key == "query" else f"Question: {value}"


def _choices(record: dict[str, Any], source: str) -> tuple[str, ...]:
    if "choices" not in record:
        raise _missing(record, source, "choices")
    value = record["choices"]
    if not isinstance(value, list):
        raise DataError(f"{source}: invalid field 'choices': expected a list of strings, got {type(value).__name__}")
    if len(value) < 2:
        raise DataError(f"{source}: invalid field 'choices': expected at least 2 choices, got {len(value)}")
    for i, choice in enumerate(value):
        if not isinstance(choice, str) or not choice:
            raise DataError(f"{source}: invalid field 'choices' [{i}]: expected non-empty text, got {choice!r:.60}")
    return tuple(value)


def _gold(record: dict[str, Any], choices: tuple[str, ...], source: str) -> int:
    key = next((k for k in GOLD_KEYS if k in record), None)
    if key is None:
        raise _missing(record, source, *GOLD_KEYS)
    value = record[key]
    if key == "answer" and isinstance(value, str):
        matches = [i for i, c in enumerate(choices) if c == value]
        if len(matches) != 1:
            raise DataError(f"{source}: invalid field 'answer': {value!r:.60} is not exactly one of the choices")
        return matches[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{source}: invalid field {key!r}: expected a choice index (int), got {value!r:.60}")
    if not 0 <= value < len(choices):
        raise DataError(f"{source}: invalid field {key!r}: index {value} out of range for {len(choices)} choices")
    return value


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class _Encoded:
    """An item's token ids: the shared context, and each choice's continuation tokens."""

    context: list[int]
    continuations: list[list[int]]
    truncated: bool = False


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval-harness's `_encode_pair`: (context tokens, continuation tokens), no special tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "Answer: " + "X" -> "Answer:" + " X": the space belongs to the word's token in BPE
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


def _encode_item(tokenizer, item: MCItem, delimiter: str, max_positions: int) -> _Encoded:
    pairs = [encode_pair(tokenizer, item.query + delimiter, choice) for choice in item.choices]
    context = pairs[0][0]  # the same for every choice: it depends on the context text only
    if not context:  # nothing to condition on (lm-eval-harness would start from EOS; the reader never allows it)
        raise DataError(f"{item.source or item.query!r}: empty context: the query is blank")
    continuations = [cont for _, cont in pairs]
    if not all(continuations):  # a merge across the boundary swallowed the choice: fall back to encoding it alone
        continuations = [cont or tokenizer(ch, add_special_tokens=False)["input_ids"]
                         for cont, ch in zip(continuations, item.choices)]
    # The model reads context + continuation[:-1]; keep it within the model's positions by dropping the context's
    # first tokens (lm-eval-harness truncates on the left too).
    budget = max_positions + 1 - max(len(c) for c in continuations)
    if budget < 1:
        raise DataError(f"{item.source}: a choice is longer than the model's {max_positions} positions")
    return _Encoded(context[-budget:], continuations, truncated=len(context) > budget)


def _right_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _score_batch(model: Decoder, batch: list[_Encoded], pad_id: int) -> list[list[float]]:
    """Summed continuation log-probabilities, per item and choice. The contexts run once (right padding needs no
    mask under causal attention); each choice then continues from its item's cached keys/values."""
    device = next(model.parameters()).device
    ctx_len = torch.tensor([len(e.context) for e in batch], device=device)
    cache = KVCache(model.config.n_layer)
    hidden = model.hidden_states(_right_pad([e.context for e in batch], pad_id, device), kv_cache=cache)
    conts = [c for e in batch for c in e.continuations]
    item = torch.tensor([i for i, e in enumerate(batch) for _ in e.continuations], device=device)
    states = hidden[item, ctx_len[item] - 1][:, None]  # the last context state predicts each first token
    width = max(len(c) for c in conts) - 1  # the last continuation token is predicted, never read
    if width > 0:
        cache.reorder(item)
        ids = _right_pad([c[:-1] for c in conts], pad_id, device)
        past = torch.arange(cache.length, device=device) < ctx_len[item, None]  # hide the contexts' padding
        mask = torch.cat((past, torch.ones_like(ids, dtype=torch.bool)), dim=1)
        positions = ctx_len[item, None] + torch.arange(ids.shape[1], device=device)
        # a short row's padding may run past the last position (learned position tables end there); its states
        # are never read, so any valid position does
        positions = positions.clamp(max=model.config.max_positions - 1)
        rest = model.hidden_states(ids, kv_cache=cache, attention_mask=mask, position_ids=positions)
        states = torch.cat((states, rest), dim=1)
    lengths = torch.tensor([len(c) for c in conts], device=device)
    keep = torch.arange(states.shape[1], device=device) < lengths[:, None]
    targets = _right_pad(conts, pad_id, device)[keep]
    logprobs = F.log_softmax(model.lm_head(states[keep]).float(), dim=-1).gather(1, targets[:, None])[:, 0]
    sums = iter(torch.split(logprobs, lengths.tolist()))
    return [[float(next(sums).sum()) for _ in e.continuations] for e in batch]


def score_multiple_choice(model: Decoder, tokenizer, items: list[MCItem], *, delimiter: str = DEFAULT_DELIMITER,
                          batch_size: int = 16, progress: bool = False) -> list[dict[str, Any]]:
    """Score every choice of every item with a loaded model; one predictions row per item, in input order
    (`mc_metrics` turns them into the aggregate). `batch_size` counts items (each brings all its choices)."""
    encoded = [_encode_item(tokenizer, item, delimiter, model.config.max_positions) for item in items]
    # Longest first (memory peaks at once), by longest choice then context: the choices' pass pads every row of a
    # batch to its longest choice and holds most of the rows, so it decides the padding (ARC-Easy and PIQA with
    # SmolLM2: 1.28x and 1.16x the real tokens at 16 items a batch, against 1.83x and 1.31x by total length).
    order = sorted(range(len(items)), key=lambda i: (-max(map(len, encoded[i].continuations)),
                                                     -len(encoded[i].context)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: dict[int, list[float]] = {}
    model.eval()
    with torch.inference_mode(), ProgressBar("mc", len(items), enabled=progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            scores.update(zip(chunk, _score_batch(model, [encoded[i] for i in chunk], pad_id)))
            bar.advance(len(chunk))
    return [_row(item, scores[i], encoded[i]) for i, item in enumerate(items)]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, as numpy's argmax


def _row(item: MCItem, logprobs: list[float], encoded: _Encoded) -> dict[str, Any]:
    per_byte = [lp / max(1, len(choice.encode("utf-8"))) for lp, choice in zip(logprobs, item.choices)]
    pred_acc, pred_norm = _argmax(logprobs), _argmax(per_byte)
    return {"query": item.query, "choices": list(item.choices), "gold": item.gold, "logprobs": logprobs,
            "per_byte": per_byte, "tokens": [len(c) for c in encoded.continuations], "truncated": encoded.truncated,
            "pred_acc": pred_acc, "pred_norm": pred_norm,
            "correct_acc": pred_acc == item.gold, "correct_norm": pred_norm == item.gold}


# ------------------------------------------------------------------------------------------------ results


def _stderr(values: list[bool]) -> float | None:
    """Standard error of a mean of 0/1 outcomes, with the sample standard deviation (as lm-eval-harness)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def mc_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`acc`, `acc_norm` and their standard errors from predictions rows (so they can be recomputed from them)."""
    acc, norm = [r["correct_acc"] for r in rows], [r["correct_norm"] for r in rows]
    return {"items": len(rows), "acc": sum(acc) / len(rows), "acc_stderr": _stderr(acc),
            "acc_norm": sum(norm) / len(rows), "acc_norm_stderr": _stderr(norm),
            "choices": sum(len(r["choices"]) for r in rows), "truncated": sum(r["truncated"] for r in rows)}


def evaluate_multiple_choice(
    source: str | os.PathLike,
    data: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
    batch_size: int = 16,
    delimiter: str = DEFAULT_DELIMITER,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`qatune eval SOURCE --data FILE --task mc`: a model source or a run directory scored on a multiple-choice
    file; returns the metrics and writes `metrics.json` + `predictions.jsonl` to `out_dir` (default
    `RUN_DIR/eval-mc-<data file stem>` for a run directory; nothing written for a bare model without one)."""
    start = time.perf_counter()
    items = load_mc(data, max_examples=max_examples)
    model, tokenizer = load_for_inference(source, device=device)
    rows = score_multiple_choice(model, tokenizer, items, delimiter=delimiter, batch_size=batch_size,
                                 progress=progress)
    metrics = {"task": "mc", "source": str(source), "data": str(data), **mc_metrics(rows),
               "delimiter": delimiter, "eval_time_s": time.perf_counter() - start}
    run = RunDir(source)
    out = EvalDir(Path(out_dir)) if out_dir is not None else (
        run.eval_named(f"mc-{Path(data).stem}") if run.config.is_file() else None)
    if out is not None:
        out.write(metrics, rows)  # predictions first, metrics.json last: its presence means the evaluation is complete
    return metrics
