"""Examples -> token features -> batches: answer-only labels, dynamic padding, packing (pure torch, no model).

Conventions (docs/DESIGN.md): labels are aligned with `input_ids` and the loss shifts them (position t predicts
`labels[t+1]`); -100 is ignored. A feature is the prompt format's segments, tokenised one by one (`prompts.py`:
plain `prompt tokens + " {answer}" tokens + EOS`, or the chat template's turns), with labels on the answers only
(`answer_only=True`), so that generation fed the prompt alone continues exactly as in training.

Batch order is a pure function of (features, seed, epoch): the trainer resumes mid-epoch by calling
`batches(..., epoch=e, skip=k)`, which yields exactly the batches that a full pass would yield after the
first k. Packing is sequential (greedy in data order, a new row when the next example does not fit), so it
keeps the (shuffled) order and needs no global sort.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from qatune.data.prompts import PromptFormat, TemplateError
from qatune.data.readers import DataReport, QAExample

IGNORE_INDEX = -100
PAD_DOC_ID = -1


@dataclass
class Feature:
    """One tokenised example; `source` points back to the data file for messages."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_example(
    tokenizer: Any, ex: QAExample, fmt: PromptFormat, max_length: int, answer_only: bool = True
) -> Feature | None:
    """Tokenise the format's segments separately (as generation sees the prompt) and label the trained ones;
    the plain format appends EOS, the chat template ends its turns itself.

    Too long: tokens are cut on the LEFT (the question's end and the answer survive) and the feature is marked
    truncated. None when the last trained segment leaves no room for at least one token before it, since then
    the answer's first token could not be predicted from anything.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TemplateError("the tokenizer has no eos_token_id; qatune ends every completion with it")
    pieces = [(tokenizer.encode(text, add_special_tokens=False), label) for text, label in fmt.segments(ex)]
    if fmt.append_eos:
        pieces[-1] = (pieces[-1][0] + [eos], pieces[-1][1])
    input_ids = [t for ids, _ in pieces for t in ids]
    labels = [t if label or not answer_only else IGNORE_INDEX for ids, label in pieces for t in ids]
    cut = len(input_ids) - max_length
    if cut > 0:
        if cut >= len(input_ids) - len(pieces[-1][0]):
            return None
        input_ids, labels = input_ids[cut:], labels[cut:]
    return Feature(input_ids, labels, cut > 0, ex.source)


def encode_dataset(
    tokenizer: Any,
    examples: Iterable[QAExample],
    fmt: PromptFormat,
    max_length: int,
    answer_only: bool = True,
    report: DataReport | None = None,
) -> list[Feature]:
    """Encode every example; truncated and dropped (too long) ones are counted in `report` with their sources."""
    features = []
    for ex in examples:
        feature = encode_example(tokenizer, ex, fmt, max_length, answer_only)
        if feature is None:
            if report is not None:
                report.note_dropped(ex.source)
            continue
        if feature.truncated and report is not None:
            report.note_truncated(ex.source)
        features.append(feature)
    return features


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def label_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where the loss is computed, found once on the host so that the training step has no data-dependent shape
    and no host sync: `loss_positions`, the flat indices (into the `[B * T]` positions) of the positions that
    predict a label (position t predicts `labels[t + 1]`), in row-major order, and `loss_targets`, those labels.
    `collate` and `collate_packed` add them; a batch built by hand adds `**label_positions(labels)`."""
    keep = labels[:, 1:] != IGNORE_INDEX
    rows, cols = keep.nonzero(as_tuple=True)
    return {"loss_positions": rows * labels.shape[1] + cols, "loss_targets": labels[:, 1:][keep]}


def collate(
    features: Sequence[Feature],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Dynamic padding to the longest feature: `input_ids`, `labels` (-100 on pads), `attention_mask`
    (1 = real) and `position_ids` (real tokens 0..n-1 whatever the side, pads 0), all [B, T] long; and the
    loss's `loss_positions` and `loss_targets` (`label_positions`).

    A row's first real label is set to -100, as for packed documents: nothing real precedes it, and with left
    padding the shifted loss would otherwise train a pad to predict it."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = _round_up(max(len(f) for f in features), pad_to_multiple_of)
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": [], "position_ids": []}
    for f in features:
        n = len(f)
        real = {
            "input_ids": f.input_ids,
            "labels": [IGNORE_INDEX] + f.labels[1:],
            "attention_mask": [1] * n,
            "position_ids": list(range(n)),
        }
        pads = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}
        for key, values in real.items():
            padding = [pads[key]] * (width - n)
            rows[key].append(values + padding if padding_side == "right" else padding + values)
    batch = {key: torch.tensor(value, dtype=torch.long) for key, value in rows.items()}
    return batch | label_positions(batch["labels"])


def pack(features: Sequence[Feature], max_length: int) -> list[list[Feature]]:
    """Sequential greedy packing: fill a row in data order, start a new one when the next feature does not fit.

    Deterministic and order-preserving (unlike first-fit decreasing), so shuffling before packing is what
    varies the rows between epochs.
    """
    rows = _pack_indices(range(len(features)), [len(f) for f in features], max_length)
    return [[features[i] for i in row] for row in rows]


def _pack_indices(order: Iterable[int], lengths: Sequence[int], max_length: int) -> list[list[int]]:
    rows: list[list[int]] = []
    used = max_length  # forces a first row
    for i in order:
        if lengths[i] > max_length:
            raise ValueError(f"feature {i} has {lengths[i]} tokens, more than max_length={max_length}")
        if used + lengths[i] > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += lengths[i]
    return rows


def collate_packed(
    rows: Sequence[Sequence[Feature]], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Packed rows -> `input_ids`, `labels`, `position_ids` (restart at 0 per document), `doc_ids` (0.. per row,
    -1 on padding), `attention_mask`, all [B, T] long, right-padded to the longest row; and the loss's
    `loss_positions` and `loss_targets` (`label_positions`).

    Each document's first label is -100 so that no document learns to predict the next one; `collate` does
    the same to each row, which keeps packed and unpacked losses equal.
    """
    width = _round_up(max(sum(len(f) for f in row) for row in rows), pad_to_multiple_of)
    keys = ("input_ids", "labels", "position_ids", "doc_ids", "attention_mask")
    out: dict[str, list[list[int]]] = {k: [] for k in keys}
    for row in rows:
        ids, labels, positions, docs = [], [], [], []
        for doc, f in enumerate(row):
            ids += f.input_ids
            labels += [IGNORE_INDEX] + f.labels[1:]
            positions += range(len(f))
            docs += [doc] * len(f)
        n, pad = len(ids), width - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["labels"].append(labels + [IGNORE_INDEX] * pad)
        out["position_ids"].append(positions + [0] * pad)
        out["doc_ids"].append(docs + [PAD_DOC_ID] * pad)
        out["attention_mask"].append([1] * n + [0] * pad)
    batch = {key: torch.tensor(value, dtype=torch.long) for key, value in out.items()}
    return batch | label_positions(batch["labels"])


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    packing: bool = False,
    max_length: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
) -> list[list[list[int]]]:
    """The epoch's batches as feature indices: batch -> row -> indices (one index per row unless packing).

    A batch is `batch_size` examples, packed or not: packing puts a batch's examples into as few rows of
    `max_length` tokens as they fit in, so it removes padding without changing how many examples an optimizer
    step sees (a prompt format with shorter rows would otherwise train on more examples per step, and take
    fewer steps per epoch, than a longer one). A pure function of its arguments, so any batch can be recomputed
    on resume. The shuffle seed is the string "seed:epoch" (stable across runs, unlike hash-based seeds).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    if packing:
        if max_length is None:
            raise ValueError("packing needs max_length")
        return [_pack_indices(order[i : i + batch_size], lengths, max_length)
                for i in range(0, len(order), batch_size)]
    rows = [[i] for i in order]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def batches(
    features: Sequence[Feature],
    batch_size: int,
    *,
    pad_id: int,
    packing: bool = False,
    max_length: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    skip: int = 0,
    pad_to_multiple_of: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of one epoch; `skip=k` resumes after the first k batches without collating them.

    Packed batches carry `doc_ids`; unpacked ones are right-padded (see `collate`).
    """
    plan = plan_batches(
        [len(f) for f in features], batch_size, packing=packing, max_length=max_length,
        shuffle=shuffle, seed=seed, epoch=epoch,
    )
    return collate_plan(features, plan, pad_id=pad_id, packing=packing, skip=skip,
                        pad_to_multiple_of=pad_to_multiple_of)


def collate_plan(
    features: Sequence[Feature],
    plan: list[list[list[int]]],
    *,
    pad_id: int,
    packing: bool,
    skip: int = 0,
    pad_to_multiple_of: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collate the batches of a `plan_batches` plan, lazily, from batch `skip` on."""
    for batch in plan[skip:]:
        if packing:
            yield collate_packed([[features[i] for i in row] for row in batch], pad_id, pad_to_multiple_of)
        else:
            yield collate([features[row[0]] for row in batch], pad_id, pad_to_multiple_of)


class TokenCounts(NamedTuple):
    label_tokens: int  # tokens the loss is computed on
    real_tokens: int  # non-padding tokens


def count_tokens(batch: dict[str, torch.Tensor]) -> TokenCounts:
    """Tokens trained on and tokens processed. Label tokens skip column 0, which the shifted loss never
    uses, so the count equals the loss denominator for packed and unpacked batches alike."""
    label_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return TokenCounts(label_tokens, int(batch["attention_mask"].sum()))


def padding_efficiency(batch_iter: Iterable[dict[str, torch.Tensor]]) -> float:
    """Fraction of the computed positions that are real tokens (1.0 = no padding wasted)."""
    real = total = 0
    for batch in batch_iter:
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return real / total if total else 1.0


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch as model inputs on `device`. Right padding never changes earlier tokens under a causal
    mask, so unpacked batches drop the attention mask and keep SDPA on its fused causal path."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()
            if not (k == "attention_mask" and "doc_ids" not in batch)}
