"""Teacher-forced loss of a model on tokenised examples: training's validation loss and `qatune eval`'s test loss
are this one function, so the two numbers are the same quantity."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from qatune.data.batching import Feature, batches, to_device


def evaluate_loss(model: nn.Module, features: Sequence[Feature], *, batch_size: int, pad_id: int,
                  device: torch.device, autocast: Callable[[], Any] = contextlib.nullcontext) -> float:
    """Token-weighted mean loss over `features` (labels as encoded: answer-only or every token).

    `model` is anything with `loss(batch, reduction="sum") -> (summed loss, label tokens)`; it is put in eval
    mode for the pass and back in its previous mode after. `autocast` makes the mixed-precision context."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), autocast():
        for batch in batches(features, batch_size, pad_id=pad_id, shuffle=False):
            loss_sum, count = model.loss(to_device(batch, device), reduction="sum")
            total, n = total + float(loss_sum), n + count
    model.train(was_training)
    return total / max(n, 1)
