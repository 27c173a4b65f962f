"""What `qatune bench` measures: GPT-2 and Llama (SmolLM2) shapes with random weights, or SmolLM2's real
weights, built for each backend from the same weights, the batches (synthetic or real QA data), and one
training step as `train_model` runs it. The module docstring of `runner.py` gives the method."""

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
from qatune.models.config import ModelConfig, from_hf_config
from qatune.models.decoder import Decoder
from qatune.models.loading import load_base_model, read_model_config
from qatune.models.tokenizer import load_tokenizer
from qatune.models.weights import native_to_hf
from qatune.training.build import LossModule, keep_frozen_linears_low
from qatune.training.hf_backend import HFCausalLM, apply_peft_lora, load_hf_model
from qatune.training.optim import PRECISIONS, make_optimizer

# Random-initialised shapes (transformers config fields). `tiny` and `tiny-llama` exist for tests; they keep
# their family's vocabulary so real data fits. `smollm2-135m` is SmolLM2-135M's config (as its GGUF gives it).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=4),
    "gpt2": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(model_type="gpt2", n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(model_type="gpt2", n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(model_type="gpt2", n_layer=48, n_embd=1600, n_head=25),
    "tiny-llama": dict(model_type="llama", num_hidden_layers=2, hidden_size=64, intermediate_size=160,
                       num_attention_heads=4, num_key_value_heads=2),
    "smollm2-135m": dict(model_type="llama", num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3),
}
_FAMILY_DEFAULTS = {
    "gpt2": dict(vocab_size=50257),
    "llama": dict(vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  max_position_embeddings=8192, bos_token_id=1, eos_token_id=2),
}
# Shapes whose real weights qatune can load (`--weights real`): the model source `load_base_model` takes.
REAL_WEIGHTS = {"smollm2-135m": "smollm2-135m"}
METHODS = ("full", "lora", "dora")  # dora: LORA with use_dora, native DoRA against peft's
BACKENDS = ("native", "native-fast", "native-compile", "native-fast-compile", "hf", "hf-compile")
STRATEGIES = ("pad-to-longest", "dynamic", "packing")
WEIGHTS = ("random", "real")
# The baseline recipes' adapters: GPT-2 on c_attn; Llama on the family default (q and v, as peft).
LORA = {"gpt2": dict(r=8, alpha=16.0, dropout=0.1, targets=["c_attn"]),
        "llama": dict(r=8, alpha=16.0, dropout=0.1, targets=None)}


@dataclass
class BenchConfig:
    """What `qatune bench` runs: the product shapes x methods x backends (x strategies with real data)."""

    shapes: list[str] = field(default_factory=lambda: ["gpt2"])
    weights: str = "random"  # random (seeded init) | real (the shape's released weights: REAL_WEIGHTS)
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
    # One process per configuration (peak RSS of each, whole process); None: on CPU, where it is the only way
    # to tell configurations' memory apart.
    isolate: bool | None = None

    def validate(self) -> None:
        for name, values, valid in (("shape", self.shapes, SHAPES), ("method", self.methods, METHODS),
                                    ("backend", self.backends, BACKENDS), ("strategy", self.strategies, STRATEGIES)):
            unknown = [v for v in values if v not in valid]
            if unknown or not values:
                raise ConfigError(f"unknown or missing {name}(s) {unknown}; choose from {', '.join(valid)}")
        if self.weights not in WEIGHTS:
            raise ConfigError(f"--weights must be random or real, got {self.weights!r}")
        if self.weights == "real" and (set(self.shapes) - set(REAL_WEIGHTS) or self.n_layer is not None):
            raise ConfigError(f"--weights real: only shapes {', '.join(REAL_WEIGHTS)} have real weights, at their "
                              "own depth (no --n-layer)")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        if min(self.batch, self.seq, self.steps, self.warmup) < 1:
            raise ConfigError("--batch, --seq, --steps and --warmup must be >= 1 (warm-up also measures memory)")


def shape_config(shape: str, n_layer: int | None, seq: int, weights: str = "random") -> dict[str, Any]:
    """The Hugging Face config (a dict) of a shape: GPT-2 with its dropout (0.1 residual, embedding and
    attention), Llama without (SmolLM2's); with `weights="real"`, the config of the real weights' file."""
    if weights == "real":
        return read_model_config(REAL_WEIGHTS[shape])
    dims = {**_FAMILY_DEFAULTS[SHAPES[shape]["model_type"]], **SHAPES[shape]}
    if n_layer is not None:
        dims["n_layer" if dims["model_type"] == "gpt2" else "num_hidden_layers"] = n_layer
    if dims["model_type"] == "gpt2":
        dims["n_positions"] = max(1024, seq)
    return dims


def hf_config_object(hf_config: dict[str, Any]):
    """The transformers config object of a config dict (transformers fills in its defaults)."""
    from transformers import AutoConfig  # heavy (seconds): imported when a benchmark runs

    fields = dict(hf_config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def native_config(hf_config: dict[str, Any]) -> ModelConfig:
    return from_hf_config(hf_config, "benchmark shape")


def lora_config(hf_config: dict[str, Any], method: str = "lora") -> LoRAConfig:
    """The baseline recipe's adapter for the shape's family; with DoRA for method=dora."""
    return LoRAConfig(**LORA[native_config(hf_config).family], use_dora=method == "dora")


def random_native_state(hf_config: dict[str, Any], device: torch.device, seed: int) -> dict[str, Tensor]:
    """Random weights (`Decoder.init_weights`) built directly on `device`: the one source of every backend's
    weights for this shape."""

    torch.manual_seed(seed)
    with torch.device(device):
        model = Decoder(native_config(hf_config))
    model.init_weights()
    return model.state_dict()


def real_native_state(shape: str, device: torch.device) -> dict[str, Tensor]:
    """The shape's real weights (fp32), as `load_base_model` reads them."""
    return load_base_model(REAL_WEIGHTS[shape], device=device).state_dict()


def build_native(hf_config: dict[str, Any], state: dict[str, Tensor], device: torch.device, method: str,
                 fast_path: bool = False, precision: str = "fp32", copy: bool = True) -> nn.Module:
    """A native `Decoder` holding a copy of `state` (`copy=False`: `state`'s own tensors), with the baseline
    recipe's LoRA (`LORA`) for method=lora (with DoRA for dora), as `training.build.build_trainable_model` makes
    it: `fast_path` as `train.fast_path`, the frozen weights' dtype as `training.build.keep_frozen_linears_low`
    decides for `precision`."""

    with torch.device("meta"):
        model = Decoder(native_config(hf_config), fast_path=fast_path, device=device)
    model.load_state_dict({k: v.clone() for k, v in state.items()} if copy else state, assign=True)
    if model.config.tie_embeddings:  # assign=True replaced embed.weight: re-tie the head to it
        model.lm_head.weight = model.embed.weight
    if method != "full":
        apply_lora(model, lora_config(hf_config, method))
    if method == "lora":  # as training: DoRA's norms keep the frozen weights as loaded
        keep_frozen_linears_low(model, precision)
    return model.train()


def load_native_real(shape: str, device: torch.device, method: str, fast_path: bool, precision: str) -> nn.Module:
    """The shape's real weights loaded as `training.build.build_trainable_model` loads them for a native run:
    for LoRA under bf16 autocast the frozen linear weights stream in as bf16."""
    low = PRECISIONS.get(precision) if method == "lora" else None
    model = load_base_model(REAL_WEIGHTS[shape], device=device, fast_path=fast_path, linear_dtype=low)
    if method != "full":
        apply_lora(model, lora_config(model.config.hf_config, method))
    if method == "lora":
        keep_frozen_linears_low(model, precision)
    return model.train()


def build_hf(hf_config: dict[str, Any], state: dict[str, Tensor] | None, device: torch.device, method: str,
             copy: bool = True, source: str | None = None) -> nn.Module:
    """transformers' `*ForCausalLM` (SDPA attention) with the same weights (a copy of `state`; `copy=False`:
    its own tensors), + peft LoRA for method=lora (peft DoRA for dora), wrapped in `HFCausalLM` (the `backend=hf`
    loss). With `source` (real weights) transformers loads them itself, as `qatune train backend=hf` does."""
    if source is not None:
        model = load_hf_model(source, torch.float32, device)
    else:
        model = _hf_from_state(hf_config, state, device, copy)
    if method != "full":
        model = apply_peft_lora(model, lora_config(hf_config, method))
    return HFCausalLM(model).train()


def _hf_from_state(hf_config: dict[str, Any], state: dict[str, Tensor], device: torch.device, copy: bool
                   ) -> nn.Module:
    from transformers import AutoModelForCausalLM  # heavy (seconds): imported when a benchmark runs

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5: where the declared floor (4.56) keeps it
        from transformers.modeling_utils import no_init_weights

    # Uninitialised storage on the device (never touched, so never resident): the weights are assigned below;
    # buffers made in __init__ (rotary frequencies) are computed as usual.
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config_object(hf_config), attn_implementation="sdpa")
    tensors = {k: v.clone() if copy else v for k, v in native_to_hf(state, native_config(hf_config))}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the token embedding
        raise ConfigError(f"weights do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(device)


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


def attention_flops(hf_config: dict[str, Any], row_lengths: list[int]) -> float:
    """12 * n_layer * d_attention * length^2 per document (12 * n_layer * seq * d_attention per token), where
    d_attention = n_head * head_dim (the queries' width; d_model for both families here)."""
    cfg = native_config(hf_config)
    return 12.0 * cfg.n_layer * cfg.q_size * sum(n * n for n in row_lengths)


def synthetic_batch(batch: int, seq: int, seed: int, vocab_size: int) -> dict[str, Tensor]:
    """Uniform random tokens, every position real and labelled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
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

    # The recipe's learning rates (LoRA 5e-4, full 5e-5); weight decay 0.01 on matrices, as training does.
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
