"""LoRA training against peft: the same adapter on the same base, trained by AdamW on the same batches, gives the
same loss at every step and the same adapter weights after the last (fp32, atol 1e-5).

qatune's adapter (A and a random B, so that A gets a gradient from the first step) is handed to peft through
`save_adapter`, and the trained weights are compared under peft's names through `save_adapter` again, so the
qatune <-> peft name and layout mapping is `lora.adapters`' own. Both sides compute the loss from their full
logits with the same function (`_lm_loss`), so what is compared is the forward and backward of the adapted
models and nothing else.

GPT-2 q/v slices have no peft module: they export as one `c_attn` pair of rank 2r with B block-placed (zero on
k's rows and across the blocks). peft trains such a pair on `c_attn` with the gradient of B restricted to the
q and v blocks, which is built here from the model's shape (`_gpt2_qv_block_mask`), not from qatune's export.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from qatune.lora.adapters import save_adapter
from qatune.lora.inject import apply_lora, lora_layers
from qatune.lora.layer import LoRAConfig
from qatune.models.loading import load_base_model

VOCAB, STEPS, LR, WEIGHT_DECAY = 320, 5, 1e-2, 0.1
ATOL = 1e-5
GPT2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
             tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory) -> dict[str, Path]:
    """Random tiny GPT-2 and Llama (grouped-query attention) checkpoints, no dropout, saved by transformers."""
    dirs = {}
    for family, model_cls, cfg in (("gpt2", transformers.GPT2LMHeadModel, transformers.GPT2Config(**GPT2)),
                                   ("llama", transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA))):
        torch.manual_seed(0)
        dirs[family] = tmp_path_factory.mktemp(f"base-{family}")
        model_cls(cfg).save_pretrained(dirs[family])
    return dirs


def _batches() -> list[dict[str, torch.Tensor]]:
    """One batch per step: right-padded rows of different lengths; labels -100 on the prompt and the padding."""
    gen = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(2, VOCAB, (3, 14), generator=gen)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        for row, (prompt, length) in enumerate([(5, 14), (3, 10), (7, 12)]):
            mask[row, length:] = 0
            labels[row, :prompt] = -100
            labels[row, length:] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (position t predicts labels[t+1])."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def _train(model: torch.nn.Module, logits_of) -> list[float]:
    """STEPS AdamW steps over the trainable parameters; the loss of every step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    model.train()
    losses = []
    for batch in _batches():
        loss = _lm_loss(logits_of(model, batch), batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _gpt2_qv_block_mask(r: int) -> torch.Tensor:
    """Which entries of peft's c_attn lora_B [3 * n_embd, 2r] a q/v-slice adapter has: rows q x the first r
    columns, rows v x the last r (the columns of c_attn's A are [A_q; A_v])."""
    d = GPT2["n_embd"]
    mask = torch.zeros(3 * d, 2 * r)
    mask[:d, :r] = 1
    mask[2 * d:, r:] = 1
    return mask


def _peft_tensors(ref: peft.PeftModel) -> dict[str, torch.Tensor]:
    """peft's adapter state dict. Older peft releases (0.13 among them) leave the biases of `bias="lora_only"` out
    of it: they look for `c_fc.bias`, which lives at `c_fc.base_layer.bias` once the layer wraps its base. Those
    trained tensors are read from the model, under the names that newer releases save."""
    tensors = {k: v.detach() for k, v in peft.get_peft_model_state_dict(ref).items()}
    if ref.peft_config["default"].bias == "lora_only":
        full = ref.state_dict()
        for key, value in full.items():
            if key.endswith(".base_layer.bias") and key.replace("base_layer.bias", "lora_A.default.weight") in full:
                tensors.setdefault(key, value.detach())
    return tensors


def _qatune_tensors(model: torch.nn.Module, out: Path, base_dir: Path) -> dict[str, torch.Tensor]:
    """qatune's adapter under peft's names, as `save_adapter` writes it."""
    return load_file(save_adapter(model, out, base_model_name_or_path=str(base_dir)) / "adapter_model.safetensors")


CASES = {
    "gpt2-c_attn": ("gpt2", dict(targets=["c_attn"])),
    # Not c_attn's bias: k's has no gradient in exact arithmetic (a per-query shift of the scores), so AdamW
    # turns each side's float noise into steps of up to lr * noise / eps, and the two sides part by ~1e-4.
    "gpt2-c_fc-c_proj-bias-lora_only": ("gpt2", dict(targets=["c_fc", "c_proj"], bias="lora_only")),
    "gpt2-q-v-slices": ("gpt2", dict(targets=["q", "v"], r=4)),
    "llama-q_proj-v_proj": ("llama", dict(targets=["q_proj", "v_proj"])),
    "llama-all-linear": ("llama", dict(targets=["all-linear"], r=4, alpha=8)),
    "llama-q-v-rslora": ("llama", dict(targets=["q_proj", "v_proj"], r=4, alpha=12, use_rslora=True)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_lora_training_matches_peft(base_dirs, tmp_path, case):
    family, lora_kw = case
    base_dir = base_dirs[family]
    model = load_base_model(base_dir)
    apply_lora(model, LoRAConfig(dropout=0.0, **lora_kw))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.normal_(std=0.05)
    start = _qatune_tensors(model, tmp_path / "start", base_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "start", is_trainable=True)
    assert ref.peft_config["default"].use_rslora == lora_kw.get("use_rslora", False)
    if lora_kw["targets"] == ["q", "v"]:
        mask = _gpt2_qv_block_mask(lora_kw["r"])
        for i in range(GPT2["n_layer"]):
            c_attn = ref.get_submodule(f"base_model.model.transformer.h.{i}.attn.c_attn")
            c_attn.lora_B["default"].weight.register_hook(lambda grad: grad * mask)

    ours = _train(model, lambda m, b: m(b["input_ids"], attention_mask=b["attention_mask"]))
    theirs = _train(ref, lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)

    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=0, atol=ATOL)
    assert abs(ours[-1] - ours[0]) > 100 * ATOL  # the batches (and the adapter) change the loss
    trained, expected = _qatune_tensors(model, tmp_path / "end", base_dir), _peft_tensors(ref)
    assert set(trained) == set(expected) == set(start)
    for key in sorted(expected):
        torch.testing.assert_close(trained[key], expected[key], rtol=0, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")
        moved = (trained[key] - start[key]).abs().max().item()
        assert moved > 100 * ATOL, f"{key} did not train ({moved})"
