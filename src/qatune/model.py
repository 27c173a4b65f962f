"""The native decoder: GPT-2 family and Llama family (SmolLM2) in one plain-PyTorch code path.

Read it top to bottom: norms and positions, attention (with its mask and KV cache), MLP, block, decoder.
What differs between the families is a handful of `ModelConfig` flags, never a branch on the family name.

Attention runs through `scaled_dot_product_attention`. With no padding, no packing and no cache it passes
`is_causal=True` and no mask, so PyTorch may pick its flash kernel; otherwise a boolean mask is built from
`attention_mask` (padding), `doc_ids` (packing: a token sees only its own document) and the cache offset.

The fast path (`Decoder.set_fast_path(True)`, off by default; the default path is the reference) changes how,
never what, is computed; each part exists because `qatune bench` measured it (benchmarks/README.md):
- the LM head and the cross-entropy run a chunk of rows at a time (`chunked_lm_loss`): the `[tokens, vocab]`
  fp32 logits are never materialised, and the gradient is formed while the chunk is hot in cache;
- CPU only: dropout draws its mask with one vectorised `torch.rand` (`FastDropout`), and training attention
  runs as explicit low-precision matmuls (`explicit_attention`) instead of SDPA's CPU fallback, which upcasts
  to fp32 and draws its dropout mask with `bernoulli_`. On CUDA, SDPA (flash) and fused dropout are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


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


def fast_dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout with the keep-mask drawn by `torch.rand` (vectorised on CPU, unlike `bernoulli_`) and
    scaled once, so forward and backward are one multiply each. Same distribution as `F.dropout`, another
    random stream."""
    scaled_keep = (torch.rand(x.shape, device=x.device) >= p).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * scaled_keep


class FastDropout(nn.Dropout):
    """`nn.Dropout` using `fast_dropout` on CPU; elsewhere (CUDA has a fused dropout kernel) `nn.Dropout` itself.
    `Decoder.set_fast_path` swaps it in for every `nn.Dropout` of the model, LoRA's included."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return fast_dropout(x, self.p)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    """softmax(q k^T / sqrt(d), masked) v with the two matmuls in the input dtype (bf16 under autocast, as
    SDPA's CUDA kernels run them) and the softmax in fp32. On CPU, SDPA with dropout falls back to a path that
    upcasts bf16 to fp32 matmuls (about 8x slower) and draws its mask with `bernoulli_`. `mask`: bool
    `[B, 1, T, S]`, True = may attend; None = causal."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    if mask is None:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    if dropout_p > 0:
        probs = fast_dropout(probs, dropout_p)
    return torch.matmul(probs, v)


class _ChunkedLMLoss(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, `chunk` rows at a time.

    Forward computes each chunk's logits (matmul in `dtype`, as autocast would; softmax in fp32), its loss and,
    when a gradient will be needed, its gradient (softmax - smoothed one-hot), turned at once into the gradient
    of `hidden`; backward only scales that. The `[rows, vocab]` gradient is kept (in `dtype`) only when the
    weight itself trains (full fine-tuning), for one `g.T @ hidden` matmul in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, label_smoothing: float, chunk: int,
                dtype: torch.dtype, need_grad: bool) -> Tensor:
        h, w = hidden.to(dtype), weight.to(dtype)
        want_h = need_grad and ctx.needs_input_grad[0]
        want_w = need_grad and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_logits: list[Tensor] = []
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, h.shape[0], chunk):
            target = targets[start:start + chunk, None]
            logits = (h[start:start + chunk] @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            nll = lse - logits.gather(1, target)
            if label_smoothing:
                nll = (1 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(-1, keepdim=True))
            total += nll.sum()
            if want_h or want_w:
                grad = logits.sub_(lse).exp_()  # softmax, in place of the logits
                grad.scatter_add_(1, target, grad.new_full(target.shape, label_smoothing - 1))
                if label_smoothing:
                    grad.sub_(label_smoothing / grad.shape[-1])
                grad = grad.to(dtype)
                if want_h:
                    grad_h[start:start + chunk] = grad @ w
                if want_w:
                    grad_logits.append(grad)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.save_for_backward(grad_h, torch.cat(grad_logits) if want_w else None, h if want_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_h, grad_logits, h = ctx.saved_tensors
        d_hidden = grad_h.to(ctx.hidden_dtype) * grad_total if grad_h is not None else None
        d_weight = (grad_logits.t() @ h).to(ctx.weight_dtype) * grad_total if grad_logits is not None else None
        return d_hidden, d_weight, None, None, None, None, None


# Logits per chunk, in elements: 32 MiB of fp32 on CPU (about the L3 cache), 512 MiB on GPUs (for GPT-2's
# vocabulary, 2,670 rows: matmuls still large, a few chunks for a 16 x 512 batch).
_LOSS_CHUNK_ELEMENTS = {"cpu": 2**23, "cuda": 2**27}


def chunked_lm_loss(hidden: Tensor, weight: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """`F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")` without the full logits.

    Under autocast the matmuls run in the autocast dtype, as `F.linear` would; the loss is fp32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    chunk = max(1, _LOSS_CHUNK_ELEMENTS.get(device, 2**23) // weight.shape[0])
    with torch.autocast(device, enabled=False):
        return _ChunkedLMLoss.apply(hidden, weight, targets, label_smoothing, chunk, dtype,
                                    torch.is_grad_enabled())


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.fast = False  # set by Decoder.set_fast_path
        # q, k and v share one matmul (GPT-2's c_attn; Llama's q/k/v_proj are concatenated on load).
        self.qkv = nn.Linear(cfg.d_model, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attn_bias)
        self.o = nn.Linear(cfg.q_size, cfg.d_model, bias=cfg.attn_bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        kv_cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
        q = q.view(b, t, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = k.view(b, t, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = v.view(b, t, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        if cfg.n_kv_head != cfg.n_head:  # grouped-query attention: each kv head serves n_head/n_kv_head queries
            k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
            v = v.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
        # Plain causal attention lets SDPA use its fused (flash) kernels; a cached single step sees everything.
        is_causal = mask is None and k.shape[2] == t
        dropout_p = cfg.attn_dropout if self.training else 0.0
        if self.fast and x.device.type == "cpu" and kv_cache is None:
            y = explicit_attention(q, k, v, mask, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(b, t, cfg.q_size)
        return self.resid_dropout(self.o(y))


class MLP(nn.Module):
    """GPT-2: down(act(up(x))). Llama (SwiGLU): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias) if cfg.mlp == "swiglu" else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            h = F.silu(self.gate(x)) * self.up(x)
        elif self.kind == "gelu_tanh":
            h = F.gelu(self.up(x), approximate="tanh")
        elif self.kind == "gelu":
            h = F.gelu(self.up(x))
        else:
            h = F.relu(self.up(x))
        return self.dropout(self.down(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_attn = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm_mlp = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope, mask, kv_cache, layer: int) -> Tensor:
        x = x + self.attn(self.norm_attn(x), rope, mask, kv_cache, layer)
        return x + self.mlp(self.norm_mlp(x))


class Decoder(nn.Module):
    """A causal LM. `forward(input_ids) -> logits [batch, seq, vocab]`; see `forward` for packing and caching."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.d_model) if cfg.positions == "learned" else None
        self.embed_dropout = nn.Dropout(cfg.embed_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Activation checkpointing trades compute for memory on large shapes (off by default).
        self.gradient_checkpointing = False
        self.fast_path = False  # see set_fast_path

    def set_fast_path(self, enabled: bool = True) -> Decoder:
        """Switch the fast path (module docstring) on or off; the default (off) is the reference path.

        Swaps every `nn.Dropout` of the model for a `FastDropout` and back, so call it after `apply_lora` for
        LoRA's dropout to be included. Losses agree with the reference within low-precision rounding; with
        dropout the masks differ (another random stream), as with any change of kernel."""
        self.fast_path = enabled
        for module in self.modules():
            if isinstance(module, Attention):
                module.fast = enabled
            for name, child in module.named_children():
                if type(child) is (nn.Dropout if enabled else FastDropout):
                    swapped = (FastDropout if enabled else nn.Dropout)(child.p)
                    setattr(module, name, swapped.train(child.training))
        return self

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
        x = self.embed_dropout(x)
        mask = attention_mask_4d(b, t, past, input_ids.device, attention_mask, doc_ids)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, kv_cache, i, use_reentrant=False)
            else:
                x = block(x, rope, mask, kv_cache, i)
        return self.norm(x)

    def forward(self, input_ids: Tensor, **kwargs) -> Tensor:
        """Logits `[B, T, vocab]`. Keyword arguments as `hidden_states`:

        - `attention_mask [B, T]` (or `[B, past+T]` with a cache): 1 for real tokens, 0 for padding;
        - `doc_ids [B, T]`: packing; a token attends only to earlier tokens with the same id;
        - `position_ids [B, T]`: default counts real tokens from 0 (restart them per packed document);
        - `kv_cache`: a `KVCache`, extended in place.
        """
        return self.lm_head(self.hidden_states(input_ids, **kwargs))

    def loss(self, batch: dict[str, Tensor], reduction: str = "mean", label_smoothing: float = 0.0
             ) -> tuple[Tensor, int]:
        """Next-token cross-entropy over labelled positions ("mean" or "sum"), and how many there were.

        Labels are aligned with input_ids (position t predicts labels[t+1]); -100 is ignored. The LM head runs
        only where a label exists: with answer-only loss most QA tokens are prompt, so this skips most of the
        largest matmul and never materialises logits for the whole batch. `attention_mask` is only needed for
        left padding or packing: right padding cannot affect earlier tokens under a causal mask. The fast path
        computes the same loss chunk by chunk (`chunked_lm_loss`)."""
        hidden = self.hidden_states(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            attention_mask=batch.get("attention_mask"),
            doc_ids=batch.get("doc_ids"),
        )
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        n = int(keep.sum())
        if self.fast_path:
            loss = chunked_lm_loss(hidden[:, :-1][keep], self.lm_head.weight, targets[keep], label_smoothing)
            return (loss / max(n, 1) if reduction == "mean" else loss), n
        logits = self.lm_head(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum", label_smoothing=label_smoothing)
        return (loss / max(n, 1) if reduction == "mean" else loss), n


def num_params(model: nn.Module) -> int:
    """Parameters counted once even when tied (as Hugging Face and peft count them)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
