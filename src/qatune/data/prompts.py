"""Prompt templates: how a QA example becomes the prompt the model reads and the completion it learns.

The whitespace before `{answer}` belongs to the completion, so that generation fed the prompt alone continues
exactly as in training (docs/DESIGN.md).
"""

from __future__ import annotations

import string

from qatune.data.readers import QAExample
from qatune.errors import ConfigError

DEFAULT_TEMPLATE = "Question: {question}\nAnswer: {answer}"
_TEMPLATE_FIELDS = {"question", "answer", "context"}


class TemplateError(ConfigError):
    """A prompt template that cannot split an example into prompt and completion."""


class PromptTemplate:
    """Splits an example into the prompt (loss-masked, fed alone at generation) and the completion.

    The template must end with `{answer}` and contain `{question}`; `{context}` is available for SQuAD-style
    data. The whitespace just before `{answer}` starts the completion: with the default template the prompt
    is "Question: ...\\nAnswer:" and the completion " Paris".
    """

    def __init__(self, template: str = DEFAULT_TEMPLATE) -> None:
        self.template = template
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        unknown = set(fields) - _TEMPLATE_FIELDS
        if unknown:
            raise TemplateError(
                f"template {template!r}: unknown field(s) {sorted(unknown)}; use {sorted(_TEMPLATE_FIELDS)}"
            )
        if not template.endswith("{answer}") or fields.count("answer") != 1:
            raise TemplateError(f"template {template!r} must contain {{answer}} exactly once, at the very end")
        if "question" not in fields:
            raise TemplateError(f"template {template!r} must contain {{question}}")
        before = template[: -len("{answer}")]
        self._prompt = before.rstrip()
        self._separator = before[len(self._prompt) :]
        self._uses_context = "context" in fields

    def prompt(self, ex: QAExample) -> str:
        if self._uses_context and ex.context is None:
            raise TemplateError(f"{ex.source}: template {self.template!r} uses {{context}} but the example has none")
        return self._prompt.format(question=ex.question, context=ex.context or "")

    def completion(self, ex: QAExample) -> str:
        return self._separator + ex.answer

    def __repr__(self) -> str:
        return f"PromptTemplate({self.template!r})"
