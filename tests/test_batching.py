"""qatune.data.batching: template split, answer-only labels (real GPT-2 tokenizer, and the tokenizer conftest builds),
truncation, padding, packing, and the deterministic batch order the trainer relies on to resume mid-epoch."""

import random

import pytest
import torch

from qatune.data.batching import (
    IGNORE_INDEX,
    Feature,
    batches,
    collate,
    collate_packed,
    count_tokens,
    encode_dataset,
    encode_example,
    pack,
    padding_efficiency,
    plan_batches,
)
from qatune.data.prompts import PromptTemplate, TemplateError
from qatune.data.readers import SAMPLE_DATA, DataReport, QAExample, load_examples

EOS = 50256  # GPT-2's <|endoftext|>
PARIS = QAExample("What is the capital of France?", "Paris", ["Paris"], source="facts:1")
# "Question: What is the capital of France?\nAnswer:" and " Paris" with the GPT-2 tokenizer.
PARIS_PROMPT_IDS = [24361, 25, 1867, 318, 262, 3139, 286, 4881, 30, 198, 33706, 25]
PARIS_COMPLETION_IDS = [6342]


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer_dir):
    """The real GPT-2 tokenizer (../shared; skips where absent), for the token ids written out by hand."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))


@pytest.fixture(scope="module", params=["built", "gpt2"])
def any_tokenizer(request):
    """For tests that take their expected ids from the tokenizer itself: the small tokenizer conftest builds
    (runs everywhere), and the real GPT-2 tokenizer as well where ../shared has it."""
    transformers = pytest.importorskip("transformers")
    path = request.getfixturevalue("qa_tokenizer_dir" if request.param == "built" else "gpt2_tokenizer_dir")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def feature(ids: list[int], n_prompt: int = 1) -> Feature:
    return Feature(list(ids), [IGNORE_INDEX] * n_prompt + list(ids[n_prompt:]))


# --- template -------------------------------------------------------------------------------------------------


def test_default_template_splits_before_the_space_of_the_answer():
    template = PromptTemplate()
    assert template.prompt(PARIS) == "Question: What is the capital of France?\nAnswer:"
    assert template.completion(PARIS) == " Paris"


def test_template_with_context_and_newline_separator():
    template = PromptTemplate("Context: {context}\nQuestion: {question}\nAnswer:\n{answer}")
    ex = QAExample("Where {is} Paris?", "France", ["France"], context="Paris is in France.")
    assert template.prompt(ex) == "Context: Paris is in France.\nQuestion: Where {is} Paris?\nAnswer:"
    assert template.completion(ex) == "\nFrance"
    with pytest.raises(TemplateError, match="facts:1: .* uses {context}"):
        template.prompt(PARIS)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("Question: {question}", r"\{answer\} exactly once, at the very end"),
        ("{answer} is the answer to {question}", r"at the very end"),
        ("{answer} {question} {answer}", r"exactly once"),
        ("Answer: {answer}", r"must contain \{question\}"),
        ("Q: {question} {hint} A: {answer}", r"unknown field\(s\) \['hint'\]"),
    ],
)
def test_invalid_templates_are_rejected(bad, message):
    with pytest.raises(TemplateError, match=message):
        PromptTemplate(bad)


# --- encoding ----------------------------------------------------------------------------------------------------


def test_encode_paris_by_hand(tokenizer):
    f = encode_example(tokenizer, PARIS, PromptTemplate(), max_length=64)
    assert f.input_ids == PARIS_PROMPT_IDS + PARIS_COMPLETION_IDS + [EOS]
    assert f.labels == [IGNORE_INDEX] * 12 + [6342, EOS]
    assert not f.truncated and f.source == "facts:1"
    full = encode_example(tokenizer, PARIS, PromptTemplate(), max_length=64, answer_only=False)
    assert full.labels == full.input_ids


def test_answer_only_labels_mask_exactly_the_prompt_tokens(any_tokenizer):
    tokenizer = any_tokenizer
    template = PromptTemplate()
    examples = load_examples(SAMPLE_DATA / "facts_test.jsonl")
    for ex in examples:
        prompt_ids = tokenizer.encode(template.prompt(ex), add_special_tokens=False)
        completion_ids = tokenizer.encode(template.completion(ex), add_special_tokens=False)
        f = encode_example(tokenizer, ex, template, max_length=128)
        n = len(prompt_ids)
        assert f.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
        assert f.labels[:n] == [IGNORE_INDEX] * n
        assert f.labels[n:] == f.input_ids[n:]
        assert IGNORE_INDEX not in f.labels[n:]


def test_truncation_cuts_the_prompt_on_the_left_and_keeps_the_answer(tokenizer):
    f = encode_example(tokenizer, PARIS, PromptTemplate(), max_length=5)
    assert f.input_ids == [198, 33706, 25, 6342, EOS]  # "\nAnswer:" + " Paris" + EOS
    assert f.labels == [IGNORE_INDEX] * 3 + [6342, EOS]
    assert f.truncated
    assert encode_example(tokenizer, PARIS, PromptTemplate(), max_length=3).input_ids == [25, 6342, EOS]
    assert encode_example(tokenizer, PARIS, PromptTemplate(), max_length=2) is None  # no prompt token left


def test_encode_dataset_counts_truncated_and_dropped(any_tokenizer):
    tokenizer = any_tokenizer
    long_answer = QAExample("Q?", "one two three four five six seven eight nine ten", [], source="f:2")
    short = QAExample("Q?", "A", [], source="f:3")
    report = DataReport()
    features = encode_dataset(tokenizer, [PARIS, long_answer, short], PromptTemplate(), max_length=10, report=report)
    assert [f.source for f in features] == ["facts:1", "f:3"]
    assert [f.truncated for f in features] == [True, False]
    assert (report.truncated, report.truncated_sources, report.dropped, report.dropped_sources) == (
        1, ["facts:1"], 1, ["f:2"]
    )
    assert "truncated 1 (e.g. facts:1), dropped 1 (e.g. f:2)" in report.summary()


# --- padding -------------------------------------------------------------------------------------------------


def test_collate_right_padding():
    batch = collate([feature([5, 6, 7]), feature([8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    grid = ("input_ids", "labels", "attention_mask", "position_ids")
    assert all(batch[k].dtype == torch.long and batch[k].shape == (2, 3) for k in grid)
    # the loss's gather: flat positions (row * 3 + t) that predict a label, and those labels
    assert batch["loss_positions"].tolist() == [0, 1] and batch["loss_targets"].tolist() == [6, 7]


def test_collate_left_padding_to_a_multiple():
    batch = collate([feature([5, 6, 7]), feature([8, 9])], pad_id=0, pad_to_multiple_of=4, padding_side="left")
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 8, 9]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 9]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 0, 1, 2], [0, 0, 0, 1]]
    assert batch["loss_positions"].tolist() == [1, 2, 6] and batch["loss_targets"].tolist() == [6, 7, 9]


def test_collate_never_trains_a_row_first_token_even_with_full_labels():
    full = Feature([5, 6, 7], [5, 6, 7])  # answer_only=False
    right = collate([full, feature([8])], pad_id=0)
    left = collate([full, Feature([8, 9], [8, 9])], pad_id=0, padding_side="left")
    assert right["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 9]]  # the pad never predicts 8


# --- packing -------------------------------------------------------------------------------------------------


def test_pack_is_sequential_and_respects_max_length():
    features = [feature([1] * n) for n in (4, 3, 5, 2, 6, 1)]
    rows = pack(features, max_length=8)
    assert [[len(f) for f in row] for row in rows] == [[4, 3], [5, 2], [6, 1]]
    with pytest.raises(ValueError, match="more than max_length=5"):
        pack(features, max_length=5)


def test_collate_packed_by_hand():
    rows = [[feature([10, 11, 12]), feature([20, 21])], [feature([30, 31, 32, 33], n_prompt=2)]]
    batch = collate_packed(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 0]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 21], [-100, -100, 32, 33, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["loss_positions"].tolist() == [0, 1, 3, 6, 7]
    assert batch["loss_targets"].tolist() == [11, 12, 21, 32, 33]


def test_packed_rows_hold_every_token_once_with_per_document_positions(any_tokenizer):
    tokenizer = any_tokenizer
    examples = load_examples(SAMPLE_DATA / "facts_test.jsonl")
    features = encode_dataset(tokenizer, examples, PromptTemplate(), max_length=64, answer_only=False)
    rows = pack(features, max_length=64)
    batch = collate_packed(rows, pad_id=tokenizer.eos_token_id)
    mask = batch["attention_mask"].bool()
    assert batch["input_ids"][mask].tolist() == [t for f in features for t in f.input_ids]
    assert batch["input_ids"].shape[1] <= 64 and len(rows) < len(features)
    for r, row in enumerate(rows):
        starts = [sum(len(f) for f in row[:d]) for d in range(len(row))]
        for d, (start, f) in enumerate(zip(starts, row)):
            span = slice(start, start + len(f))
            assert batch["position_ids"][r, span].tolist() == list(range(len(f)))
            assert batch["doc_ids"][r, span].tolist() == [d] * len(f)
            assert batch["labels"][r, span].tolist() == [IGNORE_INDEX] + f.labels[1:]


# --- batch order and resuming -----------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True])
def test_plan_is_a_pure_function_of_seed_and_epoch(packing):
    lengths = [3, 7, 2, 5, 8, 1, 4, 6, 2, 3, 5, 7, 1, 1, 8]
    plan = plan_batches(lengths, 3, packing=packing, max_length=8, seed=11, epoch=2)
    assert plan == plan_batches(lengths, 3, packing=packing, max_length=8, seed=11, epoch=2)
    assert plan != plan_batches(lengths, 3, packing=packing, max_length=8, seed=11, epoch=3)
    assert plan != plan_batches(lengths, 3, packing=packing, max_length=8, seed=12, epoch=2)
    indices = [i for batch in plan for row in batch for i in row]
    assert sorted(indices) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 8 for batch in plan for row in batch)


def test_unshuffled_plan_keeps_data_order():
    assert plan_batches([1, 1, 1, 1, 1], 2, shuffle=False) == [[[0], [1]], [[2], [3]], [[4]]]
    assert plan_batches([3, 3, 3, 3], 2, shuffle=False, packing=True, max_length=6) == [[[0, 1]], [[2, 3]]]
    assert plan_batches([3, 3, 3, 3], 3, shuffle=False, packing=True, max_length=6) == [[[0, 1], [2]], [[3]]]


@pytest.mark.parametrize("seed", range(5))
def test_packing_keeps_the_examples_of_every_batch(seed):
    """A batch is batch_size examples with or without packing: packing only removes padding, so two prompt
    formats of different lengths train on the same examples per step and take the same steps per epoch."""
    lengths = [random.Random(seed * 100 + i).randint(1, 40) for i in range(57)]
    plain = plan_batches(lengths, 8, seed=seed, epoch=1)
    packed = plan_batches(lengths, 8, packing=True, max_length=48, seed=seed, epoch=1)
    assert len(packed) == len(plain) == 8  # ceil(57 / 8)
    assert [[i for row in b for i in row] for b in packed] == [[i for row in b for i in row] for b in plain]
    assert all(sum(lengths[i] for i in row) <= 48 for batch in packed for row in batch)
    assert sum(len(batch) for batch in packed) < sum(len(batch) for batch in plain)  # really packed


@pytest.mark.parametrize("packing", [False, True])
def test_skipping_k_batches_gives_the_remaining_batches(packing):
    features = [feature(list(range(1, n + 1))) for n in (3, 7, 2, 5, 8, 1, 4, 6, 2, 3)]
    kwargs = dict(pad_id=0, packing=packing, max_length=8, seed=5, epoch=1)
    full = list(batches(features, 2, **kwargs))
    resumed = list(batches(features, 2, skip=2, **kwargs))
    assert len(resumed) == len(full) - 2 > 0
    for a, b in zip(full[2:], resumed):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ("doc_ids" in full[0]) == packing


def test_count_tokens_and_padding_efficiency():
    features = [feature([5, 6, 7], n_prompt=2), feature([8, 9])]
    unpacked = collate(features, pad_id=0)  # [[5, 6, 7], [8, 9, pad]]
    assert count_tokens(unpacked) == (2, 5)  # labels 7 and 9; 5 real tokens
    packed = collate_packed([features], pad_id=0)  # [[5, 6, 7, 8, 9]]
    assert count_tokens(packed) == (2, 5)  # same loss tokens: the first label of each document is never trained
    assert padding_efficiency([unpacked]) == pytest.approx(5 / 6)
    assert padding_efficiency([packed]) == 1.0
