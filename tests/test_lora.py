"""LoRA layer, targets, trainable marking, merge/unmerge and parameter counts (references: peft, fp32)."""

from __future__ import annotations

import math

import peft
import pytest
import torch
import transformers
from torch import nn

from qatune import QatuneError, count_parameters
from qatune.lora.inject import (
    apply_lora,
    format_parameter_count,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from qatune.lora.layer import LoRAConfig, LoRALinear, LoRAPart
from qatune.models.config import from_hf_config
from qatune.models.decoder import Decoder

GPT2_TINY = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=32, bos_token_id=0, eos_token_id=0)
LLAMA_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)


def _hf_config(family: str):
    return transformers.GPT2Config(**GPT2_TINY) if family == "gpt2" else transformers.LlamaConfig(**LLAMA_TINY)


def _native(family: str, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(from_hf_config(_hf_config(family).to_dict()))
    model.init_weights()
    return model.eval()


def _randomise_lora(model: nn.Module) -> None:
    """Non-zero B (a fresh adapter is the identity), so the LoRA path shows in the output."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (*layer.lora_A.values(), *layer.lora_B.values()):
                p.normal_(std=0.2)


IDS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family,targets", [
    ("gpt2", None), ("gpt2", ["q", "v"]), ("gpt2", ["all-linear"]),
    ("llama", None), ("llama", ["all-linear"]), ("llama", ["k", "o", "gate"]),
])
def test_fresh_adapter_computes_exactly_the_base(family, targets):
    model = _native(family)
    with torch.no_grad():
        before = model(IDS)
        apply_lora(model, LoRAConfig(targets=targets))
        assert torch.equal(model(IDS), before)


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_is_alpha_over_r_or_sqrt_r(rslora):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, {"all": LoRAPart(slice(0, 5), r=4, alpha=3.0)}, dropout=0.0, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B["all"].normal_()
    x = torch.randn(3, 6)
    scale = 3.0 / (math.sqrt(4) if rslora else 4)
    expected = base(x) + scale * x @ layer.lora_A["all"].t() @ layer.lora_B["all"].t()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_gpt2_q_v_slices_update_only_their_rows():
    model = _native("gpt2")
    apply_lora(model, LoRAConfig(targets=["q", "v"]))
    layer = model.blocks[0].attn.qkv
    assert set(layer.parts) == {"q", "v"} and layer.lora_B["q"].shape == (32, 8)
    _randomise_lora(model)
    x = torch.randn(4, 32)
    with torch.no_grad():
        diff = (layer(x) - layer.base(x)).abs().amax(0)
    assert diff[:32].min() > 0 and diff[32:64].max() == 0 and diff[64:].min() > 0  # rows q | k | v


def test_llama_targets_are_slices_of_fused_qkv():
    model = _native("llama")
    names = apply_lora(model, LoRAConfig(targets=["q_proj", "v", "down_proj"]))
    assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.down", "blocks.1.attn.qkv", "blocks.1.mlp.down"]
    parts = model.blocks[1].attn.qkv.parts
    assert parts["q"].rows == slice(0, 32) and parts["v"].rows == slice(48, 64)  # 4 heads q, 2 kv heads of 8


def test_merge_unmerge_and_merge_lora_to_a_plain_model():
    model = _native("gpt2")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(targets=["q", "v", "up", "down"]))
    _randomise_lora(model)
    with torch.no_grad():
        adapted = model(IDS)
        merge_lora(model, unwrap=False)
        assert all(layer.merged for layer in lora_layers(model).values())
        torch.testing.assert_close(model(IDS), adapted, rtol=0, atol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model.blocks[1].attn.qkv.base.weight, weights["blocks.1.attn.qkv.weight"],
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(model(IDS), adapted, rtol=0, atol=1e-6)
        merge_lora(model)
        assert not lora_layers(model) and type(model.blocks[0].attn.qkv) is nn.Linear
        assert set(model.state_dict()) == set(weights)  # a plain Decoder's names again
        torch.testing.assert_close(model(IDS), adapted, rtol=0, atol=1e-5)


def test_trainable_marking_and_state_dict_by_bias_mode():
    model = _native("gpt2")
    apply_lora(model, LoRAConfig(targets=["c_attn"], bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.qkv.{k}" for i in (0, 1) for k in ("lora_A.all", "lora_B.all", "base.bias")}
    assert set(lora_state_dict(model)) == trainable
    model = _native("gpt2")
    apply_lora(model, LoRAConfig(bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "norm.bias" in trainable and "blocks.1.mlp.down.bias" in trainable and "embed.weight" not in trainable


def test_lora_only_bias_on_part_of_a_biased_llama_qkv_is_refused():
    """HF keeps q/k/v biases apart: training the fused bias for q/v alone would also train k's rows."""
    model = Decoder(from_hf_config(transformers.LlamaConfig(**LLAMA_TINY, attention_bias=True).to_dict()))
    with pytest.raises(QatuneError, match="bias='lora_only' with LoRA on only some of q/k/v"):
        apply_lora(model, LoRAConfig(targets=["q", "v"], bias="lora_only"))
    apply_lora(model, LoRAConfig(targets=["q", "k", "v"], bias="lora_only"))
    assert model.blocks[0].attn.qkv.base.bias.requires_grad


# peft configuration, qatune configuration: the same adapter on both sides.
COUNT_CASES = {
    "gpt2-c_attn": ("gpt2", dict(target_modules=["c_attn"]), dict()),
    "gpt2-c_proj-r4-bias-all": ("gpt2", dict(r=4, target_modules=["c_proj"], bias="all"),
                                dict(r=4, targets=["c_proj"], bias="all")),
    "gpt2-o-up-lora_only": ("gpt2", dict(target_modules=["attn.c_proj", "c_fc"], bias="lora_only"),
                            dict(targets=["o", "up"], bias="lora_only")),
    "gpt2-all-linear": ("gpt2", dict(target_modules="all-linear", r=2), dict(targets=["all-linear"], r=2)),
    "llama-default": ("llama", dict(target_modules=["q_proj", "v_proj"]), dict()),
    "llama-all-linear": ("llama", dict(target_modules="all-linear", r=16), dict(targets=["all-linear"], r=16)),
}


@pytest.mark.parametrize("case", COUNT_CASES.values(), ids=COUNT_CASES.keys())
def test_parameter_counts_equal_peft(case):
    family, peft_kw, qatune_kw = case
    ref = transformers.AutoModelForCausalLM.from_config(_hf_config(family))
    ref = peft.get_peft_model(ref, peft.LoraConfig(fan_in_fan_out=family == "gpt2", **peft_kw))
    model = _native(family)
    apply_lora(model, LoRAConfig(**qatune_kw))
    trainable, total, percent = count_parameters(model)
    assert (trainable, total) == ref.get_nb_trainable_parameters()
    assert percent == pytest.approx(100 * trainable / total)


def test_gpt2_real_dims_recipe_count():
    """The reference recipe: gpt2 (GPT2Config() defaults), r=8 on c_attn: peft reports 294,912 trainable."""
    with torch.device("meta"):
        model = Decoder(from_hf_config(transformers.GPT2Config().to_dict()))
        apply_lora(model, LoRAConfig(r=8, targets=["c_attn"]))
        ref = peft.get_peft_model(transformers.GPT2LMHeadModel(transformers.GPT2Config()),
                                  peft.LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True))
    assert count_parameters(model)[:2] == ref.get_nb_trainable_parameters() == (294_912, 124_734_720)
    assert format_parameter_count(model) == "Trainable parameters: 294,912 / 124,734,720 (0.2364%)"


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0), "lora.r must be >= 1, got 0"),
    (dict(r=-4), "lora.r must be >= 1, got -4"),
    (dict(r=2.5), "lora.r must be int, got 2.5"),
    (dict(alpha=0), "alpha must be > 0, got 0"),
    (dict(alpha=-1.5), "alpha must be > 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(bias="some"), "lora.bias must be one of none, all, lora_only; got 'some'"),
])
def test_bad_config_values_are_refused(kwargs, message):
    with pytest.raises(QatuneError, match=message):
        LoRAConfig(**kwargs)


def _valid_names_in(message: str) -> set[str]:
    return set(message.split("valid targets: ")[1].split(", "))


def test_unknown_targets_list_the_family_valid_names():
    with pytest.raises(QatuneError) as err:
        apply_lora(_native("gpt2"), LoRAConfig(targets=["q", "gate", "q_proj"]))
    assert "'gate', 'q_proj'" in str(err.value) and "gpt2 model" in str(err.value)
    assert _valid_names_in(str(err.value)) == {
        "q", "k", "v", "o", "up", "down", "qkv", "all-linear", "c_attn", "c_fc", "c_proj"}
    with pytest.raises(QatuneError) as err:
        apply_lora(_native("llama"), LoRAConfig(targets=["qkv", "c_attn"]))
    assert "'qkv', 'c_attn'" in str(err.value) and "llama model" in str(err.value)
    assert _valid_names_in(str(err.value)) == {
        "q", "k", "v", "o", "up", "gate", "down", "all-linear",
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(QatuneError, match="both as a whole and as q/k/v slices"):
        apply_lora(_native("gpt2"), LoRAConfig(targets=["qkv", "q"]))


@pytest.mark.parametrize("family,targets,dtype", [
    ("llama", ["all-linear"], torch.bfloat16),
    ("gpt2", None, torch.bfloat16),
    ("gpt2", ["up", "o"], torch.float32),  # whole layers fed by frozen layers: inputs without grad
])
def test_frozen_base_trains_only_lora(family, targets, dtype):
    """A bf16 frozen base with fp32 LoRA weights runs forward/backward; grads land on LoRA params only."""
    model = _native(family).to(dtype)
    apply_lora(model, LoRAConfig(targets=targets))
    _randomise_lora(model)
    lora = {n for n, p in model.named_parameters() if ".lora_" in n}
    assert {p.dtype for n, p in model.named_parameters() if n in lora} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if n not in lora} == {dtype}
    model.train()
    logits = model(IDS)
    assert logits.dtype == dtype
    logits.float().logsumexp(-1).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == lora
    grads = [p.grad for n, p in model.named_parameters() if n in lora]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
