"""What `qatune bench` measures: GPT-2 shapes with random weights, built for each backend from the same
weights, the batches (synthetic or real QA data), and one training step as `train_model` runs it.
The module docstring of `runner.py` gives the method."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qatune.data.batching import batches, count_tokens, encode_dataset, label_positions, padding_efficiency, to_device
from qatune.data.prompts import PromptTemplate
from qatune.data.readers import DataReport, load_examples
from qatune.errors import ConfigError
from qatune.lora.inject import apply_lora
from qatune.lora.layer import LoRAConfig
from qatune.models.config import from_hf_config
from qatune.models.decoder import Decoder
from qatune.models.tokenizer import load_tokenizer
from qatune.models.weights import native_to_hf
from qatune.training.build import LossModule
from qatune.training.hf_backend import HFCausalLM, apply_peft_lora
from qatune.training.optim import make_optimizer

# Random-initialised GPT-2 shapes. `tiny` exists for tests; it keeps GPT-2's vocabulary so real data fits.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}
METHODS = ("full", "lora", "dora")  # dora: LORA with use_dora, native DoRA against peft's
BACKENDS = ("native", "native-fast", "native-compile", "native-fast-compile", "hf", "hf-compile")
STRATEGIES = ("pad-to-longest", "dynamic", "packing")
GPT2_VOCAB = 50257
LORA = dict(r=8, alpha=16.0, dropout=0.1, targets=["c_attn"])  # the baseline recipe's adapter


@dataclass
class BenchConfig:
    """What `qatune bench` runs: the product shapes x methods x backends (x strategies with real data)."""

    shapes: list[str] = field(default_factory=lambda: ["gpt2"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    backends: list[str] = field(default_factory=lambda: ["native", "native-fast", "hf"])
    batch: int = 16
    seq: int = 512
    steps: int = 10  # measured steps per configuration
    warmup: int = 2  # unmeasured steps per configuration (compilation, optimizer state, allocator)
    precision: str = "bf16"  # bf16 (autocast, fp32 weights) | fp32
    device: str = "auto"
    n_layer: int | None = None  # override the shapes' depth (quick CPU runs)
    real_data: str | None = None  # a QA file (any format `train` reads); None = synthetic batches
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    tokenizer: str = "gpt2"  # tokenises --real-data: GPT-2's BPE (a hub id or a local tokenizer directory)
    threads: int | None = None  # CPU intra-op threads (torch.set_num_threads)
    seed: int = 0

    def validate(self) -> None:
        for name, values, valid in (("shape", self.shapes, SHAPES), ("method", self.methods, METHODS),
                                    ("backend", self.backends, BACKENDS), ("strategy", self.strategies, STRATEGIES)):
            unknown = [v for v in values if v not in valid]
            if unknown or not values:
                raise ConfigError(f"unknown or missing {name}(s) {unknown}; choose from {', '.join(valid)}")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        if min(self.batch, self.seq, self.steps, self.warmup) < 1:
            raise ConfigError("--batch, --seq, --steps and --warmup must be >= 1 (warm-up also measures memory)")


def gpt2_config(shape: str, n_layer: int | None, seq: int):
    """The transformers `GPT2Config` of a shape (dropout as GPT-2: 0.1 residual, embedding and attention)."""
    from transformers import GPT2Config  # heavy (seconds): imported when a benchmark runs

    dims = dict(SHAPES[shape])
    if n_layer is not None:
        dims["n_layer"] = n_layer
    return GPT2Config(vocab_size=GPT2_VOCAB, n_positions=max(1024, seq), **dims)


def random_native_state(hf_config, device: torch.device, seed: int) -> dict[str, Tensor]:
    """Random weights (`Decoder.init_weights`) built directly on `device`: the one source of every backend's
    weights for this shape."""

    torch.manual_seed(seed)
    with torch.device(device):
        model = Decoder(from_hf_config(hf_config.to_dict()))
    model.init_weights()
    return model.state_dict()


def build_native(hf_config, state: dict[str, Tensor], device: torch.device, method: str, fast_path: bool = False
                 ) -> nn.Module:
    """A native `Decoder` holding a copy of `state`, with LoRA (r=8, alpha=16, dropout 0.1 on c_attn) for
    method=lora (and DoRA for dora), as `training.build.build_trainable_model` makes it; `fast_path` as
    `train.fast_path`."""

    with torch.device(device):
        model = Decoder(from_hf_config(hf_config.to_dict()), fast_path=fast_path, device=device)
    model.load_state_dict(state)
    if method != "full":
        apply_lora(model, adapter_config(method))
    return model.train()


def build_hf(hf_config, state: dict[str, Tensor], device: torch.device, method: str) -> nn.Module:
    """transformers' `GPT2LMHeadModel` (SDPA attention) with the same weights, + peft LoRA for method=lora (peft
    DoRA for dora), wrapped in `HFCausalLM` (the `backend=hf` loss)."""
    from transformers import GPT2LMHeadModel  # heavy (seconds): imported when a benchmark runs


    with torch.device(device):
        model = GPT2LMHeadModel(hf_config)
    missing, unexpected = model.load_state_dict(dict(native_to_hf(state, from_hf_config(hf_config.to_dict()))),
                                                strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to wte
        raise ConfigError(f"weights do not fit GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    if method != "full":
        model = apply_peft_lora(model, adapter_config(method))
    return HFCausalLM(model).train()


def adapter_config(method: str) -> LoRAConfig:
    """The adapter of method lora or dora: the baseline recipe's, with DoRA for dora."""
    return LoRAConfig(**LORA, use_dora=method == "dora")


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(frozen, trainable) weights that take part in a matmul: every 2-D parameter (linear / `Conv1D` weights,
    LoRA's A and B, and GPT-2's token embedding, which is tied to the LM head and counts once, as the head)
    except the position embedding, which is only looked up."""
    frozen = trainable = 0
    for name, p in model.named_parameters():  # a tied parameter is listed once
        if p.dim() == 2 and not name.endswith(("pos_embed.weight", "wpe.weight")):
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
    return frozen, trainable


def model_flops_per_token(frozen: int, trainable: int) -> float:
    """Training FLOPs per token of the matmul weights (module docstring): 6 per trainable weight, 4 per frozen."""
    return 6.0 * trainable + 4.0 * frozen


def attention_flops(hf_config, row_lengths: list[int]) -> float:
    """12 * n_layer * d_model * length^2 per document (12 * n_layer * seq * d_model per token)."""
    return 12.0 * hf_config.n_layer * hf_config.n_embd * sum(n * n for n in row_lengths)


def synthetic_batch(batch: int, seq: int, seed: int) -> dict[str, Tensor]:
    """Uniform random tokens, every position real and labelled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, GPT2_VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids), **label_positions(ids)}


def real_data_batches(cfg: BenchConfig) -> tuple[dict[str, list[dict[str, Tensor]]], dict[str, Any]]:
    """The first `warmup + steps` batches of each strategy (same shuffled order) and a description of the data."""
    path = Path(cfg.real_data)
    if not path.is_file():
        raise ConfigError(f"--real-data: {path} not found")
    tokenizer = load_tokenizer(cfg.tokenizer)
    report = DataReport()
    features = encode_dataset(tokenizer, load_examples(str(path), report=report), PromptTemplate(), cfg.seq,
                              answer_only=True, report=report)
    lengths = [len(f) for f in features]
    longest = max(lengths)
    n = cfg.warmup + cfg.steps
    out: dict[str, list[dict[str, Tensor]]] = {}
    for strategy in cfg.strategies:
        kwargs: dict[str, Any] = dict(pad_id=tokenizer.pad_token_id, shuffle=True, seed=cfg.seed)
        if strategy == "pad-to-longest":
            kwargs["pad_to_multiple_of"] = longest  # every batch as wide as the dataset's longest example
        elif strategy == "packing":
            kwargs.update(packing=True, max_length=cfg.seq)
        plan = list(itertools.islice(batches(features, cfg.batch, **kwargs), n))
        out[strategy] = list(itertools.islice(itertools.cycle(plan), n))
    info = {
        "path": str(path), "examples": len(features), "tokens": sum(lengths),
        "mean_length": sum(lengths) / len(lengths), "longest": longest, "data_report": report.summary(),
        "padding_efficiency": {s: padding_efficiency(b) for s, b in out.items()},
    }
    return out, info


def row_documents(batch: dict[str, Tensor]) -> list[int]:
    """Lengths of the documents of a batch (packed rows hold several), for the attention FLOPs."""
    if "doc_ids" in batch:
        docs = batch["doc_ids"]
        return [int(c) for row in docs for c in torch.unique(row[row >= 0], return_counts=True)[1]]
    return [int(n) for n in batch["attention_mask"].sum(1)]


def make_step(model: nn.Module, backend: str, method: str, device: torch.device, precision: str
              ) -> Callable[[dict[str, Tensor]], Tensor]:
    """One training step as `train_model` runs it (forward under autocast, backward, AdamW, zero_grad);
    returns the (detached) mean loss."""

    # The recipe's learning rates (LoRA and DoRA 5e-4, full 5e-5); weight decay 0.01 on matrices, as training does.
    optimizer = make_optimizer(model, lr=5e-5 if method == "full" else 5e-4, weight_decay=0.01, device=device)
    loss_module: nn.Module = LossModule(model, 0.0)
    if backend.endswith("-compile"):
        loss_module = torch.compile(loss_module)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step(batch: dict[str, Tensor]) -> Tensor:
        n = count_tokens(batch).label_tokens  # on the host, as the trainer knows it from its plan
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_module(to_device(batch, device)) / max(n, 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
