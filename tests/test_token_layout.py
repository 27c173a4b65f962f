"""`models.token_layout`: the real tokens of padded batches, regrouped by length for attention (CPU fast path)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from qatune.models import token_layout as layout_mod
from qatune.models.config import from_hf_config
from qatune.models.decoder import Decoder
from qatune.models.token_layout import TokenLayout, plan_groups

CFG = dict(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
           num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=128)


def test_plan_groups_splits_where_the_saved_pairs_outweigh_a_group(monkeypatch):
    monkeypatch.setattr(layout_mod, "GROUP_OVERHEAD_PAIRS", 1000)
    # one long row among short ones: 1 x 80^2 + 7 x 20^2 + 2,000 = 11,200 pairs against 8 x 80^2 + 1,000 = 52,200
    assert plan_groups([20, 80, 20, 18, 20, 20, 15, 20]) == [[1], [0, 2, 4, 5, 7, 3, 6]]  # longest first, stable
    # equal lengths: nothing to save
    assert plan_groups([30] * 6) == [[0, 1, 2, 3, 4, 5]]
    # 4 x 50^2 + 4 x 10^2 + 2,000 = 12,400 against 8 x 2,500 + 1,000 = 21,000; a third group saves nothing
    assert plan_groups([50, 10, 50, 10, 50, 10, 50, 10]) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    monkeypatch.setattr(layout_mod, "GROUP_OVERHEAD_PAIRS", 10**9)
    assert plan_groups([20, 80, 20]) == [[1, 0, 2]]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("overhead", [0, layout_mod.GROUP_OVERHEAD_PAIRS])
def test_regrouped_attention_gives_the_padded_computations_values_and_gradients(side, overhead, monkeypatch):
    """fp32: the fast path's hidden states of real tokens and every gradient equal the reference Decoder's on the
    padded batch, whether the rows are regrouped (overhead 0: up to four groups) or kept in one."""
    monkeypatch.setattr(layout_mod, "GROUP_OVERHEAD_PAIRS", overhead)
    torch.manual_seed(0)
    cfg = from_hf_config(LlamaConfig(**CFG).to_dict())
    reference = Decoder(cfg)
    reference.init_weights(0.1)
    fast = Decoder(cfg, fast_path=True, device="cpu")
    fast.load_state_dict(reference.state_dict())
    lengths = [7, 30, 12, 3, 30, 18]
    ids = torch.randint(3, 300, (len(lengths), 30))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    if side == "left":
        mask = mask.flip(1)
    layout = TokenLayout.of(mask)
    assert len(layout.groups) == (4 if overhead == 0 else 1)
    real = mask.bool()
    weights = torch.randn(int(mask.sum()), cfg.d_model)
    outputs = []
    for model in (reference, fast):
        hidden = model.hidden_states(ids, attention_mask=mask)[real]
        (hidden * weights).sum().backward()
        outputs.append((hidden.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in outputs[0][1].items():
        # fp32 sums in another order: within 1e-5 of the gradient's largest element (up to ~100 here)
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()),
                                   msg=name)


def test_a_packed_batch_keeps_its_positions_and_its_documents_mask():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    packed = TokenLayout.of(mask, regroup=False)
    assert packed.keeps_positions and len(packed.groups) == 1 and torch.equal(packed.groups[0].dst, packed.keep)
    assert not TokenLayout.of(mask).keeps_positions
