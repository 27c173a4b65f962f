"""LoRA on the native decoder, as peft does it: the layer (`layer.py`), which layers it adapts (`targets.py`),
putting it into a model, merging and counting (`inject.py`), peft-format adapters and merged checkpoints
(`adapters.py`)."""

from qatune.lora.adapters import load_adapter, save_adapter, save_merged
from qatune.lora.inject import (
    apply_lora,
    count_parameters,
    format_parameter_count,
    lora_layers,
    merge_lora,
    unmerge_lora,
)
from qatune.lora.layer import LoRAConfig, LoRALinear
from qatune.lora.targets import resolve_targets, target_table

__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "count_parameters", "format_parameter_count", "load_adapter",
           "lora_layers", "merge_lora", "resolve_targets", "save_adapter", "save_merged", "target_table",
           "unmerge_lora"]
