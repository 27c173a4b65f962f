"""LoRA adapters in Hugging Face peft's format, and merged standalone checkpoints.

An adapter directory is what `PeftModel.save_pretrained` writes: `adapter_config.json` (a peft `LoraConfig`)
and `adapter_model.safetensors` with keys `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`
(no adapter name), `A` `[r, in]`, `B` `[out, r]` in both families (peft's `fan_in_fan_out` only says that
GPT-2's base `Conv1D` weight is `[in, out]`; the LoRA matrices are not transposed). Biases trained by the
`bias` mode are saved under the model's own names, with `.base_layer` inserted for modules peft wraps. A DoRA
adapter (`use_dora: true`) adds each module's magnitude `[out]` as
`base_model.model.<HF module>.lora_magnitude_vector` (peft's saved name: no `.weight`, no adapter name).

Which Hugging Face module a native layer is comes from `weights.LINEAR_MAPS`, nowhere else.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qatune.errors import ConfigError, ModelError
from qatune.lora.initial import plain_pair
from qatune.lora.inject import inject_lora, lora_layers, merged_state_dict
from qatune.lora.layer import WHOLE, LoRAConfig, LoRALinear, LoRAPart
from qatune.lora.targets import family_linears
from qatune.models.config import ModelConfig, read_json_object
from qatune.models.saving import save_hf_checkpoint
from qatune.models.weights import HF_BLOCK_PREFIX, hf_name_table, is_transposed, qkv_slice
from qatune.utils.io import write_dir_atomically

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# adapter_config.json fields for peft features that change what the adapter computes (or what it needs of the
# base model) and that qatune does not implement: refused rather than silently ignored.
_UNSUPPORTED_FIELDS = {
    "lora_bias": "LoRA bias terms (lora_bias)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
# Initialisations that modify the base weights: such an adapter only works on that modified base model.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga")


def _hf_linear_modules(cfg: ModelConfig) -> dict[str, tuple[str, str | None]]:
    """HF module path (`transformer.h.0.attn.c_attn`) -> (native module path, qkv part or None)."""
    table = {}
    for i in range(cfg.n_layer):
        for m in family_linears(cfg):
            table[HF_BLOCK_PREFIX[cfg.family].format(i=i) + m.hf] = (f"blocks.{i}.{m.native}", m.part)
    return table


def _plain_module(model: nn.Module, name: str) -> nn.Module:
    """A module by its plain `Decoder` name, looking through a LoRA wrapper to its base layer."""
    module = model.get_submodule(name)
    return module.base if isinstance(module, LoRALinear) else module


def _plain_param(model: nn.Module, native_name: str) -> Tensor:
    module_name, _, attr = native_name.rpartition(".")
    return getattr(_plain_module(model, module_name), attr)


def _pattern_value(pattern: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module path."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# ---------------------------------------------------------------------------------------------------- saving


def _peft_pairs(to_hf: dict[tuple[str, str | None], str], name: str, layer: LoRALinear
                ) -> dict[str, tuple[Tensor, Tensor, int, float]]:
    """One native LoRA layer -> {HF module path: (A, B, r, alpha)} as peft would hold it. `to_hf` maps
    (native module, qkv part or None) to the HF module path."""
    direct = {p: to_hf.get((name, None if p == WHOLE else p)) for p in layer.parts}
    plain = {p: plain_pair(layer, p) for p in layer.parts}  # PiSSA / OLoRA: rank 2r, relative to the original base
    if all(direct.values()):  # a whole layer, or a Llama q/k/v slice (= q_proj/k_proj/v_proj)
        return {direct[p]: plain[p] for p in layer.parts}
    # GPT-2 q/k/v slices of the fused c_attn: peft has no module per slice, so the n slice pairs
    # (A_i [r, in], B_i [rows_i, r]) are exported EXACTLY as one c_attn pair of rank n*r:
    #   A = [A_1; ...; A_n] stacked on the rank axis,   B = zeros [out, n*r] with B_i at (rows_i, columns i*r:(i+1)*r),
    # so B @ A = sum_i (B_i @ A_i placed in rows_i): the same update. Only the scaling must survive the rank growing
    # from r to n*r: alpha/r = alpha'/(n*r) gives alpha' = n*alpha; with rslora alpha/sqrt(r) = alpha'/sqrt(n*r)
    # gives alpha' = sqrt(n)*alpha. peft then computes exactly the function qatune computes.
    if len({(r, alpha) for _, _, r, alpha in plain.values()}) > 1:
        raise ModelError(f"{name}: q/k/v slices with different ranks or alphas cannot be exported to peft")
    _, _, r, alpha = next(iter(plain.values()))
    n = len(plain)
    a_fused = torch.cat([a for a, _, _, _ in plain.values()])
    b_fused = a_fused.new_zeros(layer.base.out_features, n * r)
    for i, (p, part) in enumerate(layer.parts.items()):
        b_fused[part.rows, i * r:(i + 1) * r] = plain[p][1]
    alpha_fused = alpha * (n ** 0.5 if layer.use_rslora else n)
    return {to_hf[(name, None)]: (a_fused, b_fused, n * r, alpha_fused)}


def _peft_magnitudes(to_hf: dict[tuple[str, str | None], str], name: str, layer: LoRALinear) -> dict[str, Tensor]:
    """One native DoRA layer -> {HF module path: magnitude} as peft would hold it, for the modules `_peft_pairs`
    gives. GPT-2 q/k/v slices, exported as one c_attn pair, get one c_attn magnitude: each slice's on its rows and
    the base row norm on the others (k's for q+v), where B is zero, so that peft's m / ||W + sBA|| is 1 there and
    those rows stay the base's, as in qatune. DoRA is row-wise, so this is exact: no slice layout is refused."""
    if not layer.use_dora:
        return {}
    direct = {p: to_hf.get((name, None if p == WHOLE else p)) for p in layer.parts}
    if all(direct.values()):
        return {direct[p]: layer.lora_magnitude_vector[p].detach() for p in layer.parts}
    return {to_hf[(name, None)]: layer.full_magnitude()}


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str,
                 tokenizer=None) -> Path:
    """Write the model's LoRA adapter as peft does (`PeftModel.from_pretrained(hf_model, out_dir)` loads it),
    with the tokenizer's files when `tokenizer` is given: every file lands through one atomic directory write,
    so a failure (a full disk) never leaves a truncated file in `out_dir`.

    The most common (r, alpha) becomes `r`/`lora_alpha`; layers that differ go to `rank_pattern`/`alpha_pattern`
    keyed by their full module path. `target_modules` lists short names (`c_attn`) when they select exactly the
    adapted modules, full paths otherwise (e.g. GPT-2 `o` alone: `c_proj` would also catch the MLP's)."""
    layers = lora_layers(model)
    if not layers:
        raise ModelError("the model has no LoRA layers to save; apply_lora() or load_adapter() first")
    cfg: ModelConfig = model.config
    config: LoRAConfig = model.lora_config
    to_hf = {native_part: hf for hf, native_part in _hf_linear_modules(cfg).items()}
    pairs: dict[str, tuple[Tensor, Tensor, int, float]] = {}
    magnitudes: dict[str, Tensor] = {}
    for name, layer in layers.items():
        pairs.update(_peft_pairs(to_hf, name, layer))
        magnitudes.update(_peft_magnitudes(to_hf, name, layer))

    tensors = _adapter_tensors(model, pairs)
    tensors.update({f"{PEFT_PREFIX}{m}.lora_magnitude_vector": v.cpu().contiguous() for m, v in magnitudes.items()})
    peft_config = _peft_config(cfg, config, pairs, base_model_name_or_path)

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_SAFETENSORS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return write_dir_atomically(out_dir, write)


def _adapter_tensors(model: nn.Module, pairs: dict[str, tuple[Tensor, Tensor, int, float]]) -> dict[str, Tensor]:
    """peft's tensor names -> values: every pair's A and B, and the biases the bias mode trains."""
    cfg: ModelConfig = model.config
    bias = model.lora_config.bias
    tensors: dict[str, Tensor] = {}
    for module, (a, b, _, _) in pairs.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.cpu().contiguous()
    if bias != "none":
        for hf_name, (native, part, _) in hf_name_table(cfg).items():
            module = hf_name.removesuffix(".bias")
            if module == hf_name or (bias == "lora_only" and module not in pairs):
                continue
            value = _plain_param(model, native).detach()
            value = value[qkv_slice(cfg, part)] if part else value
            key = f"{module}.base_layer.bias" if module in pairs else hf_name
            tensors[PEFT_PREFIX + key] = value.cpu().clone()
    return tensors


def _peft_config(cfg: ModelConfig, config: LoRAConfig, pairs: dict[str, tuple[Tensor, Tensor, int, float]],
                 base_model_name_or_path: str) -> dict:
    """adapter_config.json as peft writes it for these pairs."""
    (r, alpha), _ = Counter((r, a) for _, _, r, a in pairs.values()).most_common(1)[0]
    short = sorted({m.rpartition(".")[2] for m in pairs})
    selected_by_short = {m for m in _hf_linear_modules(cfg) if m.rpartition(".")[2] in short}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": short if selected_by_short == set(pairs) else sorted(pairs),
        "fan_in_fan_out": is_transposed(cfg),
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {m: pr for m, (_, _, pr, _) in pairs.items() if pr != r},
        "alpha_pattern": {m: pa for m, (_, _, _, pa) in pairs.items() if pa != alpha},
        "use_dora": config.use_dora,
        # Keys that newer peft versions added (exclude_modules, lora_bias) are left out at their defaults, so that
        # every peft from the declared minimum version on reads the file; newer versions fill them in.
    }


# ---------------------------------------------------------------------------------------------------- loading


def _read_adapter_config(path: Path) -> dict:
    conf = read_json_object(path)
    _check_adapter_fields(conf, path)
    if conf.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{path}: peft_type {conf['peft_type']!r} is not supported; qatune loads LORA adapters")
    used = [what for field, what in _UNSUPPORTED_FIELDS.items() if conf.get(field)]
    if used:
        raise ModelError(f"{path}: unsupported peft features: {', '.join(used)}")
    init = str(conf.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_MUTATING_INITS):
        raise ModelError(
            f"{path}: init_lora_weights={conf['init_lora_weights']!r} changes the base model's weights; convert "
            "the adapter to plain LoRA first (peft's save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    return conf


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_POSITIVE_INT = ("a whole number >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
_POSITIVE = ("a number > 0", lambda v: _is_number(v) and v > 0)
_STRING = ("a string", lambda v: isinstance(v, str))
# adapter_config.json fields qatune reads: (what they must be, the check); a null is peft's default
_FIELD_TYPES = {
    "r": _POSITIVE_INT,
    "lora_alpha": _POSITIVE,
    "lora_dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "bias": _STRING,
    "peft_type": _STRING,
}


def _check_adapter_fields(conf: dict, path: Path) -> None:
    """The types of the fields qatune reads: one `ModelError` naming the file and the field."""
    for key, (what, ok) in _FIELD_TYPES.items():
        if conf.get(key) is not None and not ok(conf[key]):
            raise ModelError(f"{path}: field {key!r} must be {what}, got {conf[key]!r:.80}")
    for key, (what, ok) in (("rank_pattern", _POSITIVE_INT), ("alpha_pattern", _POSITIVE)):
        pattern = conf.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise ModelError(f"{path}: field {key!r} must be an object (module pattern -> value), "
                             f"got {type(pattern).__name__}")
        for module, value in pattern.items():
            if not ok(value):
                raise ModelError(f"{path}: {key}[{module!r:.80}] must be {what}, got {value!r:.80}")
            try:
                re.compile(module)
            except re.error as e:
                raise ModelError(f"{path}: {key} key {module!r:.80} is not a valid regular expression: {e}") from None


def _read_adapter_weights(adapter_dir: Path) -> tuple[dict[str, Tensor], Path]:
    st, binary = adapter_dir / ADAPTER_SAFETENSORS, adapter_dir / ADAPTER_BIN
    try:
        if st.is_file():
            return load_file(str(st)), st
        if binary.is_file():  # weights_only: an adapter file must not be able to run code
            return torch.load(binary, map_location="cpu", weights_only=True), binary
    except (OSError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
        raise ModelError(f"cannot read {st if st.is_file() else binary}: {e}") from e
    raise ModelError(f"{adapter_dir} has no adapter weights: expected {ADAPTER_SAFETENSORS} or {ADAPTER_BIN}")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> list[str]:
    """Apply a peft-format LoRA adapter (saved by qatune or by peft) to a native model; returns wrapped modules.

    Which modules are adapted, and their ranks, are read from the weight file itself, so `target_modules`
    regexes, `layers_to_transform` and `exclude_modules` need no interpretation; alphas follow `lora_alpha` and
    `alpha_pattern` as in peft. A GPT-2 `c_attn` pair becomes one pair over the whole fused qkv; Llama's
    q_proj/k_proj/v_proj pairs become slices of it. Saved biases replace the model's. With `use_dora`, each pair's
    `lora_magnitude_vector` becomes its DoRA magnitude. Trainable marking is as `apply_lora`'s, so training can
    continue from a loaded adapter."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ModelError(f"{adapter_dir} is not a LoRA adapter directory: it has no {ADAPTER_CONFIG}")
    conf = _read_adapter_config(config_path)
    state, weights_path = _read_adapter_weights(adapter_dir)
    pairs, biases = _classify_adapter_keys(model.config, state, weights_path)
    layout, weights, problems = _adapter_layout(model, conf, pairs)
    problems += _bias_problems(model, biases) + _magnitude_problems(model, conf, pairs)
    if problems:
        raise ModelError(f"{weights_path} does not fit this {model.config.family} model: " + "; ".join(problems))
    # targets: the HF short names of what the file adapts, valid qatune targets describing this adapter.
    targets = sorted({m.rpartition(".")[2] for m in pairs})
    try:  # defaults are peft's LoraConfig defaults
        config = LoRAConfig(r=conf.get("r", 8), alpha=conf.get("lora_alpha", 8), dropout=conf.get("lora_dropout", 0.0),
                            targets=targets, use_rslora=bool(conf.get("use_rslora")), bias=conf.get("bias", "none"),
                            use_dora=bool(conf.get("use_dora")))
    except ConfigError as e:
        raise ModelError(f"{config_path}: {e}") from None
    wrapped = inject_lora(model, layout, config)
    layers = lora_layers(model)
    hf_tensors = hf_name_table(model.config)
    with torch.no_grad():
        for (native, part_name), (a, b) in weights.items():
            layers[native].lora_A[part_name].copy_(a)
            layers[native].lora_B[part_name].copy_(b)
        _copy_magnitudes(model, pairs)
        for hf_name, value in biases.items():
            native, part, _ = hf_tensors[hf_name]
            target = _plain_param(model, native)
            (target[qkv_slice(model.config, part)] if part else target).copy_(value)
    return wrapped


def _classify_adapter_keys(cfg: ModelConfig, state: dict[str, Tensor], weights_path: Path
                           ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """The file's tensors as LoRA pairs ({HF module: {"A": ..., "B": ...}}) and biases ({HF tensor name: value});
    any other key, or half a pair, is an error naming it."""
    linears, hf_tensors = _hf_linear_modules(cfg), hf_name_table(cfg)
    pairs: dict[str, dict[str, Tensor]] = {}
    biases: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if cfg.family == "gpt2" and re.match(r"^(h\.\d+)\.", name):  # adapter made on a bare GPT2Model
            name = "transformer." + name
        # A and B of a pair, and DoRA's magnitude under peft's saved name (no ".weight")
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name) or re.fullmatch(r"(.+)\.lora_(magnitude)_vector", name)
        bias_name = re.sub(r"\.base_layer\.bias$", ".bias", name)
        if match and match[1] in linears:
            pairs.setdefault(match[1], {})[match[2]] = value
        elif bias_name.endswith(".bias") and bias_name in hf_tensors:
            biases[bias_name] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise ModelError(f"{weights_path}: keys that match no LoRA-adaptable module or bias of this "
                         f"{cfg.family} model: {', '.join(sorted(unexpected))}")
    incomplete = [f"{PEFT_PREFIX}{m}.lora_{x}.weight" for m, ab in pairs.items() for x in "AB" if x not in ab]
    if incomplete:
        raise ModelError(f"{weights_path}: missing keys {', '.join(sorted(incomplete))}")
    if not pairs:
        raise ModelError(f"{weights_path} holds no LoRA weights (no *.lora_A.weight / *.lora_B.weight keys)")
    return pairs, biases


def _adapter_layout(model: nn.Module, conf: dict, pairs: dict[str, dict[str, Tensor]]
                    ) -> tuple[dict[str, dict[str, LoRAPart]], dict[tuple[str, str], tuple[Tensor, Tensor]], list[str]]:
    """The native LoRA layout the pairs describe, their (A, B) per (module, part), and every shape or rank
    that does not fit the model."""
    cfg: ModelConfig = model.config
    linears = _hf_linear_modules(cfg)
    layout: dict[str, dict[str, LoRAPart]] = {}
    weights: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
    problems: list[str] = []
    for module in (m for m in linears if m in pairs):  # model order: a layer's parts come as q, k, v
        native, part = linears[module]
        base = _plain_module(model, native)
        rows = qkv_slice(cfg, part) if part else slice(0, base.out_features)
        a, b = pairs[module]["A"], pairs[module]["B"]
        r = a.shape[0]
        want_r = _pattern_value(conf.get("rank_pattern") or {}, module, conf.get("r", 8))
        key = f"{PEFT_PREFIX}{module}"
        if a.shape != (r, base.in_features) or b.shape != (rows.stop - rows.start, r):
            problems.append(f"{key}.lora_A/B: shapes {tuple(a.shape)} / {tuple(b.shape)}, model needs "
                            f"({r}, {base.in_features}) / ({rows.stop - rows.start}, {r})")
        elif r != want_r:
            problems.append(f"{key}.lora_A.weight has rank {r} but {ADAPTER_CONFIG} says r={want_r}")
        alpha = _pattern_value(conf.get("alpha_pattern") or {}, module, conf.get("lora_alpha", 8))
        part_name = part or WHOLE
        layout.setdefault(native, {})[part_name] = LoRAPart(rows, r, alpha)
        weights[(native, part_name)] = (a, b)
    return layout, weights, problems


def _magnitude_rows(model: nn.Module, module: str) -> tuple[str, str, int]:
    """(native module, part name, number of output rows) of an HF module path: what a DoRA magnitude covers."""
    native, part = _hf_linear_modules(model.config)[module]
    rows = qkv_slice(model.config, part) if part else slice(0, _plain_module(model, native).out_features)
    return native, part or WHOLE, rows.stop - rows.start


def _magnitude_problems(model: nn.Module, conf: dict, pairs: dict[str, dict[str, Tensor]]) -> list[str]:
    """DoRA: with `use_dora` every pair has a magnitude of its rows' size; without it, none (peft would ignore a
    stray magnitude, which would then silently not be what was trained)."""
    use_dora, problems = bool(conf.get("use_dora")), []
    for module, tensors in pairs.items():
        key = f"{PEFT_PREFIX}{module}.lora_magnitude_vector"
        if ("magnitude" in tensors) != use_dora:
            problems.append(f"{key} is missing but {ADAPTER_CONFIG} says use_dora=true" if use_dora
                            else f"{key} is a DoRA magnitude but {ADAPTER_CONFIG} does not set use_dora")
            continue
        shape, n_rows = tuple(tensors.get("magnitude", torch.empty(0)).shape), _magnitude_rows(model, module)[2]
        if use_dora and shape != (n_rows,):
            problems.append(f"{key}: shape {shape}, model needs ({n_rows},)")
    return problems


def _copy_magnitudes(model: nn.Module, pairs: dict[str, dict[str, Tensor]]) -> None:
    layers = lora_layers(model)
    for module, tensors in pairs.items():
        if "magnitude" in tensors:
            native, part_name, _ = _magnitude_rows(model, module)
            layers[native].lora_magnitude_vector[part_name].copy_(tensors["magnitude"])


def _bias_problems(model: nn.Module, biases: dict[str, Tensor]) -> list[str]:
    cfg: ModelConfig = model.config
    hf_tensors = hf_name_table(cfg)
    problems = []
    for hf_name, value in biases.items():
        native, part, _ = hf_tensors[hf_name]
        target = _plain_param(model, native)
        want = (target[qkv_slice(cfg, part)] if part else target).shape
        if value.shape != want:
            problems.append(f"{hf_name}: shape {tuple(value.shape)}, model needs {tuple(want)}")
    return problems


# ---------------------------------------------------------------------------------------------------- merged


def save_merged(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """A standalone Hugging Face checkpoint of the model with its LoRA updates folded in (the caller's model is
    not modified: merged weights are computed into new tensors). See `models.saving.save_hf_checkpoint`."""
    return save_hf_checkpoint(model.config, merged_state_dict(model), tokenizer, out_dir)
