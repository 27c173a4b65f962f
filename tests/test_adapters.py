"""peft-format adapters both ways, and merged checkpoints, against transformers + peft (fp32, max abs diff <= 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from qatune import QatuneError, count_parameters, load_model
from qatune.data.batching import label_positions
from qatune.evaluation.loss import model_loss
from qatune.lora import LoRAConfig, apply_lora, lora_layers
from qatune.lora.adapters import load_adapter, save_adapter, save_merged
from qatune.publish.merge import merge_run

TOL = 1e-4
VOCAB = 320  # the conftest checkpoints' vocabulary
IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))


@pytest.fixture()
def adapter_base_dirs(tiny_gpt2_dir, tiny_llama_dir) -> dict[str, Path]:
    """Random tiny GPT-2 and Llama checkpoints saved by transformers (tests/conftest.py)."""
    return {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}


def _hf(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _assert_same_logits(model, ref) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref(IDS).logits, rtol=0, atol=TOL)


def _train(model, steps: int = 3):
    """A few AdamW steps on random tokens so that B (and trained biases) move away from their init."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 12))
        batch = {"input_ids": ids, **label_positions(ids)}
        loss = model_loss(model, batch) / batch["loss_targets"].numel()  # the mean
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(b.abs().max() > 0 for layer in lora_layers(model).values() for b in layer.lora_B.values())
    return model.eval()


QATUNE_TO_PEFT = {
    "gpt2-c_attn-bias-all": ("gpt2", dict(targets=["c_attn"], bias="all")),
    "gpt2-q-v-slices-up-lora_only": ("gpt2", dict(targets=["q", "v", "up"], bias="lora_only")),
    "gpt2-q-v-slices-o-rslora": ("gpt2", dict(targets=["q", "v", "o"], use_rslora=True, r=4, alpha=8)),
    "llama-q-v": ("llama", dict()),
    "llama-all-linear-rslora": ("llama", dict(targets=["all-linear"], use_rslora=True)),
}


@pytest.mark.parametrize("case", QATUNE_TO_PEFT.values(), ids=QATUNE_TO_PEFT.keys())
def test_qatune_adapter_loads_in_peft(adapter_base_dirs, tmp_path, case):
    family, lora_kw = case
    base_dir = adapter_base_dirs[family]
    model = load_model(base_dir)
    apply_lora(model, LoRAConfig(**lora_kw))
    _train(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    assert not list(tmp_path.glob(".adapter.tmp-*"))  # written atomically, nothing left behind

    ref = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path / "adapter").eval()
    _assert_same_logits(model, ref)
    again = load_model(base_dir, adapter=tmp_path / "adapter")  # and back into qatune
    _assert_same_logits(again, ref)


def test_gpt2_q_v_slices_export_as_fused_c_attn(adapter_base_dirs, tmp_path):
    """No peft module is a slice of c_attn: q+v pairs of rank r become one c_attn pair of rank 2r (B block-placed,
    zero on k's rows), alpha 2*alpha, in rank_pattern/alpha_pattern since the other layers keep rank r. `c_proj`
    would also select attn.c_proj, so target_modules lists full paths."""
    model = load_model(adapter_base_dirs["gpt2"])
    apply_lora(model, LoRAConfig(targets=["q", "v", "up", "down"], r=4, alpha=8))
    save_adapter(model, tmp_path, base_model_name_or_path="x")
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["fan_in_fan_out"]) == (4, 8, True)
    c_attn = [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]
    assert conf["rank_pattern"] == dict.fromkeys(c_attn, 8) and conf["alpha_pattern"] == dict.fromkeys(c_attn, 16)
    assert conf["target_modules"] == sorted(
        f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"))
    weights = load_file(tmp_path / "adapter_model.safetensors")
    b = weights["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert b.shape == (192, 8) and b[64:128].abs().max() == 0 and b[:64, 4:].abs().max() == 0  # rows q | k | v


def _peft_model(family: str, base_dir: Path, **lora_kw) -> peft.PeftModel:
    torch.manual_seed(1)
    ref = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(fan_in_fan_out=family == "gpt2", **lora_kw))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name or (lora_kw.get("bias") == "all" and name.endswith(".bias")):
                p.normal_(std=0.2)
    return ref.eval()


PEFT_TO_QATUNE = {
    "gpt2-default-c_attn": ("gpt2", dict(target_modules=["c_attn"]), True),
    "gpt2-c_attn-c_proj-patterns-rslora-bias-all": (
        "gpt2", dict(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=12, use_rslora=True, bias="all",
                     rank_pattern={"mlp.c_proj": 2}, alpha_pattern={"attn.c_proj": 5}), True),
    "llama-q-v-bin": ("llama", dict(target_modules=["q_proj", "v_proj"]), False),
    "llama-all-linear": ("llama", dict(target_modules="all-linear", rank_pattern={"k_proj": 2}), True),
    "llama-layer-1-only": ("llama", dict(target_modules=["k_proj", "o_proj", "up_proj"], layers_to_transform=[1]),
                           True),
}


@pytest.mark.parametrize("case", PEFT_TO_QATUNE.values(), ids=PEFT_TO_QATUNE.keys())
def test_peft_adapter_loads_in_qatune(adapter_base_dirs, tmp_path, case):
    family, lora_kw, safetensors = case
    ref = _peft_model(family, adapter_base_dirs[family], **lora_kw)
    ref.save_pretrained(tmp_path, safe_serialization=safetensors)
    assert (tmp_path / ("adapter_model.safetensors" if safetensors else "adapter_model.bin")).is_file()
    model = load_model(adapter_base_dirs[family], adapter=tmp_path)
    _assert_same_logits(model, ref)
    assert count_parameters(model)[:2] == ref.get_nb_trainable_parameters()  # same adapter, same marking


@pytest.mark.parametrize("family,lora_kw", [("gpt2", dict(targets=["q", "v", "down"], bias="all")),
                                             ("llama", dict(targets=["all-linear"]))])
def test_merged_checkpoint_loads_in_transformers_alone(adapter_base_dirs, qa_tokenizer_dir, tmp_path, family,
                                                       lora_kw):
    model = load_model(adapter_base_dirs[family])
    apply_lora(model, LoRAConfig(**lora_kw))
    _train(model)
    with torch.no_grad():
        adapted = model(IDS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(qa_tokenizer_dir)
    save_merged(model, tokenizer, tmp_path / "merged")
    ref = _hf(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS).logits, adapted, rtol=0, atol=TOL)
        assert torch.equal(model(IDS), adapted)  # the caller's model still has its (unmerged) LoRA layers
    assert lora_layers(model)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]]
    assert config["tie_word_embeddings"] == (family == "gpt2")
    assert ("lm_head.weight" in load_file(tmp_path / "merged" / "model.safetensors")) == (family == "llama")
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def _adapter_dir(tmp_path: Path, base_dir: Path, **config_changes) -> Path:
    model = load_model(base_dir)
    apply_lora(model, LoRAConfig())
    save_adapter(model, tmp_path / "a", base_model_name_or_path=str(base_dir))
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return tmp_path / "a"


@pytest.mark.parametrize("changes,message", [
    (dict(use_dora=True), r"c_attn\.lora_magnitude_vector is missing but adapter_config.json says use_dora=true"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(peft_type="IA3"), "peft_type 'IA3' is not supported"),
    (dict(init_lora_weights="pissa"), "changes the base model's weights"),
    (dict(r=4), "has rank 8 but adapter_config.json says r=4"),
])
def test_unsupported_or_inconsistent_configs_are_refused(adapter_base_dirs, tmp_path, changes, message):
    adapter = _adapter_dir(tmp_path, adapter_base_dirs["gpt2"], **changes)
    with pytest.raises(QatuneError, match=message) as err:
        load_model(adapter_base_dirs["gpt2"], adapter=adapter)
    assert "adapter_" in str(err.value)  # the file is named


def test_mismatched_and_unexpected_keys_are_named(adapter_base_dirs, tmp_path):
    gpt2 = adapter_base_dirs["gpt2"]
    adapter = _adapter_dir(tmp_path, gpt2)
    weights_file = adapter / "adapter_model.safetensors"
    weights = load_file(weights_file)
    weights["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
    save_file(weights, weights_file)
    with pytest.raises(QatuneError, match=r"adapter_model.safetensors: .*base_model.model.lm_head.lora_A.weight"):
        load_model(gpt2, adapter=adapter)
    with pytest.raises(QatuneError, match=r"match no LoRA-adaptable module or bias of this llama model: .*c_attn"):
        load_model(adapter_base_dirs["llama"], adapter=adapter)
    del weights["base_model.model.lm_head.lora_A.weight"]
    weights["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"] = torch.zeros(50, 8)
    save_file(weights, weights_file)
    with pytest.raises(QatuneError, match=r"does not fit this gpt2 model: .*h\.1\.attn\.c_attn.*\(50, 8\)"):
        load_model(gpt2, adapter=adapter)
    del weights["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    save_file(weights, weights_file)
    with pytest.raises(QatuneError, match=r"missing keys .*h\.1\.attn\.c_attn\.lora_B\.weight"):
        load_model(gpt2, adapter=adapter)
    with pytest.raises(QatuneError, match="has no adapter_config.json"):
        load_adapter(load_model(gpt2), tmp_path)


def test_save_adapter_replaces_files_of_an_existing_directory(adapter_base_dirs, tmp_path):
    model = load_model(adapter_base_dirs["gpt2"])
    apply_lora(model, LoRAConfig())
    (tmp_path / "keep.txt").write_text("user file")
    save_adapter(model, tmp_path, base_model_name_or_path="a")
    save_adapter(model, tmp_path, base_model_name_or_path="b")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "b"
    assert (tmp_path / "keep.txt").read_text() == "user file"
    assert sorted(p.name for p in tmp_path.parent.iterdir() if ".tmp-" in p.name) == []


def test_merge_run_makes_a_standalone_checkpoint(tiny_gpt2_dir, qa_tokenizer_dir, tmp_path):
    """`qatune merge RUN OUT` on a run laid out as train.py writes it (config.yaml + adapter/)."""
    model = load_model(tiny_gpt2_dir)
    apply_lora(model, LoRAConfig(targets=["q", "v"]))
    _train(model)
    run = tmp_path / "run"
    save_adapter(model, run / "adapter", base_model_name_or_path=str(tiny_gpt2_dir))
    (run / "config.yaml").write_text(f"model: {tiny_gpt2_dir}\ntokenizer: {qa_tokenizer_dir}\n")
    assert merge_run(run, tmp_path / "merged") == tmp_path / "merged"
    _assert_same_logits(model, _hf(tmp_path / "merged"))
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    with pytest.raises(QatuneError, match="not a LoRA run directory"):
        merge_run(tmp_path / "merged", tmp_path / "again")
