"""`ModelConfig`: one description for both decoder families qatune runs natively.

GPT-2 family (gpt2 ... gpt2-xl, distilgpt2): learned positions, LayerNorm, GELU-tanh MLP, biases, tied head.
Llama family (SmolLM2): RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.
The flags below are what differs; `decoder.py` reads only these flags, never the family name.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qatune.errors import ModelError

# Activations Hugging Face configs name, mapped to what `decoder.py` implements.
_GELU_TANH = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


@dataclass
class ModelConfig:
    family: str  # "gpt2" or "llama": which Hugging Face layout the weights come from and go back to
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    d_ff: int
    head_dim: int
    max_positions: int
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    positions: str  # "learned" | "rope"
    rope_theta: float = 10000.0
    mlp: str = "gelu_tanh"  # "gelu_tanh" | "gelu" | "relu" | "swiglu"
    attn_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0  # residual dropout (GPT-2's resid_pdrop)
    embed_dropout: float = 0.0  # GPT-2's embd_pdrop
    attn_dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # The Hugging Face config this was made from, kept so a merged model is saved with the same config.json.
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def q_size(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_head * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("hf_config")
        return d


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (`config.json`, `adapter_config.json`): unreadable, non-UTF-8,
    malformed, too deeply nested, or anything but an object at the top, is a `ModelError` naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ModelError(f"{path} is nested too deeply to be a configuration") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: the top level must be a JSON object, got {type(value).__name__}")
    return value


class _Fields:
    """A Hugging Face config dict read field by field: a required field that is missing, or any field of the
    wrong type or range, is a `ModelError` naming `source` and the field. A field set to null counts as
    missing (its default applies), as in transformers."""

    def __init__(self, hf: dict[str, Any], source: str):
        self.hf, self.source = hf, source

    def _bad(self, key: str, what: str) -> ModelError:
        return ModelError(f"{self.source}: field {key!r} must be {what}, got {self.hf.get(key)!r:.80}")

    def count(self, key: str, default: int | None = None) -> int:
        """A whole number >= 1 (a size or a count: heads, layers, width)."""
        value = self.hf.get(key)
        if value is None:
            if default is None:
                raise ModelError(f"{self.source}: field {key!r} is missing")
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise self._bad(key, "a whole number >= 1")
        return value

    def number(self, key: str, default: float | None) -> float | None:
        value = self.hf.get(key)
        if value is None:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise self._bad(key, "a number >= 0")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.hf.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def token_id(self, key: str, default: int | None = None) -> int | None:
        """A token id or null; a list (Llama 3's several EOS ids) gives its first, the canonical one."""
        value = self.hf.get(key, default)
        if isinstance(value, list) and value:
            value = value[0]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise self._bad(key, "a token id (a whole number >= 0), a list of them, or null")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.hf.get(key)
        if value is not None and not isinstance(value, dict):
            raise self._bad(key, "an object")
        return value or {}


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a `ModelConfig` from a Hugging Face `config.json` dict (GPT-2 or Llama model_type); `source` (the
    file it came from) starts the message of every field that is missing or wrong."""
    if not isinstance(hf, dict):
        raise ModelError(f"{source}: the top level must be an object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return _gpt2_config(_Fields(hf, source))
    if model_type in ("llama", "mistral") or model_type is None and "num_key_value_heads" in hf:
        return _llama_config(_Fields(hf, source))
    raise ModelError(
        f"{source}: unsupported model_type {model_type!r:.80} for the native backend (supported: gpt2, llama); "
        "use backend=hf for other Hugging Face causal LMs"
    )


def _gpt2_config(f: _Fields) -> ModelConfig:
    hf = f.hf
    if f.flag("scale_attn_by_inverse_layer_idx", False):
        raise ModelError(f"{f.source}: GPT-2 config with scale_attn_by_inverse_layer_idx=true is not supported "
                         "natively")
    if not f.flag("scale_attn_weights", True):
        raise ModelError(f"{f.source}: GPT-2 config with scale_attn_weights=false is not supported natively")
    act = hf.get("activation_function", "gelu_new")
    mlp = "gelu_tanh" if act in _GELU_TANH else act
    if mlp not in ("gelu", "relu", "gelu_tanh"):
        raise ModelError(f"{f.source}: GPT-2 activation_function {act!r:.80} is not supported natively")
    d, n_head = f.count("n_embd"), f.count("n_head")
    if d % n_head:
        raise ModelError(f"{f.source}: n_embd={d} is not a multiple of n_head={n_head}")
    return ModelConfig(
        family="gpt2",
        vocab_size=f.count("vocab_size"),
        n_layer=f.count("n_layer"),
        n_head=n_head,
        n_kv_head=n_head,
        d_model=d,
        d_ff=f.count("n_inner", 4 * d),
        head_dim=d // n_head,
        max_positions=f.count("n_positions", 1024),
        norm="layernorm",
        norm_eps=f.number("layer_norm_epsilon", 1e-5),
        positions="learned",
        mlp=mlp,
        attn_bias=True,
        mlp_bias=True,
        tie_embeddings=f.flag("tie_word_embeddings", True),
        dropout=f.number("resid_pdrop", 0.1),
        embed_dropout=f.number("embd_pdrop", 0.1),
        attn_dropout=f.number("attn_pdrop", 0.1),
        bos_token_id=f.token_id("bos_token_id", 50256),
        eos_token_id=f.token_id("eos_token_id", 50256),
        pad_token_id=f.token_id("pad_token_id"),
        hf_config=dict(hf),
    )


def _llama_config(f: _Fields) -> ModelConfig:
    hf = f.hf
    rope = f.mapping("rope_parameters") or f.mapping("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ModelError(f"{f.source}: Llama rope type {rope_type!r:.80} is not supported natively (only 'default')")
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{f.source}: Llama hidden_act {hf['hidden_act']!r:.80} is not supported natively "
                         "(only 'silu')")
    n_head, d = f.count("num_attention_heads"), f.count("hidden_size")
    n_kv_head = f.count("num_key_value_heads", n_head)
    if n_head % n_kv_head:
        raise ModelError(f"{f.source}: num_attention_heads={n_head} is not a multiple of "
                         f"num_key_value_heads={n_kv_head}")
    rope_theta = _Fields(rope, f"{f.source} (rope parameters)").number("rope_theta", None)
    return ModelConfig(
        family="llama",
        vocab_size=f.count("vocab_size"),
        n_layer=f.count("num_hidden_layers"),
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_model=d,
        d_ff=f.count("intermediate_size"),
        head_dim=f.count("head_dim", d // n_head or None),
        max_positions=f.count("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=f.number("rms_norm_eps", 1e-6),
        positions="rope",
        rope_theta=rope_theta if rope_theta is not None else f.number("rope_theta", 10000.0),
        mlp="swiglu",
        attn_bias=f.flag("attention_bias", False),
        mlp_bias=f.flag("mlp_bias", False),
        tie_embeddings=f.flag("tie_word_embeddings", False),
        dropout=0.0,
        attn_dropout=f.number("attention_dropout", 0.0),
        bos_token_id=f.token_id("bos_token_id"),
        eos_token_id=f.token_id("eos_token_id"),
        pad_token_id=f.token_id("pad_token_id"),
        hf_config=dict(hf),
    )
