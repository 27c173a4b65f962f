"""LoRA+ (`train.loraplus_ratio`) against peft's `create_loraplus_optimizer`: the same parameters in the same
groups with the same learning rates and weight decays; the schedule keeps each group's own base rate; a resume
keeps the groups, and refuses another ratio.

The parameters are matched with peft's by value: the native model's adapter (A and a random B) is handed to peft
through `save_adapter`, on a base whose biases and norm weights are random too, so every tensor is told apart by
its shape and its numbers.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file

from qatune.errors import ConfigError
from qatune.lora.adapters import save_adapter
from qatune.lora.inject import apply_lora, lora_layers
from qatune.lora.layer import LoRAConfig
from qatune.models.loading import load_base_model
from qatune.training.checkpoint import load_checkpoint
from qatune.training.config import load_config
from qatune.training.optim import base_lrs, lr_factor, make_optimizer
from qatune.training.recipe import train_model

LR, RATIO, WEIGHT_DECAY = 2e-3, 16.0, 0.05
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def random_bias_bases(tmp_path_factory, tiny_gpt2_dir, tiny_llama_dir) -> dict[str, Path]:
    """The tiny GPT-2 and Llama with every 1-D tensor (biases, norm weights) random, so none is like another."""
    dirs = {}
    for family, source in (("gpt2", tiny_gpt2_dir), ("llama", tiny_llama_dir)):
        model = transformers.AutoModelForCausalLM.from_pretrained(source)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.normal_()
        dirs[family] = tmp_path_factory.mktemp(f"random-bias-{family}")
        model.save_pretrained(dirs[family])
    return dirs


def _fingerprint(p: torch.Tensor) -> str:
    return f"{tuple(p.shape)}:{hashlib.sha256(p.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]}"


def _groups(optimizer: torch.optim.Optimizer) -> list[tuple[list[str], float, float]]:
    return [(sorted(_fingerprint(p) for p in g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


@pytest.mark.parametrize("family, targets, bias", [
    ("gpt2", ["c_attn", "c_fc"], "all"),
    ("gpt2", ["all-linear"], "lora_only"),
    ("llama", ["all-linear"], "none"),
])
def test_groups_lrs_and_weight_decays_are_peft_loraplus(family, targets, bias, random_bias_bases, tmp_path):
    base = random_bias_bases[family]
    model = load_base_model(base)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=targets, bias=bias))
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.normal_()
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    ours = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, device=CPU, loraplus_ratio=RATIO)

    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    reference_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    reference = create_loraplus_optimizer(reference_model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                          loraplus_weight_decay=WEIGHT_DECAY)
    got, want = _groups(ours), _groups(reference)
    assert len(got) == len(want) == 4
    for i, ((g_params, g_lr, g_wd), (w_params, w_lr, w_wd)) in enumerate(zip(got, want)):
        assert g_params == w_params, f"group {i}"
        assert (g_lr, g_wd) == (w_lr, w_wd), f"group {i}"
    a, _, b, b_no_decay = got
    assert a[0] and b[0] and bool(b_no_decay[0]) == (bias != "none")  # A, B (and the biases) are all there
    assert got[2][1] == LR * RATIO and got[0][1] == LR


def test_the_schedule_multiplies_each_groups_own_base_rate(tiny_gpt2_dir):
    model = load_base_model(tiny_gpt2_dir)
    apply_lora(model, LoRAConfig(r=4, targets=["c_attn"], bias="all"))
    optimizer = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, device=CPU, loraplus_ratio=RATIO)
    factor = lr_factor("cosine", warmup_steps=2, min_lr_ratio=0.1, total_steps=10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    bases = [LR, 1e-6, LR * RATIO, LR * RATIO]  # groupA, embedding (peft's fixed 1e-6), groupB, groupB_no_decay
    assert base_lrs(optimizer, LR) == bases
    for step in range(6):
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([b * factor(step) for b in bases])
        optimizer.step()
        scheduler.step()
    assert base_lrs(optimizer, 3 * LR) == [3 * LR, 1e-6, 3 * LR * RATIO, 3 * LR * RATIO]


def _train(base: Path, out: Path, *extra: str) -> dict:
    return train_model(load_config(None, [
        f"model={base}", "method=lora", "data.train=sample", "train.batch_size=4", f"train.lr={LR}",
        "lora.r=4", "lora.bias=all", "train.progress=false", "train.schedule=cosine", "train.warmup_steps=2",
        "train.save_every=2", "train.eval_every=100", f"out={out}", *extra]))


def test_a_resumed_loraplus_run_keeps_its_groups_and_rates(qa_gpt2_dir, tmp_path, caplog):
    """A run stopped after step 2 and resumed ends with the adapter of the run that was never stopped (the same
    per-group rates under the warm-up and cosine schedule); its checkpoints keep the groups' rates."""
    args = ("train.max_steps=5", f"train.loraplus_ratio={RATIO}", "train.keep_checkpoints=5")
    _train(qa_gpt2_dir, tmp_path / "straight", *args)
    run = tmp_path / "resumed"
    _train(qa_gpt2_dir, run, *args)
    for step in (4, 5):  # back to the checkpoint of step 2, as if the run had been stopped there
        shutil.rmtree(run / "checkpoints" / f"step-{step:06d}")
    shutil.rmtree(run / "adapter")
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000002"]
    with caplog.at_level(logging.INFO, logger="qatune"):
        _train(qa_gpt2_dir, run, *args, "resume=true")
    assert "(step 2, epoch 0)" in caplog.text
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key

    _, state = load_checkpoint(run / "checkpoints" / "step-000005")
    groups = state["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [LR, 1e-6, LR * RATIO, LR * RATIO]
    assert groups[2]["lr"] == pytest.approx(RATIO * groups[0]["lr"]) and groups[0]["lr"] < LR  # cosine decayed
    assert [g["weight_decay"] for g in groups] == [0.01, 0.01, 0.01, 0.0]


def test_a_resume_refuses_another_ratio_and_full_fine_tuning_has_none(qa_gpt2_dir, tmp_path):
    _train(qa_gpt2_dir, tmp_path / "run", "train.max_steps=2", f"train.loraplus_ratio={RATIO}")
    with pytest.raises(ConfigError, match=r"train.loraplus_ratio: 16.0 -> 8.0"):
        _train(qa_gpt2_dir, tmp_path / "run", "train.max_steps=4", "train.loraplus_ratio=8", "resume=true")
    with pytest.raises(ConfigError, match="train.loraplus_ratio is for method=lora"):
        load_config(None, ["data.train=sample", "method=full", "train.loraplus_ratio=4"]).resolved()
    with pytest.raises(ConfigError, match="train.loraplus_ratio"):
        load_config(None, ["train.loraplus_ratio=0"])
