"""The fast path (`Decoder(fast_path=True)`, `models/fast_ops.py`) against the reference path: each kernel against
what it replaces (dropout, attention, the chunked LM-head loss), which kernels a model gets when it is built,
and whole training runs of 50 steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_loop import train_losses
from transformers import GPT2Config

from qatune.data.batching import label_positions
from qatune.lora import LoRAConfig, apply_lora, lora_layers
from qatune.models import decoder as model_mod
from qatune.models import fast_ops
from qatune.models.config import from_hf_config
from qatune.models.decoder import Decoder
from qatune.models.fast_ops import FastDropout, chunked_lm_loss, explicit_attention, fast_dropout

CPU = torch.device("cpu")


def _tiny_cfg(dropout: float = 0.0):
    return from_hf_config(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, resid_pdrop=dropout,
                                     embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0,
                                     eos_token_id=0).to_dict())


def test_fast_dropout_keeps_one_minus_p_and_scales():
    x = torch.ones(1_000_000, requires_grad=True)
    y = fast_dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(x * mask/0.9)/dx = mask/0.9


@pytest.mark.parametrize("padded", [False, True])
def test_explicit_attention_matches_sdpa(padded):
    q, k, v = torch.randn(3, 2, 4, 9, 16).unbind(0)
    mask = model_mod.attention_mask_4d(2, 9, 0, CPU, torch.tensor([[1] * 9, [1] * 6 + [0] * 3]), None) \
        if padded else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    torch.testing.assert_close(explicit_attention(q, k, v, mask, 0.0), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_trains", [True, False], ids=["full", "frozen-head"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_chunked_lm_loss_matches_cross_entropy(monkeypatch, label_smoothing, weight_trains):
    monkeypatch.setitem(fast_ops._LOSS_CHUNK_ELEMENTS, "cpu", 7 * 50)  # 7 rows per chunk: several chunks
    hidden = torch.randn(30, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=weight_trains)
    targets = torch.randint(0, 50, (30,))
    loss = chunked_lm_loss(hidden, weight, targets, label_smoothing)
    loss.mul(0.5).backward()
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_(weight_trains)
    expected = F.cross_entropy(h @ w.t(), targets, reduction="sum", label_smoothing=label_smoothing)
    expected.mul(0.5).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, h.grad)
    if weight_trains:
        torch.testing.assert_close(weight.grad, w.grad)
    with torch.no_grad():  # no gradient wanted: the same value
        torch.testing.assert_close(chunked_lm_loss(hidden, weight, targets, label_smoothing), expected)


def _dropouts(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, nn.Dropout)}


def test_kernels_are_chosen_when_the_model_is_built():
    """CPU: fast dropout (LoRA's too) and explicit attention; CUDA: SDPA and torch's dropout, chunked loss
    only; the reference: neither. Nothing in `forward` looks at the device."""
    cfg = _tiny_cfg(dropout=0.1)
    for device, fast_path, cpu_kernels in (("cpu", True, True), ("cuda", True, False), ("cpu", False, False)):
        model = Decoder(cfg, fast_path=fast_path, device=device)  # built here; `device` only picks kernels
        apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=["c_attn"]))
        assert model.fast_path == fast_path and model.cpu_kernels == cpu_kernels
        assert all(block.attn.explicit == cpu_kernels for block in model.blocks)
        assert _dropouts(model) == ({FastDropout} if cpu_kernels else {nn.Dropout})
        assert all(isinstance(layer.dropout, FastDropout) == cpu_kernels for layer in lora_layers(model).values())


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("dtype, rtol", [(None, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_fast_path_losses_follow_the_reference_over_50_steps(method, dtype, rtol, one_thread):
    """Dropout off: with it the fast path draws other masks (another random stream), by design."""
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    reference = Decoder(cfg)
    reference.init_weights()
    if method == "lora":
        apply_lora(reference, LoRAConfig(r=8, alpha=16, dropout=0.0, targets=["c_attn"]))
    fast = Decoder(cfg, fast_path=True)  # the same weights, LoRA's included, built with the fast path
    if method == "lora":
        apply_lora(fast, LoRAConfig(r=8, alpha=16, dropout=0.0, targets=["c_attn"]))
    fast.load_state_dict(reference.state_dict())
    data = torch.randint(0, 500, (4, 4, 48))  # 4 batches, cycled: the loss must fall
    batches = []
    for i in range(50):
        ids = data[i % 4]
        labels = ids.clone()
        labels[:, :16] = -100  # prompt positions, as answer-only QA labels
        batches.append({"input_ids": ids, **label_positions(labels)})
    ref_losses = train_losses(reference.train(), batches, dtype, lr=3e-3)
    fast_losses = train_losses(fast.train(), batches, dtype, lr=3e-3)
    assert ref_losses[0] - ref_losses[-1] > 0.05  # it trains (LoRA on a random base learns slowly)
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(ref_losses), rtol=rtol, atol=0)
