"""The native decoder: GPT-2 family and Llama family (SmolLM2) in one plain-PyTorch code path.

Read it top to bottom: norms and positions, attention (with its mask and KV cache), MLP, block, decoder.
What differs between the families is a handful of `ModelConfig` flags, never a branch on the family name.

Attention runs through `scaled_dot_product_attention`. With no padding, no packing and no cache it passes
`is_causal=True` and no mask, so PyTorch may pick its flash kernel; otherwise a boolean mask is built from
`attention_mask` (padding), `doc_ids` (packing: a token sees only its own document) and the cache offset.

This file is the reference, and it computes logits and nothing else: the training loss (over labelled positions
only) is `evaluation.loss.next_token_loss`, fed `hidden_states` and `lm_head.weight`. `Decoder(cfg,
fast_path=True)` marks the model for the fast path of `fast_ops.py` and, on CPU, swaps in its dropout and
attention kernels, chosen once when the model is built (never by a branch on the device in `forward`), and
skips the padding of training batches (`token_layout.TokenLayout`); they change how, never what, is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatune.models.config import ModelConfig

from .fast_ops import explicit_attention, make_dropout, rotate_rows, swiglu
from .token_layout import TokenLayout


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in fp32 like the reference implementation."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables `[B, 1, T, head_dim]` for rotary embeddings (rotate-half layout, as Hugging Face Llama)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    )
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Keys and values of earlier positions, per layer, for incremental decoding.

    `reorder` serves beam search (rows follow their parent beam)."""

    def __init__(self, n_layer: int):
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def cached(self, layer: int) -> int:
        """Positions cached for `layer` (during a forward, earlier layers already hold the new ones)."""
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, index: Tensor) -> None:
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)


def attention_mask_4d(
    batch: int,
    q_len: int,
    past: int,
    device: torch.device,
    attention_mask: Tensor | None,
    doc_ids: Tensor | None,
) -> Tensor | None:
    """Boolean mask `[B, 1, T, S]` (True = may attend), or None when plain causal attention suffices."""
    if attention_mask is None and doc_ids is None and (past == 0 or q_len == 1):
        return None  # plain causal attention (or one cached step, which sees every earlier key)
    kv_len = past + q_len
    q_pos = torch.arange(past, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(batch, 1, q_len, kv_len)
    if attention_mask is not None:
        mask = mask & attention_mask[:, -kv_len:].bool()[:, None, None, :]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    # A padding query would see no key at all and SDPA would return NaN: let every query see itself.
    return mask | (k_pos == q_pos)[None, None]


class Attention(nn.Module):
    """`cpu_kernels=True` (the fast path on CPU): `fast_ops`' dropout, and attention without a KV cache as
    `fast_ops.explicit_attention`; otherwise `nn.Dropout` and SDPA."""

    def __init__(self, cfg: ModelConfig, cpu_kernels: bool = False):
        super().__init__()
        self.cfg = cfg
        self.explicit = cpu_kernels
        # q, k and v share one matmul (GPT-2's c_attn; Llama's q/k/v_proj are concatenated on load).
        self.qkv = nn.Linear(cfg.d_model, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attn_bias)
        self.o = nn.Linear(cfg.q_size, cfg.d_model, bias=cfg.attn_bias)
        self.resid_dropout = make_dropout(cfg.dropout, cpu_kernels)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        kv_cache: KVCache | None,
        layer: int,
        layout: TokenLayout | None = None,
    ) -> Tensor:
        qkv = self.qkv(x)
        if layout is None:
            y = self._attend(qkv, rope, mask, kv_cache, layer)
        else:  # real-token rows (the CPU fast path): rotate them, attend sequence group by sequence group
            rows = qkv if rope is None else self._rotate_rows(qkv, rope)
            mask = mask if layout.keeps_positions else None
            y = layout.attend(rows, lambda grid: self._attend(grid, None, mask, None, layer))
        return self.resid_dropout(self.o(y))

    def _attend(self, qkv: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                kv_cache: KVCache | None, layer: int) -> Tensor:
        """q, k, v `[B, T, q + 2 kv]` -> the attention's output `[B, T, q]` (before the output projection)."""
        cfg = self.cfg
        b, t, _ = qkv.shape
        q, k, v = qkv.split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
        q = q.view(b, t, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = k.view(b, t, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = v.view(b, t, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0
        if kv_cache is not None:
            past = kv_cache.cached(layer)
            k, v = kv_cache.update(layer, k, v)
        dropout_p = cfg.attn_dropout if self.training else 0.0
        if self.explicit and kv_cache is None:  # grouped-query attention without repeating k and v
            y = explicit_attention(q, k, v, mask, dropout_p)
        else:
            if cfg.n_kv_head != cfg.n_head:  # grouped-query attention: each kv head serves n_head/n_kv_head queries
                k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
                v = v.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
            # Plain causal attention lets SDPA use its fused (flash) kernels; a cached single step sees everything.
            # (Decided on `past`, a Python int: a comparison of shapes would be symbolic under torch.compile.)
            is_causal = mask is None and past == 0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        return y.transpose(1, 2).reshape(b, t, cfg.q_size)

    def _rotate_rows(self, qkv: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """RoPE on the q and k of real-token rows `[n, q + 2 kv]` (`rope`: their cos/sin, `[n, 1, head_dim]`)."""
        return rotate_rows(qkv, *rope, self.cfg.q_size + self.cfg.kv_size, self.cfg.head_dim)


class MLP(nn.Module):
    """GPT-2: down(act(up(x))). Llama (SwiGLU): down(silu(gate(x)) * up(x)). `fast_dropout` (the CPU fast path):
    `fast_ops`' dropout and SwiGLU."""

    def __init__(self, cfg: ModelConfig, fast_dropout: bool = False):
        super().__init__()
        self.kind = cfg.mlp
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias) if cfg.mlp == "swiglu" else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.dropout = make_dropout(cfg.dropout, fast_dropout)
        self.lean = fast_dropout  # the CPU fast path: `fast_ops.swiglu`, which keeps less for backward

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None and self.lean:
            h = swiglu(self.gate(x), self.up(x))
        elif self.gate is not None:
            h = F.silu(self.gate(x)) * self.up(x)
        elif self.kind == "gelu_tanh":
            h = F.gelu(self.up(x), approximate="tanh")
        elif self.kind == "gelu":
            h = F.gelu(self.up(x))
        else:
            h = F.relu(self.up(x))
        return self.dropout(self.down(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, cpu_kernels: bool = False):
        super().__init__()
        self.norm_attn = make_norm(cfg)
        self.attn = Attention(cfg, cpu_kernels)
        self.norm_mlp = make_norm(cfg)
        self.mlp = MLP(cfg, cpu_kernels)

    def forward(self, x: Tensor, rope, mask, kv_cache, layer: int, layout: TokenLayout | None = None) -> Tensor:
        x = x + self.attn(self.norm_attn(x), rope, mask, kv_cache, layer, layout)
        return x + self.mlp(self.norm_mlp(x))


class Decoder(nn.Module):
    """A causal LM. `forward(input_ids) -> logits [batch, seq, vocab]`; see `forward` for packing and caching.

    `fast_path=True` builds it for the fast path of `fast_ops.py` (same function, faster on the measured shapes):
    the loss built for it is chunked (`model.fast_path`), and on a CPU `device` (default: torch's default
    device) its dropout and attention are `fast_ops`' (`model.cpu_kernels`; LoRA layers added later follow it).
    The kernels are fixed here: a model moved to another device afterwards keeps them (still correct)."""

    def __init__(self, cfg: ModelConfig, fast_path: bool = False, device: torch.device | str | None = None):
        super().__init__()
        self.config = cfg
        self.fast_path = fast_path
        device = torch.device(device) if device is not None else torch.get_default_device()
        # CUDA keeps SDPA (flash) and fused dropout; CPU's SDPA and bernoulli_ dropout are the slow ones.
        self.cpu_kernels = fast_path and device.type == "cpu"
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.d_model) if cfg.positions == "learned" else None
        self.embed_dropout = make_dropout(cfg.embed_dropout, self.cpu_kernels)
        self.blocks = nn.ModuleList(Block(cfg, self.cpu_kernels) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Activation checkpointing trades compute for memory on large shapes (off by default).
        self.gradient_checkpointing = False

    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation (benchmarks and from-scratch shapes); loading replaces all of it."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        doc_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Final-norm hidden states `[B, T, d_model]` (the LM head not applied)."""
        cfg = self.config
        b, t = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        layout = self._layout(attention_mask, position_ids, doc_ids, kv_cache)
        if position_ids is None:
            if attention_mask is not None:  # left padding: real tokens count from 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        x = self.embed(input_ids)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        else:
            rope = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
        mask = attention_mask_4d(b, t, past, input_ids.device, attention_mask, doc_ids)
        if layout is not None:
            x = layout.unpad(x)
            if rope is not None:  # cos/sin `[B, 1, T, head_dim]` -> the real tokens' `[n, 1, head_dim]`
                rope = tuple(layout.unpad(r.squeeze(1))[:, None] for r in rope)
        x = self.embed_dropout(x)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, kv_cache, i, layout, use_reentrant=False)
            else:
                x = block(x, rope, mask, kv_cache, i, layout)
        x = self.norm(x)
        return x if layout is None else layout.pad(x)

    def _layout(self, attention_mask: Tensor | None, position_ids: Tensor | None, doc_ids: Tensor | None,
                kv_cache: KVCache | None) -> TokenLayout | None:
        """Skip the padding (`TokenLayout`): the CPU fast path without a KV cache, outside `torch.compile` (the
        real-token count is a data-dependent shape; on CPU finding it costs no device sync). The padding is
        known from the attention mask, else from a right-padded batch's position ids."""
        if not self.cpu_kernels or kv_cache is not None or torch.compiler.is_compiling():
            return None
        if attention_mask is not None:  # packed batches keep their positions: their mask separates documents
            return TokenLayout.of(attention_mask, regroup=doc_ids is None)
        if position_ids is not None and doc_ids is None:
            return TokenLayout.of_right_padding(position_ids)
        return None

    def forward(self, input_ids: Tensor, **kwargs) -> Tensor:
        """Logits `[B, T, vocab]`. Keyword arguments as `hidden_states`:

        - `attention_mask [B, T]` (or `[B, past+T]` with a cache): 1 for real tokens, 0 for padding;
        - `doc_ids [B, T]`: packing; a token attends only to earlier tokens with the same id;
        - `position_ids [B, T]`: default counts real tokens from 0 (restart them per packed document);
        - `kv_cache`: a `KVCache`, extended in place.
        """
        return self.lm_head(self.hidden_states(input_ids, **kwargs))
