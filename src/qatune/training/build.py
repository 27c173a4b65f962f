"""The parts a training run is built from: device, seeds, data (examples -> features), the model to train, and
`data.max_length` as the model's positions allow."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qatune.data.batching import Feature, encode_dataset
from qatune.data.prompts import PromptFormat, make_prompt_format
from qatune.data.readers import DataReport, QAExample, load_examples, split_train_val
from qatune.errors import ConfigError, DataError
from qatune.evaluation.loss import model_loss
from qatune.lora.inject import apply_lora
from qatune.models.device import usable_device
from qatune.models.fast_ops import store_frozen_linear_in
from qatune.models.loading import load_base_model, parse_dtype
from qatune.training.config import DataSection, RunConfig
from qatune.training.hf_backend import HFCausalLM, apply_peft_lora, load_hf_model
from qatune.training.optim import PRECISIONS
from qatune.training.parallel import Dist

DEFAULT_MAX_LENGTH = 512


def pick_device(name: str, d: Dist, key: str = "train.device") -> torch.device:
    """`auto`: CUDA, else MPS (one process only), else CPU; with CUDA each process takes its local rank's GPU.
    A device this machine does not have is a `ConfigError` naming `key`."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available() and d.world == 1:
            name = "mps"
        else:
            name = "cpu"
    device = usable_device(name, key)
    if name == "cuda":
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainingData:
    """Tokenised training and validation features, the validation examples (for generation metrics), the
    prompt format that made them and the report of every skipped or truncated record."""

    train: list[Feature]
    val: list[Feature]
    val_examples: list[QAExample]
    prompt_format: PromptFormat
    report: DataReport
    pad_id: int


def read_examples(d: DataSection, seed: int) -> tuple[list[QAExample], list[QAExample], DataReport]:
    """Training and validation examples; validation is split off train (with `seed`) when no file is given."""
    report = DataReport()
    kwargs = dict(fmt=d.format, question_field=d.question_field, answer_field=d.answer_field,
                  aliases_field=d.aliases_field, squad_unanswerable=d.squad_unanswerable,
                  skip_invalid=d.skip_invalid)
    train = load_examples(d.train, report=report, **kwargs)
    if d.val:
        val = load_examples(d.val, report=report, **kwargs)
    elif d.val_fraction > 0:
        train, val = split_train_val(train, d.val_fraction, seed)
    else:
        val = []
    if d.max_examples is not None:
        train = train[: d.max_examples]
    if not train:
        raise DataError(f"no training examples in {d.train} ({report.summary()})")
    return train, val, report


def prepare_data(d: DataSection, tokenizer: Any, seed: int) -> TrainingData:
    """Examples read and tokenised in the prompt format (answer-only labels unless `data.answer_only=false`)."""
    train_ex, val_ex, report = read_examples(d, seed)
    style = make_prompt_format(d.prompt_format, d.template, tokenizer)
    train = encode_dataset(tokenizer, train_ex, style, d.max_length, d.answer_only, report)
    val = encode_dataset(tokenizer, val_ex, style, d.max_length, d.answer_only, report)
    return TrainingData(train, val, val_ex, style, report, tokenizer.pad_token_id)


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence the model has positions for (native `Decoder` or a transformers model)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "max_positions"):
        return config.max_positions
    hf = getattr(getattr(model, "model", None), "config", None)
    return getattr(hf, "n_positions", None) or getattr(hf, "max_position_embeddings", None)


def resolve_max_length(max_length: int | None, limit: int | None) -> int:
    """`data.max_length`: 512 by default (the model's position limit when lower); an explicit value above the
    limit is refused, naming both (rows that long would index positions the model does not have)."""
    if max_length is None:
        return min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    if limit is not None and max_length > limit:
        raise ConfigError(f"data.max_length={max_length} is above the model's position limit of {limit} tokens; "
                          f"use data.max_length={limit} or less")
    return max_length


def build_trainable_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    """The model to train, as `evaluation.loss.model_loss` takes it: the native Decoder (+ LoRA), or
    transformers (+ peft) for `backend=hf`."""
    t = cfg.train
    base_dtype = parse_dtype(t.base_dtype) if cfg.method == "lora" and t.base_dtype else None
    if cfg.backend == "hf":
        model = load_hf_model(cfg.model, base_dtype or torch.float32, device)
        return HFCausalLM(apply_peft_lora(model, cfg.lora) if cfg.method == "lora" else model)
    low = frozen_linear_dtype(cfg)
    model = load_base_model(cfg.model, dtype=base_dtype, device=device, fast_path=t.fast_path, linear_dtype=low)
    if cfg.method == "lora":
        apply_lora(model, cfg.lora)
        for p in model.parameters():  # LoRA weights and their optimizer state stay fp32 under a low-precision base
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        if low is not None:
            keep_frozen_linears_low(model, t.precision)
    model.gradient_checkpointing = t.gradient_checkpointing
    return model


def frozen_linear_dtype(cfg: RunConfig) -> torch.dtype | None:
    """The dtype LoRA's frozen linear weights are loaded in (`keep_frozen_linears_low`): the autocast dtype for
    a plain native LoRA run under bf16/fp16 autocast with no `train.base_dtype`; None (the model's dtype)
    otherwise. Not with FSDP (one dtype per flattened module), nor with DoRA or PiSSA, whose initialisation
    reads and rewrites the base weights in full precision."""
    t = cfg.train
    plain = not cfg.lora.use_dora and cfg.lora.init == "default"
    if cfg.method != "lora" or cfg.backend != "native" or t.base_dtype or t.fsdp or not plain:
        return None
    return PRECISIONS.get(t.precision)


def keep_frozen_linears_low(model: nn.Module, precision: str) -> None:
    """Under bf16/fp16 autocast, store the frozen weights of the blocks' linear layers in that dtype
    (`fast_ops.store_frozen_linear_in`).

    Autocast casts an fp32 weight to its dtype at every forward (and keeps the cast for backward): stored in
    that dtype, the matmuls see exactly the same values, so losses are unchanged, while the weights take half
    the memory and the per-step casts and their saved copies disappear. The token embedding (tied to the LM
    head, and looked up in fp32), the norms and every trainable weight stay fp32. fp32: nothing changes."""
    dtype = PRECISIONS.get(precision)
    if dtype is None:
        return
    for name, module in model.named_modules():
        if name.startswith("blocks.") and isinstance(module, nn.Linear):
            store_frozen_linear_in(module, dtype)


class LossModule(nn.Module):
    """forward(batch) -> the summed token loss (`evaluation.loss.model_loss`; divide by `count_tokens`' label
    tokens): the unit DDP and torch.compile wrap. Chunked (`fast_ops.chunked_lm_loss`) when the model was built
    for the fast path, decided here once."""

    def __init__(self, model: nn.Module, label_smoothing: float):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.chunked = getattr(model, "fast_path", False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model_loss(self.model, batch, label_smoothing=self.label_smoothing, chunked=self.chunked)
