"""Prompt formats: how a QA example becomes the text the model reads and the text it learns to write.

Two formats, one interface (`PromptFormat`):
- `plain` (`PromptTemplate`): a text template, default `Question: {question}\\nAnswer: {answer}`, plus EOS. The
  whitespace before `{answer}` belongs to the completion, so that generation fed the prompt alone continues
  exactly as in training (docs/DESIGN.md).
- `chat` (`ChatFormat`): the tokenizer's own chat template, the question as the user turn and the answer as the
  assistant turn. The loss is on the assistant turns only: the answer and the template's end of turn
  (`<|im_end|>\\n` for SmolLM2), the same tokens TRL's SFT data preparation marks as completion.

`prompt_format: auto` (the default) is `chat` when the tokenizer has a chat template, else `plain`: an
instruction-tuned model is asked the way it was trained to answer. Few-shot prompts put `shots` (solved
examples) before the question: as earlier exchanges of the conversation (chat) or earlier blocks (plain).
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from typing import Any, Protocol

import jinja2  # transformers renders chat templates with it (a dependency of torch and transformers)

from qatune.data.readers import QAExample
from qatune.errors import ConfigError, DataError, ModelError

DEFAULT_TEMPLATE = "Question: {question}\nAnswer: {answer}"
PROMPT_FORMATS = ("auto", "plain", "chat")
_TEMPLATE_FIELDS = {"question", "answer", "context"}
_SHOT_SEPARATOR = "\n\n"  # between solved examples of a plain few-shot prompt


class TemplateError(ConfigError):
    """A prompt template that cannot split an example into prompt and completion."""


class PromptFormat(Protocol):
    """What tokenisation and generation need from a prompt format."""

    name: str
    append_eos: bool  # whether EOS follows the last segment (the chat template ends turns itself)

    def prompt(self, ex: QAExample, shots: Sequence[QAExample] = ()) -> str:
        """The text generation is fed to answer `ex` (after the solved `shots`)."""

    def segments(self, ex: QAExample) -> list[tuple[str, bool]]:
        """The training text of `ex` in order, each piece marked True when the loss is on it."""


class PromptTemplate:
    """Splits an example into the prompt (loss-masked, fed alone at generation) and the completion.

    The template must end with `{answer}` and contain `{question}`; `{context}` is available for SQuAD-style
    data. The whitespace just before `{answer}` starts the completion: with the default template the prompt
    is "Question: ...\\nAnswer:" and the completion " Paris".
    """

    name = "plain"
    append_eos = True

    def __init__(self, template: str = DEFAULT_TEMPLATE) -> None:
        self.template = template
        fields = _template_fields(template)
        unknown = set(fields) - _TEMPLATE_FIELDS
        if unknown:
            raise TemplateError(
                f"data.template {template!r}: unknown field(s) {sorted(unknown)}; use {sorted(_TEMPLATE_FIELDS)}"
            )
        if not template.endswith("{answer}") or fields.count("answer") != 1:
            raise TemplateError(f"data.template {template!r} must contain {{answer}} exactly once, at the very end")
        if "question" not in fields:
            raise TemplateError(f"data.template {template!r} must contain {{question}}")
        before = template[: -len("{answer}")]
        self._prompt = before.rstrip()
        self._separator = before[len(self._prompt) :]
        self._uses_context = "context" in fields

    def prompt(self, ex: QAExample, shots: Sequence[QAExample] = ()) -> str:
        if ex.messages is not None:
            raise DataError(f"{ex.source}: a conversation (`messages`) needs data.prompt_format=chat, not plain")
        if self._uses_context and ex.context is None:
            raise TemplateError(f"{ex.source}: template {self.template!r} uses {{context}} but the example has none")
        solved = [self.prompt(shot) + self.completion(shot) for shot in shots]
        return _SHOT_SEPARATOR.join([*solved, self._prompt.format(question=ex.question, context=ex.context or "")])

    def completion(self, ex: QAExample) -> str:
        return self._separator + ex.answer

    def segments(self, ex: QAExample) -> list[tuple[str, bool]]:
        return [(self.prompt(ex), False), (self.completion(ex), True)]

    def __repr__(self) -> str:
        return f"PromptTemplate({self.template!r})"


def _template_fields(template: str) -> list[str]:
    """The field names of a plain template. A stray brace, a format spec or a conversion is a `TemplateError`:
    fields are replaced by the text as it is (`{question:>99999999}` would pad a question to 100 MB)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # "Single '{' encountered in format string"
        raise TemplateError(f"data.template {template!r}: {e} (write a literal brace twice: {{{{ or }}}})") from None
    for _, name, spec, conversion in parsed:
        if name is not None and (spec or conversion):
            raise TemplateError(f"data.template {template!r}: field {{{name}}} has a format spec or conversion "
                                f"({'!' + conversion if conversion else ''}{':' + spec if spec else ''}); "
                                "fields are bare: {question}, {answer}, {context}")
    return [name for _, name, _, _ in parsed if name is not None]


class ChatFormat:
    """The tokenizer's chat template: user turn = question, assistant turn = answer (or a whole conversation).

    Each assistant turn's text is what the template adds between the conversation rendered up to that turn
    with the generation prompt and the conversation rendered through that turn, so the prompt generation is fed
    is exactly the text the model was trained to continue."""

    name = "chat"
    append_eos = False

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.prompt_format=chat: this tokenizer has no chat template (use plain)")
        self.tokenizer = tokenizer
        self._template_name = f"the chat template of tokenizer {getattr(tokenizer, 'name_or_path', '') or '?'}"

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
        """The template's text for `messages`; a template that does not parse is a `ModelError`, one that
        refuses the conversation (`raise_exception`, an undefined variable) a `DataError` at `where`."""
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                      tokenize=False)
        except jinja2.TemplateSyntaxError as e:
            raise ModelError(f"{self._template_name} does not parse (line {e.lineno}): {e.message}") from None
        except jinja2.TemplateError as e:
            first_line = (e.message or type(e).__name__).splitlines()[0]
            raise DataError(f"{where + ': ' if where else ''}{self._template_name} refused the conversation: "
                            f"{first_line}") from None

    def messages(self, ex: QAExample) -> list[dict[str, str]]:
        return ex.messages or [{"role": "user", "content": ex.question}, {"role": "assistant", "content": ex.answer}]

    def prompt(self, ex: QAExample, shots: Sequence[QAExample] = ()) -> str:
        history = [turn for shot in shots for turn in self.messages(shot)[-2:]]  # each shot's last exchange
        question = self.messages(ex)[:-1]
        system = [question.pop(0)] if question and question[0]["role"] == "system" else []
        return self._render(system + history + question, generation_prompt=True, where=ex.source)

    def segments(self, ex: QAExample) -> list[tuple[str, bool]]:
        messages = self.messages(ex)
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], generation_prompt=True, where=ex.source)
            through = self._render(messages[: i + 1], generation_prompt=False, where=ex.source)
            if not before.startswith(done) or not through.startswith(before):
                raise DataError(f"{ex.source}: the chat template does not render this conversation as a growing "
                                "prefix, so its assistant turns cannot be located")
            pieces += [(before[len(done):], False), (through[len(before):], True)]
            done = through
        return [(text, label) for text, label in pieces if text]

    def __repr__(self) -> str:
        return "ChatFormat()"


def draw_shots(examples: Sequence[QAExample], k: int, seed: int) -> list[QAExample]:
    """`k` solved examples for few-shot prompts, drawn with `seed` (the same for every question)."""
    if k > len(examples):
        raise ConfigError(f"few-shot k={k} but only {len(examples)} examples to draw from")
    return random.Random(seed).sample(list(examples), k)


def make_prompt_format(name: str, template: str, tokenizer: Any) -> PromptTemplate | ChatFormat:
    """`auto`: chat when the tokenizer has a chat template, else plain (`template`)."""
    if name not in PROMPT_FORMATS:
        raise ConfigError(f"data.prompt_format must be one of {', '.join(PROMPT_FORMATS)}; got {name!r}")
    if name == "chat" or (name == "auto" and getattr(tokenizer, "chat_template", None)):
        return ChatFormat(tokenizer)
    return PromptTemplate(template)
