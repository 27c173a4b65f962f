"""A Hugging Face byte-level BPE tokenizer as the `tokenizer.*` metadata of a GGUF file (llama.cpp's "gpt2"
tokenizer model), as llama.cpp's `convert_hf_to_gguf.py` writes it.

What llama.cpp needs: every token in id order (ids the tokenizer lacks up to the model's vocabulary size become
`[PAD{i}]`, type UNUSED), each token's type (NORMAL, CONTROL for special added tokens, USER_DEFINED for other
added tokens), the merges, the pre-tokenizer's name, the special token ids, whether BOS/EOS are added, and the
chat template. Only byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3 style) are exported: a SentencePiece
vocabulary would need scores and byte tokens that a `tokenizer.json` does not carry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gguf import GGUFWriter, TokenType

from qatune.errors import ModelError

# tokenizer.json pre-tokenizers llama.cpp implements under these names. The GPT-2 regex is ByteLevel's own
# (use_regex); SmolLM2's tokenizer.json puts single-digit splitting in front of it, llama.cpp's "smollm".
_GPT2_BYTELEVEL = {"type": "ByteLevel", "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}


@dataclass
class GGUFVocab:
    """The tokenizer fields of a GGUF file; `add_to(writer)` writes them."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | list[dict[str, str]] | None = None

    def add_to(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.merges:  # an empty GGUF array has no element type to write
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for kind, token_id in self.special_ids.items():
            adders[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer fields of a transformers fast tokenizer, for a model with `vocab_size` embeddings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"cannot export the tokenizer {type(tokenizer).__name__}: a fast (tokenizers-backed) "
                         "tokenizer is needed")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(spec.get("pre_tokenizer")):
        raise ModelError(
            f"cannot export this tokenizer to GGUF: only byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3 style) "
            f"are supported, this one is {model.get('type')} with pre-tokenizer "
            f"{(spec.get('pre_tokenizer') or {}).get('type')}"
        )
    tokens, types = _tokens_and_types(tokenizer, vocab_size)
    return GGUFVocab(
        tokens=tokens,
        token_types=types,
        merges=[m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
        pre=_pre_tokenizer_name(spec.get("pre_tokenizer")),
        special_ids=_special_ids(tokenizer),
        add_bos=_adds(tokenizer, "bos"),
        add_eos=_adds(tokenizer, "eos"),
        add_space_prefix=bool(_byte_level_part(spec.get("pre_tokenizer")).get("add_prefix_space", False)),
        chat_template=_chat_template(tokenizer),
    )


def _pre_steps(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def _byte_level_part(pre: dict[str, Any] | None) -> dict[str, Any]:
    return next((s for s in _pre_steps(pre) if s.get("type") == "ByteLevel"), {})


def _is_byte_level(pre: dict[str, Any] | None) -> bool:
    return bool(_byte_level_part(pre))


def _matches(step: dict[str, Any], want: dict[str, Any]) -> bool:
    return all(step.get(k) == v for k, v in want.items())


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for the pre-tokenizer; an unknown one is an error (llama.cpp would split text
    differently from the tokenizer the model was trained with)."""
    steps = _pre_steps(pre)
    if len(steps) == 1 and _matches(steps[0], _GPT2_BYTELEVEL):
        return "gpt-2"
    if len(steps) == 2 and _matches(steps[0], _DIGITS) and _matches(steps[1], _GPT2_BYTELEVEL):
        return "smollm"
    raise ModelError(f"cannot export this tokenizer to GGUF: its pre-tokenizer {json.dumps(pre)} has no llama.cpp "
                     "equivalent known to qatune (supported: GPT-2's byte-level regex, SmolLM2's digits + GPT-2)")


def _tokens_and_types(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ModelError(f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # an embedding no token uses (vocabularies padded to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            looks_special = by_id[i].startswith("<|") and by_id[i].endswith("|>")
            types.append(TokenType.CONTROL if added[i].special or looks_special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {kind: getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "unk", "pad")}
    return {kind: int(i) for kind, i in ids.items() if i is not None}


def _adds(tokenizer, kind: str) -> bool:
    """Whether encoding with special tokens adds BOS (first) / EOS (last): what llama.cpp's add_bos/add_eos mean."""
    token_id = getattr(tokenizer, f"{kind}_token_id", None)
    if token_id is None:
        return False
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    if len(full) <= len(plain):
        return False
    return full[0] == token_id if kind == "bos" else full[-1] == token_id


def _chat_template(tokenizer) -> str | list[dict[str, str]] | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: GGUF stores the default and the others by name
        return [{"name": name, "template": text} for name, text in template.items()]
    return template or None
