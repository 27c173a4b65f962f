"""The optimised Llama (SmolLM2-shaped) training path against the unoptimised one.

Optimised = what `qatune train` builds now for a native LoRA run under bf16 autocast on CPU: the fast path
(`Decoder(fast_path=True)`: chunked loss, grouped-query attention without repeated k/v, the padding skipped
by `TokenLayout`) with the frozen linear weights kept in bf16 (`training.build.keep_frozen_linears_low`).
Unoptimised = the reference `Decoder` with fp32 weights. Each piece is also checked on its own, against
transformers' Llama or against the computation it replaces.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from packaging.version import Version
from train_loop import train_losses
from transformers import LlamaConfig, LlamaForCausalLM

from qatune.data.batching import Feature, collate, to_device
from qatune.evaluation.loss import model_loss
from qatune.lora import LoRAConfig, apply_lora
from qatune.models import decoder as model_mod
from qatune.models import fast_ops
from qatune.models.config import from_hf_config
from qatune.models.decoder import Decoder
from qatune.models.fast_ops import explicit_attention
from qatune.models.token_layout import TokenLayout
from qatune.models.weights import native_to_hf
from qatune.training.build import keep_frozen_linears_low

CPU = torch.device("cpu")
HF = dict(vocab_size=500, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
          num_key_value_heads=2, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
          max_position_embeddings=256)


def _cfg():
    return from_hf_config(LlamaConfig(**HF).to_dict())


def _padded_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """QA-like rows of different lengths (right padding, answer-only labels), collated as training does."""
    g = torch.Generator().manual_seed(seed)
    plans = []
    for _batch in range(4):
        rows = []
        for _ in range(4):
            length = int(torch.randint(12, 40, (1,), generator=g))
            ids = torch.randint(3, 500, (length,), generator=g).tolist()
            rows.append(Feature(ids, [-100] * (length - 5) + ids[-5:]))
        plans.append(collate(rows, pad_id=0))
    return [plans[i % len(plans)] for i in range(n)]


def _models(method: str) -> tuple[Decoder, Decoder]:
    torch.manual_seed(0)
    reference = Decoder(_cfg())
    reference.init_weights(0.1)
    lora = LoRAConfig(r=8, alpha=16, dropout=0.0)  # the family default targets: q and v
    if method == "lora":
        apply_lora(reference, lora)
    optimised = Decoder(_cfg(), fast_path=True, device="cpu")
    if method == "lora":
        apply_lora(optimised, lora)
    optimised.load_state_dict(reference.state_dict())
    if method == "lora":
        keep_frozen_linears_low(optimised, "bf16")
    return reference.train(), optimised.train()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_optimised_llama_path_trains_like_the_unoptimised_one(method, one_thread):
    """40 bf16 steps on padded QA-like batches: the losses follow the reference's within bf16 rounding."""
    if method == "full" and Version(torch.__version__.split("+")[0]) < Version("2.8"):
        pytest.skip("under torch 2.7 (the declared floor) the two bf16 full fine-tuning runs drift 9% apart over "
                    "40 steps (measured); the fp32 comparison below holds there")
    reference, optimised = _models(method)
    assert {p.dtype for n, p in optimised.named_parameters() if "blocks" in n and "base.weight" in n} == \
        ({torch.bfloat16} if method == "lora" else set())
    batches = _padded_batches(40)
    ref_losses = train_losses(reference, batches, torch.bfloat16, lr=2e-3)
    opt_losses = train_losses(optimised, batches, torch.bfloat16, lr=2e-3)
    assert ref_losses[0] - ref_losses[-1] > 0.1  # it trains
    torch.testing.assert_close(torch.tensor(opt_losses), torch.tensor(ref_losses), rtol=2e-2, atol=0)


def test_fp32_optimised_llama_path_matches_closely(one_thread):
    """fp32 (no autocast: the weights stay fp32): only the summation order differs."""
    reference, optimised = _models("full")
    batches = _padded_batches(20)
    torch.testing.assert_close(torch.tensor(train_losses(optimised, batches, None, lr=2e-3)),
                               torch.tensor(train_losses(reference, batches, None, lr=2e-3)), rtol=1e-4, atol=0)


def test_bf16_frozen_linears_give_bit_identical_losses_under_autocast():
    """Autocast casts an fp32 weight to bf16 at each use: stored in bf16, the same values go in."""
    torch.manual_seed(0)
    fp32 = Decoder(_cfg())
    fp32.init_weights(0.1)
    apply_lora(fp32, LoRAConfig(r=8, alpha=16, dropout=0.0))
    low = Decoder(_cfg())
    apply_lora(low, LoRAConfig(r=8, alpha=16, dropout=0.0))
    low.load_state_dict(fp32.state_dict())
    keep_frozen_linears_low(low, "bf16")
    assert low.embed.weight.dtype == torch.float32 and low.blocks[0].norm_attn.weight.dtype == torch.float32
    assert low.blocks[0].mlp.up.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in low.parameters() if p.requires_grad)
    batch = _padded_batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model_loss(fp32, batch), model_loss(low, batch)
    a.backward()
    b.backward()
    assert a.item() == b.item()
    for (name, p), q in zip(fp32.named_parameters(), low.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name
    keep_frozen_linears_low(fp32, "fp32")  # fp32 precision: nothing changes
    assert all(p.dtype == torch.float32 for p in fp32.parameters())


def test_bf16_frozen_linears_still_run_outside_autocast():
    """Generating answers during training runs without autocast: an fp32 input meets a bf16 weight."""
    torch.manual_seed(0)
    model = Decoder(_cfg())
    model.init_weights(0.1)
    apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0))
    ids = torch.randint(0, 500, (2, 10))
    with torch.no_grad():
        expected = model(ids)
        keep_frozen_linears_low(model, "bf16")
        got = model(ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("side", ["right", "left"])
def test_skipping_the_padding_keeps_the_real_tokens_values(side):
    """`TokenLayout`: the real tokens' hidden states and logits are those of the padded computation (fp32)."""
    torch.manual_seed(0)
    reference = Decoder(_cfg())
    reference.init_weights(0.1)
    fast = Decoder(_cfg(), fast_path=True, device="cpu")
    fast.load_state_dict(reference.state_dict())
    ids = torch.randint(3, 500, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    for row, n in ((0, 5), (1, 11)):
        if side == "right":
            mask[row, 16 - n:] = 0
        else:
            mask[row, :n] = 0
    layout = TokenLayout.of(mask)
    assert layout.keep.numel() == int(mask.sum()) and TokenLayout.of(torch.ones_like(mask)) is None
    with torch.no_grad():
        expected, got = reference(ids, attention_mask=mask), fast(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_grouped_query_explicit_attention_matches_sdpa_on_repeated_heads(padded):
    """6 query heads over 2 kv heads: no repeat of k/v, the same result as SDPA on repeated heads."""
    q = torch.randn(2, 6, 9, 16)
    k, v = torch.randn(2, 2, 2, 9, 16).unbind(0)
    mask = model_mod.attention_mask_4d(2, 9, 0, CPU, torch.tensor([[1] * 9, [1] * 6 + [0] * 3]), None) \
        if padded else None
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                              attn_mask=mask, is_causal=mask is None)
    torch.testing.assert_close(explicit_attention(q, k, v, mask, 0.0), expected, rtol=1e-5, atol=1e-5)


def test_optimised_llama_loss_equals_transformers_llama():
    """The optimised path against an independent reference: transformers' Llama with the same weights."""
    torch.manual_seed(0)
    cfg = _cfg()
    model = Decoder(cfg)
    model.init_weights(0.1)
    fast = Decoder(cfg, fast_path=True, device="cpu")
    fast.load_state_dict(model.state_dict())
    hf = LlamaForCausalLM(LlamaConfig(**HF, attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(dict(native_to_hf(model.state_dict(), cfg)), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    batch = _padded_batches(1)[0]
    with torch.no_grad():
        logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = logits.reshape(-1, logits.shape[-1])[batch["loss_positions"]]
        expected = F.cross_entropy(rows, batch["loss_targets"], reduction="sum")
        got = model_loss(fast.eval(), batch, chunked=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_right_padding_is_read_from_collated_position_ids():
    """`to_device` drops the mask of a right-padded batch: the layout then comes from its position ids, and
    only from a numbering collation makes (anything else: every position is computed)."""
    batch = _padded_batches(1)[0]
    layout = TokenLayout.of_right_padding(batch["position_ids"])
    assert layout is not None and torch.equal(layout.keep, batch["attention_mask"].reshape(-1).nonzero()[:, 0])
    offset = torch.arange(5, 25).expand(2, 20)  # a continuation: positions do not start at 0
    restart = torch.tensor([[0, 1, 2, 0, 1, 0]])  # positions restarting within a row (packing without doc ids)
    full = torch.arange(20).expand(2, 20)  # no padding
    assert all(TokenLayout.of_right_padding(p) is None for p in (offset, restart, full))
    torch.manual_seed(0)
    reference = Decoder(_cfg())
    reference.init_weights(0.1)
    fast = Decoder(_cfg(), fast_path=True, device="cpu")
    fast.load_state_dict(reference.state_dict())
    moved = to_device(batch, CPU)
    assert "attention_mask" not in moved
    with torch.no_grad():
        torch.testing.assert_close(model_loss(fast, moved, chunked=True), model_loss(reference, moved),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_swiglu_and_dropout_equal_autograd_bit_for_bit(dtype):
    """`fast_ops.swiglu` and `fast_dropout` keep less for backward; forward and backward values are autograd's."""
    torch.manual_seed(0)
    gate, up, grad = torch.randn(3, 5, 40).to(dtype).unbind(0)
    outputs = []
    for f in (lambda g, u: F.silu(g) * u, fast_ops.swiglu):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        y = f(g, u)
        y.backward(grad)
        outputs.append((y, g.grad, u.grad))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
    x = torch.randn(50, 40).to(dtype).requires_grad_()
    torch.manual_seed(1)
    y = fast_ops.fast_dropout(x, 0.1)
    y.backward(grad.repeat(10, 1))
    torch.manual_seed(1)
    scaled_keep = fast_ops.keep_mask(x.shape, 0.1, x.device).to(dtype).mul_(1 / 0.9)  # the same draw
    assert torch.equal(y, x.detach() * scaled_keep)
    assert torch.equal(x.grad, grad.repeat(10, 1) * scaled_keep)


def _reference_rotation(rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int):
    """RoPE on the q/k heads of `rows` by `decoder.apply_rope`, under autograd (what `rotate_rows` replaces)."""
    n = rows.shape[0]
    qk, v = rows.split((heads * head_dim, rows.shape[1] - heads * head_dim), dim=-1)
    return torch.cat((model_mod.apply_rope(qk.view(n, heads, head_dim), cos, sin).reshape(n, -1), v), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_rows_equals_apply_rope_bit_for_bit(dtype):
    """One autograd node for RoPE on real-token rows: forward values and gradients are the reference's."""
    torch.manual_seed(0)
    heads, head_dim, n = 5, 16, 23  # 5 rotated heads (q and k), then v's 32 columns
    cos, sin = (t.squeeze(0).squeeze(0)[:, None] for t in
                model_mod.rope_cos_sin(torch.arange(n)[None], head_dim, 10000.0))
    rows, grad = torch.randn(2, n, heads * head_dim + 32).to(dtype).unbind(0)
    results = []
    for f in (lambda r: _reference_rotation(r, cos, sin, heads, head_dim),
              lambda r: fast_ops.rotate_rows(r, cos, sin, heads * head_dim, head_dim)):
        x = rows.clone().requires_grad_()
        y = f(x)
        y.backward(grad)
        results.append((y, x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_softmax_equals_autograd_bit_for_bit(dtype):
    torch.manual_seed(0)
    scores, grad = torch.randn(2, 3, 2, 7, 7).to(dtype).unbind(0)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    results = []
    for f in (lambda s: torch.softmax(s.masked_fill(~mask, float("-inf")), -1, dtype=torch.float32).to(dtype),
              lambda s: fast_ops.masked_softmax(s, mask)):
        x = scores.clone().requires_grad_()
        y = f(x)
        y.backward(grad)
        results.append((y, x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not results[1][1][..., ~mask].any()  # masked scores get no gradient


def test_frozen_casts_are_kept_until_the_weight_changes():
    weight = torch.randn(50, 8)
    low = fast_ops.frozen_cast(weight, torch.bfloat16)
    assert low.dtype == torch.bfloat16 and torch.equal(low, weight.to(torch.bfloat16))
    assert fast_ops.frozen_cast(weight, torch.bfloat16) is low  # the same copy at the next step
    weight.add_(1.0)  # an in-place change (loading, merging) bumps the version: a new copy
    again = fast_ops.frozen_cast(weight, torch.bfloat16)
    assert again is not low and torch.equal(again, weight.to(torch.bfloat16))
    trains = torch.randn(50, 8, requires_grad=True)
    assert fast_ops.frozen_cast(trains, torch.bfloat16) is trains  # a trained weight is cast where it is used
    assert fast_ops.frozen_cast(weight, torch.float32) is weight


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_masks_are_uniform_in_every_lane_of_a_random_word(p):
    """Four elements share each 64-bit draw: each of the four 16-bit lanes keeps 1 - p (within 4 standard errors
    of 250,000 draws), and neighbouring lanes are independent."""
    torch.manual_seed(0)
    keep = fast_ops.keep_mask(torch.Size([1000, 1000]), p, CPU).reshape(-1, 4).float()
    limit = 4 * (p * (1 - p) / keep.shape[0]) ** 0.5
    assert ((keep.mean(0) - (1 - p)).abs() < limit).all()
    both = (keep[:, 0] * keep[:, 1]).mean()
    assert abs(float(both) - (1 - p) ** 2) < 2 * limit
