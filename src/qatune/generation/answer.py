"""Answering questions with a model: the prompt each question becomes, and batched generation."""

from __future__ import annotations

import dataclasses

import torch

from qatune.data.prompts import PromptTemplate
from qatune.data.readers import QAExample
from qatune.errors import ConfigError
from qatune.generation.decode import GenerationConfig, generate_text
from qatune.models.decoder import Decoder


def build_prompt(question: str, tokenizer, template: str, chat: bool) -> str:
    """The QA template's prompt part, or the tokenizer's chat template for instruction-tuned models."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat: this tokenizer has no chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
    return PromptTemplate(template).prompt(QAExample(question=question, answer="", aliases=[]))


def answer_questions(model: Decoder, tokenizer, questions: list[str], *, template: str,
                     config: GenerationConfig | None = None, chat: bool = False, batch_size: int = 16,
                     streamer=None) -> list[str]:
    """Answers, stripped, for a list of questions (batched, left-padded generation). `config` is not modified."""
    config = config or GenerationConfig(max_new_tokens=32)
    config = dataclasses.replace(
        config,
        eos_token_id=tokenizer.eos_token_id if config.eos_token_id is None else config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if config.pad_token_id is None else config.pad_token_id,
        # a QA answer is one line; the template's next "Question:" is not ours
        stop_strings=list(config.stop_strings) or ([] if chat else ["\n"]),
    )
    answers = []
    with torch.inference_mode():
        for i in range(0, len(questions), batch_size):
            prompts = [build_prompt(q, tokenizer, template, chat) for q in questions[i:i + batch_size]]
            answers += [a.strip() for a in generate_text(model, tokenizer, prompts, config, streamer=streamer)]
    return answers
