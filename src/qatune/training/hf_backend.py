"""`backend=hf`: transformers `AutoModelForCausalLM` + peft `get_peft_model`, the reference recipe itself.

It trains any Hugging Face causal LM whose LM head is a plain linear layer, and is the baseline the native
backend is measured against. It shares the data, the loop, the loss (`evaluation.loss`), the logging and the
checkpoints with the native backend; only model building and the saved result differ.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from qatune.errors import ConfigError, ModelError
from qatune.lora.layer import LoRAConfig
from qatune.lora.targets import family_linears, resolve_targets
from qatune.models.config import from_hf_config
from qatune.models.loading import resolve_source
from qatune.utils.io import write_dir_atomically


class HFCausalLM(nn.Module):
    """A transformers causal LM (peft-wrapped or not) seen as the native model is by the loss
    (`evaluation.loss.model_loss`): `hidden_states(...)` from its base model and `lm_head` its output
    embeddings, so both backends train on one loss function. `fast_path` is False: the hf backend is the
    reference recipe."""

    fast_path = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        _check_plain_head(self._transformers_model())

    def _transformers_model(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # peft's wrapper

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def hidden_states(self, input_ids: Tensor, *, position_ids: Tensor | None = None,
                      attention_mask: Tensor | None = None, doc_ids: Tensor | None = None) -> Tensor:
        if doc_ids is not None:
            raise ConfigError("train.packing=true needs backend=native (transformers' SDPA path has no document mask)")
        body = self._transformers_model().base_model  # the decoder stack: GPT2Model, LlamaModel, ...
        return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False).last_hidden_state


def _check_plain_head(model: nn.Module) -> None:
    """The shared loss computes logits as `hidden @ lm_head.weight.T`: a head with a bias, an adapter or a
    logit scale (Gemma 2's soft-capping, Cohere's and Granite's scales) would be computed wrongly, so refuse it."""
    head = model.get_output_embeddings()
    scaled = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
              if getattr(model.config, k, None) not in (None, 1, 1.0)]
    if type(head) is not nn.Linear or head.bias is not None or scaled:
        raise ModelError(f"backend=hf: {type(model).__name__}'s LM head ({type(head).__name__}"
                         f"{', ' + ', '.join(scaled) if scaled else ''}) is not a plain bias-free linear layer, "
                         "which the loss needs; do not put LoRA on the LM head")


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
        use_dora=lora.use_dora,
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
