"""The next-token loss, one function for every model and every use: training (the native and the hf backend),
training's validation loss and `qatune eval`'s test loss, so all of them are the same quantity.

A model here is anything with `hidden_states(input_ids, *, position_ids, attention_mask, doc_ids)` (the final
hidden states, the LM head not applied) and `lm_head.weight`: the native `Decoder`, or a transformers model
behind `training.hf_backend.HFCausalLM`. The LM head runs only on the positions that predict a label: with
answer-only labels most QA tokens are prompt, so this skips most of the largest matmul and never materialises
the logits of the whole batch. Which positions those are is found on the host when the batch is collated
(`data.batching.label_positions`), so the loss gathers with index tensors: no host sync, no data-dependent
shape, and `torch.compile` sees one graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatune.data.batching import Feature, batches, count_tokens, to_device
from qatune.models.fast_ops import chunked_lm_loss


def next_token_loss(hidden: Tensor, head_weight: Tensor, batch: dict[str, Tensor], *, label_smoothing: float = 0.0,
                    chunked: bool = False) -> Tensor:
    """Summed next-token cross-entropy (fp32) of `hidden [B, T, d] @ head_weight.T` over the batch's labelled
    positions (`loss_positions`, `loss_targets` from `data.batching.label_positions`).

    `chunked`: compute it with `fast_ops.chunked_lm_loss` (the fast path: same value, less memory); otherwise
    `F.cross_entropy` on the logits of those positions. Divide by the label-token count (`count_tokens`,
    known on the host) for the mean."""
    if "loss_positions" not in batch:
        raise KeyError("the batch has no loss_positions/loss_targets: collate it with data.batching (collate, "
                       "collate_packed) or add **label_positions(labels)")
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["loss_positions"])
    targets = batch["loss_targets"]
    if chunked:
        return chunked_lm_loss(rows, head_weight, targets, label_smoothing)
    logits = F.linear(rows, head_weight)
    return F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=label_smoothing)


def model_loss(model: nn.Module, batch: dict[str, Tensor], *, label_smoothing: float = 0.0,
               chunked: bool = False) -> Tensor:
    """`next_token_loss` of `model` (see the module docstring) on a collated batch. `attention_mask` is only
    needed for left padding or packing: right padding cannot change earlier tokens under a causal mask."""
    hidden = model.hidden_states(batch["input_ids"], position_ids=batch.get("position_ids"),
                                 attention_mask=batch.get("attention_mask"), doc_ids=batch.get("doc_ids"))
    return next_token_loss(hidden, model.lm_head.weight, batch, label_smoothing=label_smoothing, chunked=chunked)


def evaluate_loss(model: nn.Module, features: Sequence[Feature], *, batch_size: int, pad_id: int,
                  device: torch.device, autocast: Callable[[], Any] = contextlib.nullcontext) -> float:
    """Token-weighted mean loss over `features` (labels as encoded: answer-only or every token).

    `model` as for `model_loss` (chunked when it was built for the fast path); it is put in eval mode for the
    pass and back in its previous mode after. `autocast` makes the mixed-precision context."""
    was_training = model.training
    model.eval()
    chunked = getattr(model, "fast_path", False)
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.no_grad(), autocast():
        for batch in batches(features, batch_size, pad_id=pad_id, shuffle=False):
            total += model_loss(model, to_device(batch, device), chunked=chunked)
            n += count_tokens(batch).label_tokens
    model.train(was_training)
    return total.item() / max(n, 1)
