"""Answering questions with a model: each question in the run's prompt format, batched generation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from qatune.data.prompts import PromptFormat
from qatune.data.readers import QAExample
from qatune.generation.decode import GenerationConfig, generate_text
from qatune.models.decoder import Decoder


def as_example(question: str | QAExample) -> QAExample:
    """A bare question as an example to prompt with (no answer yet)."""
    return question if isinstance(question, QAExample) else QAExample(question=question, answer="", aliases=[])


def answer_questions(model: Decoder, tokenizer, questions: Sequence[str | QAExample], *, prompt_format: PromptFormat,
                     config: GenerationConfig | None = None, shots: Sequence[QAExample] = (), batch_size: int = 16,
                     streamer=None) -> list[str]:
    """Answers, stripped, for a list of questions (or examples, e.g. conversations), batched and left-padded.

    `shots`: solved examples put before every question (few-shot prompting). Generation stops at EOS (the chat
    template's end of turn) and, for the plain format, at the end of the answer's line: a QA answer is one line,
    and the template's next "Question:" is not the model's to write. `config` is not modified."""
    config = config or GenerationConfig(max_new_tokens=32)
    config = dataclasses.replace(
        config,
        eos_token_id=tokenizer.eos_token_id if config.eos_token_id is None else config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if config.pad_token_id is None else config.pad_token_id,
        stop_strings=list(config.stop_strings) or (["\n"] if prompt_format.name == "plain" else []),
    )
    answers = []
    with torch.inference_mode():
        for i in range(0, len(questions), batch_size):
            prompts = [prompt_format.prompt(as_example(q), shots) for q in questions[i:i + batch_size]]
            answers += [a.strip() for a in generate_text(model, tokenizer, prompts, config, streamer=streamer)]
    return answers
