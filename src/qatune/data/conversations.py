"""Conversational records: `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`.

A conversation trains on every assistant turn (the chat prompt format renders it with the tokenizer's chat
template); evaluated, its last assistant turn is the reference answer and everything before it the prompt.
"""

from __future__ import annotations

from typing import Any

from qatune.errors import DataError

ROLES = ("system", "user", "assistant")


def parse_messages(value: Any, source: str) -> list[dict[str, str]]:
    """Check a `messages` field and return it as plain {"role", "content"} dicts; errors name the record and turn.

    Rules: a non-empty list of objects with a known `role` and a string `content`; a system message only first;
    at least one assistant turn, and the conversation ends with one (it is what the model learns to say)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{source}: field 'messages' must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, message in enumerate(value):
        where = f"{source}: messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: expected an object with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: 'content' must be a non-empty string")
        if role == "system" and i != 0:
            raise DataError(f"{where}: a system message may only come first")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{source}: messages must end with an assistant turn (the answer to learn)")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{source}: messages have no user turn")
    return messages


def last_exchange(messages: list[dict[str, str]]) -> tuple[str, str]:
    """(the last user turn, the final assistant turn): the question and answer of a conversation."""
    question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    return question, messages[-1]["content"]
