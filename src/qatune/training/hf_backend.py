"""`backend=hf`: transformers `AutoModelForCausalLM` + peft `get_peft_model`, the reference recipe itself.

It trains any Hugging Face causal LM and is the baseline the native backend is measured against. It shares
the data, the loop, the logging and the checkpoints with the native backend; only model building, the loss
call and the saved result differ.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatune.errors import ConfigError, ModelError
from qatune.lora.layer import LoRAConfig
from qatune.lora.targets import family_linears, resolve_targets
from qatune.models.config import from_hf_config
from qatune.models.loading import resolve_source
from qatune.utils.io import write_dir_atomically


class HFCausalLM(nn.Module):
    """A transformers causal LM with the native model's `loss(batch, reduction)` interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def loss(self, batch: dict[str, Tensor], reduction: str = "mean", label_smoothing: float = 0.0
             ) -> tuple[Tensor, int]:
        if "doc_ids" in batch:
            raise ConfigError("train.packing=true needs backend=native (transformers' SDPA path has no document mask)")
        logits = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
        ).logits
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        n = int(keep.sum())
        loss = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum",
                               label_smoothing=label_smoothing)
        return (loss / max(n, 1) if reduction == "mean" else loss), n


def load_hf_model(source: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM  # heavy (seconds): only backend=hf needs it

    resolved = resolve_source(source)
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=dtype, **kwargs).to(device)


def apply_peft_lora(model: nn.Module, lora: LoRAConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ConfigError("backend=hf with method=lora needs peft: pip install 'qatune[hf]'") from e
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=_peft_targets(model, lora.targets),
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",
    )
    return get_peft_model(model, config)


def _peft_targets(model: nn.Module, targets: list[str] | None) -> list[str] | str | None:
    """qatune's family-neutral names -> Hugging Face module names (None: peft's own default).

    GPT-2 and Llama read the same target table as the native LoRA (`lora.resolve_targets`, `weights.LINEAR_MAPS`);
    other architectures take Hugging Face module names as they are."""
    if targets is None or "all-linear" in targets:
        return None if targets is None else "all-linear"
    try:
        cfg = from_hf_config(model.config.to_dict())
    except ModelError:  # not a GPT-2 or Llama config: Hugging Face module names, as given
        return targets
    hf_names = {(m.native, m.part): m.hf.rpartition(".")[2] for m in family_linears(cfg)}
    out = set()
    for module, parts in resolve_targets(cfg, targets).items():
        for part in parts:
            if (module, part) not in hf_names:
                raise ConfigError("backend=hf cannot adapt q/k/v slices of GPT-2's fused c_attn; use "
                                  "lora.targets=[c_attn] or backend=native")
            out.add(hf_names[module, part])
    return sorted(out)


def save_hf_result(model: nn.Module, tokenizer, out_dir: Path, method: str) -> None:
    """LoRA: peft's `save_pretrained` (adapter); full: transformers' `save_pretrained` + tokenizer. Written as
    one atomic directory write: a failure leaves the previous result as it was."""

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        if method == "full":
            tokenizer.save_pretrained(str(tmp))

    write_dir_atomically(out_dir, write)
