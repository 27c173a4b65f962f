"""`ModelConfig`: one description for both decoder families qatune runs natively.

GPT-2 family (gpt2 ... gpt2-xl, distilgpt2): learned positions, LayerNorm, GELU-tanh MLP, biases, tied head.
Llama family (SmolLM2): RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.
The flags below are what differs; `decoder.py` reads only these flags, never the family name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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


def _first(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Build a `ModelConfig` from a Hugging Face `config.json` dict (GPT-2 or Llama model_type)."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return _gpt2_config(hf)
    if model_type in ("llama", "mistral") or model_type is None and "num_key_value_heads" in hf:
        return _llama_config(hf)
    raise ModelError(
        f"unsupported model_type {model_type!r} for the native backend (supported: gpt2, llama); "
        "use backend=hf for other Hugging Face causal LMs"
    )


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ModelError("GPT-2 config with scale_attn_by_inverse_layer_idx=true is not supported natively")
    if hf.get("scale_attn_weights") is False:
        raise ModelError("GPT-2 config with scale_attn_weights=false is not supported natively")
    act = hf.get("activation_function", "gelu_new")
    mlp = "gelu_tanh" if act in _GELU_TANH else act
    if mlp not in ("gelu", "relu", "gelu_tanh"):
        raise ModelError(f"GPT-2 activation_function {act!r} is not supported natively")
    d = hf["n_embd"]
    return ModelConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_kv_head=hf["n_head"],
        d_model=d,
        d_ff=hf.get("n_inner") or 4 * d,
        head_dim=d // hf["n_head"],
        max_positions=hf.get("n_positions", 1024),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        positions="learned",
        mlp=mlp,
        attn_bias=True,
        mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        dropout=hf.get("resid_pdrop", 0.1),
        embed_dropout=hf.get("embd_pdrop", 0.1),
        attn_dropout=hf.get("attn_pdrop", 0.1),
        bos_token_id=hf.get("bos_token_id", 50256),
        eos_token_id=hf.get("eos_token_id", 50256),
        pad_token_id=hf.get("pad_token_id"),
        hf_config=dict(hf),
    )


def _llama_config(hf: dict[str, Any]) -> ModelConfig:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ModelError(f"Llama rope type {rope_type!r} is not supported natively (only 'default')")
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelError(f"Llama hidden_act {hf['hidden_act']!r} is not supported natively (only 'silu')")
    n_head = hf["num_attention_heads"]
    d = hf["hidden_size"]
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):  # Llama 3 style: several EOS ids; the first is the canonical one
        eos = eos[0]
    return ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        d_model=d,
        d_ff=hf["intermediate_size"],
        head_dim=hf.get("head_dim") or d // n_head,
        max_positions=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        positions="rope",
        rope_theta=_first(rope, "rope_theta", default=hf.get("rope_theta", 10000.0)),
        mlp="swiglu",
        attn_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        dropout=0.0,
        attn_dropout=hf.get("attention_dropout", 0.0),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=hf.get("pad_token_id"),
        hf_config=dict(hf),
    )
