"""A plain training loop for tests that compare two models' losses step by step (AdamW on the trainable
parameters, autocast when `dtype` is given, the loss per labelled token)."""

from __future__ import annotations

import torch

from qatune.evaluation.loss import model_loss
from qatune.models.decoder import Decoder


def train_losses(model: Decoder, batches: list[dict[str, torch.Tensor]], dtype: torch.dtype | None,
                 lr: float) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for batch in batches:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model_loss(model, batch, chunked=model.fast_path) / batch["loss_targets"].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
