"""The fast path: kernels that change how the decoder computes, never what (`Decoder(cfg, fast_path=True)`).

`decoder.py` is the reference; a model built with `fast_path=True` (what `qatune train` does unless
`train.fast_path=false`) uses these pieces instead, each because `qatune bench` measured it
(benchmarks/README.md):
- the LM head and the cross-entropy run a chunk of rows at a time (`chunked_lm_loss`, which the training loss
  `evaluation.loss.next_token_loss` uses for a fast-path model): the `[tokens, vocab]` fp32 logits are never
  materialised, and the gradient is formed while the chunk is hot in cache;
- CPU only: dropout draws its mask from raw random bits (`FastDropout`, `keep_mask`), and attention without a
  KV cache runs as explicit low-precision matmuls (`explicit_attention`) instead of SDPA's CPU fallback, which
  upcasts to fp32 and draws its dropout mask with `bernoulli_`; grouped-query attention serves the query
  heads of each kv head in one matmul, without repeating k and v. SwiGLU (`swiglu`) and dropout keep less for
  backward. `token_layout.TokenLayout` (also CPU only) runs token-wise work on the real tokens of a padded batch
  and attention by groups of sequences of similar length; RoPE (`rotate_rows`) and the masked softmax
  (`masked_softmax`) run as one autograd node each.
  On CUDA, SDPA (flash) and fused dropout are kept. Which kernels run is decided when the model is built, for
  the device it is built on.
- `store_frozen_linear_in`: LoRA's frozen linear weights held in the autocast dtype (`training.build`);
  `frozen_cast`: a frozen LM head cast to the autocast dtype once, not at every step.

Losses agree with the reference within low-precision rounding; with dropout the masks differ (another random
stream), as with any change of kernel (tests/test_fast_path.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary


def store_frozen_linear_in(linear: nn.Linear, dtype: torch.dtype) -> None:
    """Keep a frozen linear layer's weights in `dtype` (LoRA's base under autocast to that dtype).

    Under autocast the matmul sees exactly the values autocast would have cast the fp32 weights to. Outside
    autocast (answers generated during training) an input of another dtype is cast to the weights' dtype by a
    forward pre-hook; the layer's output is then in that dtype, as the weights' precision implies. The layer
    stays an `nn.Linear`. Trainable parameters are left as they are."""
    for p in linear.parameters(recurse=False):
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    linear.register_forward_pre_hook(_input_to_weight_dtype)


def _input_to_weight_dtype(linear: nn.Linear, args: tuple) -> tuple | None:
    x = args[0]
    if x.dtype != linear.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return (x.to(linear.weight.dtype), *args[1:])
    return None


def make_dropout(p: float, fast: bool) -> nn.Dropout:
    """The dropout module of a model built with (`fast`: the fast path, for the CPU) or without `FastDropout`."""
    return FastDropout(p) if fast else nn.Dropout(p)


def fast_dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout with the keep-mask drawn from raw random bits (`keep_mask`, ~2.5x faster on CPU than
    `torch.rand`, itself much faster than `bernoulli_`) and scaled once, so forward and backward are one multiply
    each. Backward keeps the mask as booleans (`_ScaledKeep`), a quarter of an fp32 mask."""
    return _ScaledKeep.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


# 16 random bits per element: four elements per 64-bit draw (`random_` over the whole int64 range: every bit
# uniform, unlike `random_()`'s [0, 2**63)).
_BITS = 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """Booleans, each True with probability 1 - p (independently), from 16 random bits per element: an element
    is dropped when its bits, read as a signed int16, fall in the lowest round(p * 2**16) of the 2**16 values.
    p is thereby rounded to a multiple of 2**-16 (0.1 -> 0.1000061), well below what any training notices;
    drawing whole 64-bit words is what makes it fast (tests/test_llama_speed.py checks the rate). Under
    `torch.compile`: `torch.rand(shape) >= p`."""
    if torch.compiler.is_compiling():  # dynamo cannot trace `random_`; compiled code fuses `rand` anyway
        return torch.rand(shape, device=device) >= p
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, 2**63 - 1)
    threshold = round(p * 2**_BITS) - 2 ** (_BITS - 1)
    return (words.view(torch.int16)[:n] >= threshold).view(shape)


class _ScaledKeep(torch.autograd.Function):
    """`x * keep * scale`, with `keep * scale` formed in `x`'s dtype (forward and backward alike)."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep.to(x.dtype).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype).mul_(ctx.scale), None, None


class _SwiGLU(torch.autograd.Function):
    """`silu(gate) * up` keeping only `gate` and `up` for backward (autograd also keeps `silu(gate)`, one more
    `[tokens, d_ff]` tensor per layer); backward recomputes it. The same values as autograd's, op for op."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """`F.silu(gate) * up` with less kept for backward (`_SwiGLU`)."""
    return _SwiGLU.apply(gate, up)


class FastDropout(nn.Dropout):
    """`nn.Dropout` computed by `fast_dropout`. A fast-path model built for the CPU uses it for every dropout,
    LoRA's included (CUDA has a fused dropout kernel: models built for it keep `nn.Dropout`)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return fast_dropout(x, self.p)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    """softmax(q k^T / sqrt(d), masked) v with the two matmuls in the input dtype (bf16 under autocast, as
    SDPA's CUDA kernels run them) and the softmax in fp32. On CPU, SDPA with dropout falls back to a path that
    upcasts bf16 to fp32 matmuls (about 8x slower) and draws its mask with `bernoulli_`; without dropout its
    flash kernel is still slower here on small heads (measured: benchmarks/README.md). `mask`: bool
    `[B, 1, T, S]`, True = may attend; None = causal.

    Grouped-query attention (`k`, `v` with fewer heads than `q`) is computed without repeating k and v: the
    `G` query heads that share a kv head are stacked into one `[G * T, d]` matrix, so each kv head serves them
    in one larger matmul (no copy of k/v, fewer, larger matmuls)."""
    b, h, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    scores = torch.matmul((q * d**-0.5).reshape(b, kv, g * t, d), k.transpose(-1, -2)).view(b, kv, g, t, s)
    if mask is None:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    else:
        mask = mask[:, :, None]  # [B, 1, 1, T, S]: the same for every query head of a group
    probs = masked_softmax(scores, mask).to(v.dtype)
    if dropout_p > 0:
        probs = fast_dropout(probs, dropout_p)
    return torch.matmul(probs.view(b, kv, g * t, s), v).view(b, h, t, d)


class _MaskedSoftmax(torch.autograd.Function):
    """`softmax(scores.masked_fill(~mask, -inf), dtype=fp32)`, cast back to the scores' dtype, as one autograd
    node: the values of the masked fill, the fp32 softmax and the cast, each op for op. Backward is the fp32
    softmax backward from the fp32 probabilities it keeps; a masked position has probability 0 and so gradient
    0, which makes the masked fill's own backward pass (and the casts' nodes) unnecessary."""

    @staticmethod
    def forward(ctx, scores: Tensor, mask: Tensor) -> Tensor:
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32)
        ctx.save_for_backward(probs)
        ctx.scores_dtype = scores.dtype
        return probs.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (probs,) = ctx.saved_tensors
        return torch.ops.aten._softmax_backward_data(grad.float(), probs, -1, torch.float32).to(ctx.scores_dtype), None


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """`softmax(scores.masked_fill(~mask, -inf), dtype=fp32).to(scores.dtype)` as one node (`_MaskedSoftmax`)."""
    return _MaskedSoftmax.apply(scores, mask)


class _RotateRows(torch.autograd.Function):
    """Rotary embeddings on the first `width` columns (the q and k heads) of real-token rows `[n, width + v]`,
    `cos`/`sin` `[n, 1, head_dim]` per row; the other columns (v) pass through. One autograd node instead of
    the reference's ~20 (`decoder.apply_rope` per q and k, casts, concatenations), with its values bit for bit:
    forward is its arithmetic in fp32, rounded once to the rows' dtype; backward rotates the gradient back by
    the opposite angle, rounding each product to the rows' dtype before the sum, as the reference's autograd
    does (more exact sums drift apart from it over a bf16 full fine-tuning)."""

    @staticmethod
    def forward(ctx, rows: Tensor, cos: Tensor, sin: Tensor, width: int, head_dim: int) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.width, ctx.head_dim = width, head_dim
        out, (x1, x2), (c, s), (o1, o2) = _rotation_parts(rows, cos, sin, width, head_dim)
        o1.copy_(x1 * c - x2 * s)
        o2.copy_(x2 * c + x1 * s)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        out, (g1, g2), (c, s), (o1, o2) = _rotation_parts(grad, cos, sin, ctx.width, ctx.head_dim)
        low = grad.dtype
        o1.copy_((g1 * c).to(low) + (g2 * s).to(low))
        o2.copy_((g2 * c).to(low) - (g1 * s).to(low))
        return out, None, None, None, None


def _rotation_parts(rows: Tensor, cos: Tensor, sin: Tensor, width: int, head_dim: int):
    """For a rotation of `rows`' heads (the rotate-half layout: `cos`, `sin` repeat over the two halves): a new
    tensor with the pass-through columns copied, the fp32 halves of the heads, cos/sin of one half, and the
    output's two halves to write."""
    half = head_dim // 2
    out = torch.empty_like(rows)
    out[:, width:] = rows[:, width:]
    heads = rows[:, :width].unflatten(1, (-1, head_dim)).float()
    written = out[:, :width].unflatten(1, (-1, head_dim))
    return (out, (heads[..., :half], heads[..., half:]), (cos[..., :half], sin[..., :half]),
            (written[..., :half], written[..., half:]))


def rotate_rows(rows: Tensor, cos: Tensor, sin: Tensor, width: int, head_dim: int) -> Tensor:
    """RoPE on the q and k columns of packed real-token rows (`_RotateRows`), as `decoder.apply_rope` computes it."""
    return _RotateRows.apply(rows, cos, sin, width, head_dim)


@torch.library.custom_op("qatune::chunked_lm_loss", mutates_args=())
def _chunked_lm_loss(hidden: Tensor, weight: Tensor, targets: Tensor, label_smoothing: float, chunk: int,
                     dtype: torch.dtype, want_h: bool, want_w: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, `chunk` rows at a time; and, as requested,
    the gradient of that sum with respect to `hidden` (in `dtype`) and the `[rows, vocab]` gradient of the
    logits (empty otherwise).

    Each chunk's logits are computed (matmul in `dtype`, as autocast would; softmax in fp32), then its loss and,
    when wanted, its gradient (softmax - smoothed one-hot), turned at once into the gradient of `hidden`, so
    backward only scales it. The logits' gradient (in `dtype`) is kept only when the weight itself trains (full
    fine-tuning), for one `g.T @ hidden` matmul in backward. A custom op, so that `torch.compile` sees one opaque
    call whatever the number of rows (a Python loop over them would specialise the graph on it)."""
    h, w = hidden.to(dtype), weight.to(dtype)
    grad_h = torch.empty_like(h) if want_h else h.new_empty(0)
    grad_logits: list[Tensor] = []
    total = torch.zeros((), dtype=torch.float32, device=h.device)
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
            grad = grad.to(h.dtype)
            if want_h:
                grad_h[start:start + chunk] = grad @ w
            if want_w:
                grad_logits.append(grad)
    return total, grad_h, torch.cat(grad_logits) if want_w and grad_logits else h.new_empty(0)


@_chunked_lm_loss.register_fake
def _(hidden, weight, targets, label_smoothing, chunk, dtype, want_h, want_w):
    empty = hidden.new_empty(0, dtype=dtype)
    grad_h = hidden.new_empty(hidden.shape, dtype=dtype) if want_h else empty
    grad_logits = hidden.new_empty(hidden.shape[0], weight.shape[0], dtype=dtype) if want_w else empty
    return hidden.new_empty((), dtype=torch.float32), grad_h, grad_logits


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, _, _, _, dtype, want_h, want_w = inputs
    _, grad_h, grad_logits = output
    ctx.want_h, ctx.want_w, ctx.dtype = want_h, want_w, dtype
    ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
    ctx.save_for_backward(grad_h, grad_logits, hidden if want_w else None)


def _backward(ctx, grad_total: Tensor, _grad_h: Tensor, _grad_logits: Tensor):
    grad_h, grad_logits, hidden = ctx.saved_tensors
    d_hidden = grad_h.to(ctx.hidden_dtype) * grad_total if ctx.want_h else None
    # The scale goes onto the [rows, d] hidden states rather than onto the [vocab, d] product: one pass less
    # over a matrix the size of the weight.
    d_weight = (grad_logits.t() @ (hidden * grad_total).to(ctx.dtype)).to(ctx.weight_dtype) if ctx.want_w else None
    return d_hidden, d_weight, None, None, None, None, None, None


_chunked_lm_loss.register_autograd(_backward, setup_context=_setup_context)

# Logits per chunk, in elements: 32 MiB of fp32 on CPU (about the L3 cache), 512 MiB on GPUs (for GPT-2's
# vocabulary, 2,670 rows: matmuls still large, a few chunks for a 16 x 512 batch).
_LOSS_CHUNK_ELEMENTS = {"cpu": 2**23, "cuda": 2**27}


def chunked_lm_loss(hidden: Tensor, weight: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """`F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")` without the full logits.

    Under autocast the matmuls run in the autocast dtype, as `F.linear` would; the loss is fp32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    chunk = max(1, _LOSS_CHUNK_ELEMENTS.get(device, 2**23) // weight.shape[0])
    grad = torch.is_grad_enabled()
    weight = frozen_cast(weight, dtype)
    with torch.autocast(device, enabled=False):
        total, _, _ = _chunked_lm_loss(hidden, weight, targets, float(label_smoothing), chunk, dtype,
                                       grad and hidden.requires_grad, grad and weight.requires_grad)
    return total


# A frozen weight's low-precision copy, per weight, while the weight is unchanged: LoRA's tied embedding / LM head
# (49,152 x 576 for SmolLM2) would otherwise be cast again at every step.
_FROZEN_CASTS = WeakIdKeyDictionary()  # by identity: tensors' == compares values


def frozen_cast(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """`weight.to(dtype)`, kept between calls when the weight does not train. The copy is made again when the
    weight changes (in-place writes such as `load_state_dict` or merging bump its version counter; `.data`
    assignments change its storage); under `torch.compile` the cast is left to the graph."""
    if weight.requires_grad or weight.dtype == dtype or torch.compiler.is_compiling():
        return weight
    key = (weight._version, weight.data_ptr(), dtype)
    kept = _FROZEN_CASTS.get(weight)
    if kept is None or kept[0] != key:
        kept = (key, weight.detach().to(dtype))
        _FROZEN_CASTS[weight] = kept
    return kept[1]
