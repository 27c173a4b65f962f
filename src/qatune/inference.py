"""Loading something to answer with (a model, or a qatune run directory) and answering questions."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from .batching import PromptTemplate
from .data import QAExample
from .errors import QatuneError
from .generation import GenerationConfig, generate_text
from .loading import load_model
from .model import Decoder
from .tokenizer import has_tokenizer, load_tokenizer


def load_for_inference(source: str | os.PathLike, *, dtype=None, device=None, tokenizer: str | None = None
                       ) -> tuple[Decoder, object]:
    """A model and its tokenizer from a model source or a run directory (`RUN/adapter` or `RUN/model`)."""
    p = Path(source)
    if (p / "config.yaml").is_file() and ((p / "adapter").is_dir() or (p / "model").is_dir()):
        if (p / "model").is_dir():
            return load_for_inference(p / "model", dtype=dtype, device=device, tokenizer=tokenizer)
        run = yaml.safe_load((p / "config.yaml").read_text())
        model = load_model(run["model"], adapter=p / "adapter", dtype=dtype, device=device)
        tok_source = tokenizer or (p / "adapter" if has_tokenizer(p / "adapter") else run.get("tokenizer") or run["model"])
        return model, load_tokenizer(tok_source)
    if (p / "adapter_config.json").is_file():
        raise QatuneError(f"{p} is an adapter: pass the base model and `--adapter {p}`")
    model = load_model(source, dtype=dtype, device=device)
    return model, load_tokenizer(tokenizer or source)


def build_prompt(question: str, tokenizer, template: str, chat: bool) -> str:
    """The QA template's prompt part, or the tokenizer's chat template for instruction-tuned models."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise QatuneError("--chat: this tokenizer has no chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
    return PromptTemplate(template).prompt(QAExample(question=question, answer="", aliases=[]))


def answer_questions(model: Decoder, tokenizer, questions: list[str], *, template: str,
                     config: GenerationConfig | None = None, chat: bool = False, batch_size: int = 16,
                     streamer=None) -> list[str]:
    """Answers, stripped, for a list of questions (batched, left-padded generation)."""
    config = config or GenerationConfig(max_new_tokens=32)
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if not config.stop_strings and not chat:
        config.stop_strings = ["\n"]  # a QA answer is one line; the template's next "Question:" is not ours
    answers = []
    with torch.inference_mode():
        for i in range(0, len(questions), batch_size):
            prompts = [build_prompt(q, tokenizer, template, chat) for q in questions[i:i + batch_size]]
            answers += [a.strip() for a in generate_text(model, tokenizer, prompts, config, streamer=streamer)]
    return answers
