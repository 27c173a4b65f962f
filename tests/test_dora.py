"""DoRA (`lora.use_dora`) against peft's DoRA (fp32; logits within 1e-4 max abs, training losses within 1e-5).

The references are peft's `LoraConfig(use_dora=True)` layers on the transformers models and peft's own
`merge_and_unload`: qatune's adapters load in peft and peft's in qatune with the same logits, the merged weights
are peft's merged weights, and a few AdamW steps on both sides give the same losses and the same trained A, B and
magnitudes. The bases have random non-zero biases (DoRA rescales `W x` but not the bias) and the logits spread
over several units (init std 0.5), so a mismatch is not hidden in float noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from qatune import load_model
from qatune.bench.setups import build_hf, build_native, random_native_state, shape_config
from qatune.cli.commands import main
from qatune.data.batching import label_positions
from qatune.errors import QatuneError
from qatune.evaluation.loss import model_loss
from qatune.generation.runs import load_for_inference
from qatune.lora import LoRAConfig, apply_lora, count_parameters, lora_layers, merge_lora, unmerge_lora
from qatune.lora.adapters import save_adapter, save_merged
from qatune.lora.layer import LoRALinear, LoRAPart
from qatune.models.config import from_hf_config
from qatune.models.decoder import Decoder
from qatune.training.build import LossModule
from qatune.training.config import load_config
from qatune.training.recipe import train_model

VOCAB, TOL, TRAIN_TOL = 320, 1e-4, 1e-5
IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
MAGNITUDE = "lora_magnitude_vector"


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random GPT-2 and Llama (grouped-query attention, q/k/v/o biases), every bias random, no dropout."""
    configs = {
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2,
            initializer_range=0.5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
            attention_bias=True, initializer_range=0.5)),
    }
    dirs = {}
    for family, (model_cls, cfg) in configs.items():
        torch.manual_seed(0)
        model = model_cls(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias") and "ln" not in name:
                    p.normal_(std=0.3)
        dirs[family] = tmp_path_factory.mktemp(f"dora-base-{family}")
        model.save_pretrained(dirs[family])
    return dirs


def _hf(path: Path) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _assert_same_logits(model: nn.Module, ref: nn.Module) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref(IDS).logits, rtol=0, atol=TOL)


def _train_qatune(model: nn.Module, steps: int = 3) -> nn.Module:
    """A few AdamW steps (with the adapter's dropout) so that B leaves zero and the magnitudes move."""
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in model.state_dict().items() if MAGNITUDE in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 12))
        loss = model_loss(model, {"input_ids": ids, **label_positions(ids)}) / (2 * 11)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert start and all((model.state_dict()[k] - v).abs().max() > 1e-3 for k, v in start.items())
    assert all(b.abs().max() > 0 for layer in lora_layers(model).values() for b in layer.lora_B.values())
    return model.eval()


def _magnitude_keys(adapter_dir: Path) -> set[str]:
    return {k for k in load_file(adapter_dir / "adapter_model.safetensors") if k.endswith(MAGNITUDE)}


QATUNE_TO_PEFT = {
    "gpt2-c_attn": ("gpt2", dict(targets=["c_attn"]), ["attn.c_attn"]),
    # q/v slices export as one c_attn pair and one c_attn magnitude (k's rows: their base norm, left unchanged)
    "gpt2-q-v-slices-o-up-bias-lora_only": ("gpt2", dict(targets=["q", "v", "o", "up"], r=4, bias="lora_only"),
                                             ["attn.c_attn", "attn.c_proj", "mlp.c_fc"]),
    "llama-q-v": ("llama", dict(), ["self_attn.q_proj", "self_attn.v_proj"]),
    "llama-all-linear-rslora": ("llama", dict(targets=["all-linear"], r=4, alpha=8, use_rslora=True),
                                [f"{m}_proj" for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                                       "mlp.gate", "mlp.up", "mlp.down")]),
}


@pytest.mark.parametrize("case", QATUNE_TO_PEFT.values(), ids=QATUNE_TO_PEFT.keys())
def test_qatune_dora_adapter_loads_in_peft(base_dirs, tmp_path, case):
    family, lora_kw, modules = case
    model = load_model(base_dirs[family])
    apply_lora(model, LoRAConfig(use_dora=True, dropout=0.1, **lora_kw))
    _train_qatune(model)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dirs[family]))

    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    prefix = {"gpt2": "base_model.model.transformer.h.{i}.", "llama": "base_model.model.model.layers.{i}."}[family]
    assert _magnitude_keys(adapter) == {prefix.format(i=i) + f"{m}.{MAGNITUDE}" for i in (0, 1) for m in modules}
    ref = peft.PeftModel.from_pretrained(_hf(base_dirs[family]), adapter).eval()
    assert ref.peft_config["default"].use_dora
    _assert_same_logits(model, ref)
    _assert_same_logits(load_model(base_dirs[family], adapter=adapter), ref)  # and back into qatune


def _peft_trained(family: str, base_dir: Path, **lora_kw) -> peft.PeftModel:
    """peft's DoRA (B random so that every tensor gets a gradient), trained a few AdamW steps by peft."""
    torch.manual_seed(1)
    ref = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(fan_in_fan_out=family == "gpt2", use_dora=True,
                                                             lora_dropout=0.1, **lora_kw))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    ref.train()
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (2, 12))
        ref(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return ref.eval()


PEFT_TO_QATUNE = {
    "gpt2-c_attn-c_proj": ("gpt2", dict(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=12)),
    "gpt2-c_fc-patterns-bias-all": ("gpt2", dict(target_modules=["c_fc", "c_attn"], bias="all",
                                                 rank_pattern={"c_fc": 2}, alpha_pattern={"c_attn": 5})),
    "llama-all-linear-rslora": ("llama", dict(target_modules="all-linear", r=4, use_rslora=True,
                                              rank_pattern={"k_proj": 2})),
}


@pytest.mark.parametrize("case", PEFT_TO_QATUNE.values(), ids=PEFT_TO_QATUNE.keys())
def test_peft_dora_adapter_loads_in_qatune(base_dirs, tmp_path, case):
    family, lora_kw = case
    ref = _peft_trained(family, base_dirs[family], **lora_kw)
    ref.save_pretrained(tmp_path)
    assert _magnitude_keys(tmp_path)  # peft's own file, magnitudes under peft's saved names
    model = load_model(base_dirs[family], adapter=tmp_path)
    assert model.lora_config.use_dora
    _assert_same_logits(model, ref)
    assert count_parameters(model)[:2] == ref.get_nb_trainable_parameters()  # magnitudes marked trainable too


def test_fresh_dora_magnitudes_are_peft_initial_ones(base_dirs, tmp_path):
    """m = ||W||_row at the start (B = 0), computed by peft on the Conv1D / Linear weights of transformers."""
    model = load_model(base_dirs["gpt2"])
    apply_lora(model, LoRAConfig(targets=["c_attn", "down"], use_dora=True))
    ours = load_file(save_adapter(model, tmp_path, base_model_name_or_path="x") / "adapter_model.safetensors")
    ref = peft.get_peft_model(_hf(base_dirs["gpt2"]), peft.LoraConfig(
        target_modules=["attn.c_attn", "mlp.c_proj"], fan_in_fan_out=True, use_dora=True))
    theirs = {k: v for k, v in peft.get_peft_model_state_dict(ref).items() if k.endswith(MAGNITUDE)}
    assert set(theirs) == {k for k in ours if k.endswith(MAGNITUDE)} and len(theirs) == 4
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=TRAIN_TOL)
    with torch.no_grad():
        base = load_model(base_dirs["gpt2"])
        torch.testing.assert_close(model(IDS), base(IDS), rtol=0, atol=TOL)  # a fresh adapter changes nothing


def test_dora_layer_with_dropout_and_bias_is_peft_layer():
    """Training mode with dropout: peft rescales `W dropout(x)` (not `W x`); the same masks (same seed, one draw
    per layer on each side) must give the same output and the same gradients of x, A, B and the magnitude."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 12)
    ref = peft.get_peft_model(nn.Sequential(linear), peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=8,
                                                                      lora_dropout=0.3, use_dora=True))
    ours = nn.Sequential(nn.Linear(16, 12))
    ours[0].load_state_dict(linear.state_dict())
    layer = LoRALinear(ours[0], {"all": LoRAPart(slice(0, 12), r=4, alpha=8.0)}, dropout=0.3, use_rslora=False,
                       use_dora=True)
    peft_layer = ref.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(std=0.3)
        peft_layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.rand(12))
        layer.lora_A["all"].copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B["all"].copy_(peft_layer.lora_B["default"].weight)
        layer.lora_magnitude_vector["all"].copy_(peft_layer.lora_magnitude_vector["default"].weight)
    for training in (True, False):
        x = torch.randn(3, 5, 16)
        outs, grads = [], []
        for module, params in ((layer, (layer.lora_A["all"], layer.lora_B["all"], layer.lora_magnitude_vector["all"])),
                               (peft_layer, (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
                                             peft_layer.lora_magnitude_vector["default"].weight))):
            module.train(training)
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(5)
            out = module(xi)
            (out * torch.linspace(-1, 1, 12)).sum().backward()
            outs.append(out.detach())
            grads.append([xi.grad] + [p.grad.clone() for p in params])
            for p in params:
                p.grad = None
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
        for g_ours, g_peft in zip(*grads):
            torch.testing.assert_close(g_ours, g_peft, rtol=0, atol=1e-5)
    base = linear(x).detach()
    assert (outs[0] - base).abs().max() > 1e-2  # the adapter changes the output


@pytest.mark.parametrize("family,lora_kw", [("gpt2", dict(targets=["q", "v", "up"], bias="all")),
                                             ("llama", dict(targets=["all-linear"], r=4))])
def test_merged_dora_is_the_unmerged_model_and_peft_merge(base_dirs, qa_tokenizer_dir, tmp_path, family, lora_kw):
    model = load_model(base_dirs[family])
    apply_lora(model, LoRAConfig(use_dora=True, **lora_kw))
    _train_qatune(model)
    with torch.no_grad():
        adapted = model(IDS)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dirs[family]))
    tokenizer = transformers.AutoTokenizer.from_pretrained(qa_tokenizer_dir)
    save_merged(model, tokenizer, tmp_path / "merged")
    with torch.no_grad():
        # rtol too: under the floor torch (2.7) one logit of 8,320 differs by 1.1e-4 at a magnitude of 0.6
        torch.testing.assert_close(_hf(tmp_path / "merged")(IDS).logits, adapted, rtol=1e-4, atol=TOL)
    # peft's merge of the same adapter: W' = m / ||W + sBA|| * (W + sBA), its own code on transformers' layout
    peft_merged = peft.PeftModel.from_pretrained(_hf(base_dirs[family]), tmp_path / "adapter").merge_and_unload()
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    theirs = {k: v for k, v in peft_merged.state_dict().items() if k in ours}
    adapted_weights = {"gpt2": "transformer.h.1.attn.c_attn.weight", "llama": "model.layers.1.mlp.down_proj.weight"}
    assert adapted_weights[family] in theirs
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=TRAIN_TOL, msg=lambda m, k=key: f"{k}: {m}")
    # in place and back: merge_lora(unwrap=False) then unmerge_lora
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model, unwrap=False)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), adapted, rtol=0, atol=TOL)
    unmerge_lora(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=TRAIN_TOL)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), adapted, rtol=0, atol=TOL)
    merge_lora(model)  # unwrapped: a plain Decoder with DoRA folded in
    with torch.no_grad():  # rtol as above: the floor torch rounds one logit 1.0e-4 off at a magnitude of 0.6
        torch.testing.assert_close(model(IDS), adapted, rtol=1e-4, atol=TOL)


def test_missing_stray_or_misshapen_magnitudes_are_refused(base_dirs, tmp_path):
    model = load_model(base_dirs["gpt2"])
    apply_lora(model, LoRAConfig(use_dora=True))
    adapter = save_adapter(model, tmp_path / "a", base_model_name_or_path="x")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(QatuneError, match=r"h\.0\.attn\.c_attn\.lora_magnitude_vector is a DoRA magnitude but "
                                          "adapter_config.json does not set use_dora"):
        load_model(base_dirs["gpt2"], adapter=adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": "yes"}))
    with pytest.raises(QatuneError, match="field 'use_dora' must be true or false"):
        load_model(base_dirs["gpt2"], adapter=adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    del weights[f"base_model.model.transformer.h.1.attn.c_attn.{MAGNITUDE}"]
    save_file(weights, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(QatuneError, match=r"h\.1\.attn\.c_attn\.lora_magnitude_vector is missing but "
                                          "adapter_config.json says use_dora=true"):
        load_model(base_dirs["gpt2"], adapter=adapter)
    weights[f"base_model.model.transformer.h.1.attn.c_attn.{MAGNITUDE}"] = torch.ones(64)
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(QatuneError, match=r"c_attn\.lora_magnitude_vector: shape \(64,\), model needs \(192,\)"):
        load_model(base_dirs["gpt2"], adapter=adapter)


# ------------------------------------------------------------------------------------------ training parity

PARITY = {
    "gpt2-c_attn": ("gpt2", dict(targets=["c_attn"])),
    "gpt2-q-v-slices": ("gpt2", dict(targets=["q", "v"], r=4)),
    "llama-q_proj-v_proj": ("llama", dict(targets=["q_proj", "v_proj"])),
    "llama-all-linear-rslora": ("llama", dict(targets=["all-linear"], r=4, alpha=8, use_rslora=True)),
}


def _batches(steps: int = 5) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        ids = torch.randint(2, VOCAB, (3, 14), generator=gen)
        labels = ids.clone()
        labels[:, :4] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _train_losses(model: nn.Module, logits_of) -> list[float]:
    """AdamW (lr 1e-2) with qatune's rule: weight decay 0.1 on matrices, none on 1-D tensors (the magnitudes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-2)
    model.train()
    losses = []
    for batch in _batches():
        logits = logits_of(model, batch["input_ids"])
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _restrict_gpt2_slices_in_peft(ref: peft.PeftModel, r: int) -> None:
    """peft holds q+v slices as one c_attn pair and magnitude: its B trains only on the q and v blocks and its
    magnitude only on q and v rows, built here from the model's shape (rows q | k | v, columns A_q | A_v)."""
    d = 64
    b_mask = torch.zeros(3 * d, 2 * r)
    b_mask[:d, :r] = b_mask[2 * d:, r:] = 1
    m_mask = torch.ones(3 * d)
    m_mask[d:2 * d] = 0
    for i in range(2):
        c_attn = ref.get_submodule(f"base_model.model.transformer.h.{i}.attn.c_attn")
        c_attn.lora_B["default"].weight.register_hook(lambda grad: grad * b_mask)
        c_attn.lora_magnitude_vector["default"].weight.register_hook(lambda grad: grad * m_mask)


@pytest.mark.parametrize("case", PARITY.values(), ids=PARITY.keys())
def test_dora_training_matches_peft(base_dirs, tmp_path, case):
    family, lora_kw = case
    model = load_model(base_dirs[family])
    torch.manual_seed(1)
    apply_lora(model, LoRAConfig(dropout=0.0, use_dora=True, **lora_kw))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.normal_(std=0.05)
    start = load_file(save_adapter(model, tmp_path / "start", base_model_name_or_path="x") /
                      "adapter_model.safetensors")
    ref = peft.PeftModel.from_pretrained(_hf(base_dirs[family]), tmp_path / "start", is_trainable=True)
    if lora_kw["targets"] == ["q", "v"]:
        _restrict_gpt2_slices_in_peft(ref, lora_kw["r"])

    ours = _train_losses(model, lambda m, ids: m(ids))
    theirs = _train_losses(ref, lambda m, ids: m(input_ids=ids).logits)

    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=0, atol=TRAIN_TOL)
    assert abs(ours[-1] - ours[0]) > 100 * TRAIN_TOL
    # The trained tensors within 1e-4, not 1e-5: AdamW's step is lr * g / (sqrt(v) + eps), so for an entry whose
    # gradient is near zero the two sides' float noise (peft forms B @ A as B(A(I)).T, qatune as B @ A) becomes a
    # step difference of up to lr * noise / eps; over seeds the largest seen is 4e-5 on one entry of a B.
    trained = load_file(save_adapter(model, tmp_path / "end", base_model_name_or_path="x") /
                        "adapter_model.safetensors")
    expected = {k: v.detach() for k, v in peft.get_peft_model_state_dict(ref).items()}
    assert set(trained) == set(expected) == set(start) and any(k.endswith(MAGNITUDE) for k in expected)
    for key in sorted(expected):
        torch.testing.assert_close(trained[key], expected[key], rtol=0, atol=TOL,
                                   msg=lambda m, k=key: f"{k}: {m}")
        assert (trained[key] - start[key]).abs().max() > 100 * TRAIN_TOL, f"{key} did not train"


# ------------------------------------------------------------------ fast path, bf16 autocast, the CLI's merge


@pytest.mark.parametrize("dtype, rtol", [(None, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_dora_fast_path_follows_the_reference(dtype, rtol):
    """The fast path (`Decoder(fast_path=True)`) against the reference path with DoRA, dropout off, 10 steps."""
    torch.manual_seed(0)
    cfg = from_hf_config(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, resid_pdrop=0.0,
                                                 embd_pdrop=0.0, attn_pdrop=0.0).to_dict())
    reference, fast = Decoder(cfg), Decoder(cfg, fast_path=True)
    reference.init_weights()
    for model in (reference, fast):
        apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0, targets=["c_attn", "down"], use_dora=True))
    fast.load_state_dict(reference.state_dict())
    data = torch.randint(0, 500, (4, 4, 32))
    losses = {}
    for name, model in (("reference", reference), ("fast", fast)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for i in range(10):
            labels = data[i % 4].clone()
            labels[:, :8] = -100
            batch = {"input_ids": data[i % 4], **label_positions(labels)}
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = model_loss(model.train(), batch, chunked=model.fast_path) / batch["loss_targets"].numel()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["reference"][0] - losses["reference"][-1] > 0.05  # it trains
    torch.testing.assert_close(torch.tensor(losses["fast"]), torch.tensor(losses["reference"]), rtol=rtol, atol=0)


def test_a_dora_run_with_fast_path_and_bf16_loads_in_peft_and_merges_from_the_cli(qa_gpt2_dir, tmp_path):
    run = tmp_path / "run"
    train_model(load_config(None, [f"model={qa_gpt2_dir}", "method=lora", "lora.use_dora=true", "lora.r=4",
                                   "data.train=sample", "train.max_steps=3", "train.lr=1e-2", "train.fast_path=true",
                                   "train.precision=bf16", "train.progress=false", f"out={run}"]))
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32} and _magnitude_keys(run / "adapter")
    model, _ = load_for_inference(run)
    assert model.lora_config.use_dora
    _assert_same_logits(model, peft.PeftModel.from_pretrained(_hf(qa_gpt2_dir), run / "adapter").eval())
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    _assert_same_logits(model, _hf(tmp_path / "merged"))


def test_bench_dora_builds_native_and_peft_dora_from_the_same_weights():
    """`qatune bench --methods dora`: the native and the peft model start from the same weights and adapter
    shape: the same loss (a fresh adapter is the base model) and the same trainable parameter count."""
    hf_config = shape_config("tiny", None, 32)
    state = random_native_state(hf_config, torch.device("cpu"), seed=0)
    ids = torch.randint(0, hf_config["vocab_size"], (2, 32))
    batch = {"input_ids": ids, **label_positions(ids)}
    native = build_native(hf_config, state, torch.device("cpu"), "dora").eval()
    hf = build_hf(hf_config, state, torch.device("cpu"), "dora").eval()
    assert native.lora_config.use_dora and hf.model.peft_config["default"].use_dora
    assert count_parameters(native)[0] == count_parameters(hf)[0] > count_parameters(
        build_native(hf_config, state, torch.device("cpu"), "lora"))[0]
    with torch.no_grad():
        torch.testing.assert_close(model_loss(native, batch), model_loss(hf, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_dora_compiled_training_step_matches_eager():
    """`train.compile`: the compiled loss module (`LossModule`, as the recipe wraps it) trains a DoRA adapter as
    eager does, dropout on (the training branch of the DoRA formula), same seed per step; inductor's
    `fallback_random` makes the compiled graph draw eager's dropout masks. About a minute on CPU with a cold
    inductor cache."""
    cfg = from_hf_config(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, resid_pdrop=0.0,
                                                 embd_pdrop=0.0, attn_pdrop=0.0).to_dict())
    torch.manual_seed(0)
    eager = Decoder(cfg)
    eager.init_weights()
    apply_lora(eager, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=["q", "v", "down"], use_dora=True))
    compiled = Decoder(cfg)
    apply_lora(compiled, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=["q", "v", "down"], use_dora=True))
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, **label_positions(ids)}
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        step = LossModule(model.train(), 0.0)
        step = torch.compile(step) if name == "compiled" else step
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for i in range(3):
            torch.manual_seed(10 + i)
            with torch._inductor.config.patch(fallback_random=True):  # torch's own scoped config change
                loss = step(batch) / batch["loss_targets"].numel()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=0, atol=1e-4)
    assert losses["eager"][0] != losses["eager"][-1]


def test_backend_hf_trains_peft_dora(qa_gpt2_dir, tmp_path):
    """`backend=hf` with `lora.use_dora`: peft's DoRA (not plain LoRA) is what trains, and its first step's loss
    is the native backend's (B = 0 and m = ||W||: both are the base model then)."""
    losses = {}
    for backend in ("native", "hf"):
        torch.manual_seed(0)
        out = tmp_path / backend
        train_model(load_config(None, [f"model={qa_gpt2_dir}", "method=lora", "lora.use_dora=true", f"out={out}",
                                       "data.train=sample", "train.max_steps=2", "train.batch_size=4",
                                       "train.progress=false", f"backend={backend}"]))
        losses[backend] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
        assert _magnitude_keys(out / "adapter")
    first = [next(r["loss"] for r in losses[b] if r["event"] == "train") for b in ("native", "hf")]
    assert abs(first[0] - first[1]) <= 1e-4, first


def test_dora_with_a_pissa_or_olora_start_is_refused():
    from qatune.errors import ConfigError
    from qatune.lora.layer import LoRAConfig

    for init in ("pissa", "olora"):
        with pytest.raises(ConfigError, match=f"use_dora=true does not combine with lora.init={init}"):
            LoRAConfig(use_dora=True, init=init)
    assert LoRAConfig(use_dora=True).init == "default"
