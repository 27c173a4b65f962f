"""PiSSA / OLoRA initialisation (`lora.init`) against peft, and its saved result on the ORIGINAL base model.

The references: peft's own `init_lora_weights="pissa"/"olora"` on the transformers model for A, B and the residual
base; for what peft cannot do (GPT-2 q/v slices of the fused c_attn, and OLoRA on GPT-2's Conv1D, whose stored
`[in, out]` weight peft decomposes into pairs of the wrong shape) peft on an `nn.Linear` holding the same rows;
`PeftModel.from_pretrained` on the untouched base for the saved adapter; transformers alone for `qatune merge`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file

from qatune.errors import ConfigError
from qatune.lora.initial import INITIAL_A, INITIAL_B, restore_initial
from qatune.lora.inject import apply_lora, lora_layers
from qatune.lora.layer import WHOLE, LoRAConfig
from qatune.models.loading import load_base_model
from qatune.models.weights import hf_name_table, qkv_slice
from qatune.publish.merge import merge_run
from qatune.training import checkpoint as ckpt
from qatune.training.config import load_config
from qatune.training.recipe import train_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def qa_llama_dir(tmp_path_factory, qa_tokenizer_dir) -> Path:
    """A small random Llama (grouped-query attention, untied head) with the QA tokenizer beside it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(qa_tokenizer_dir)
    path = tmp_path_factory.mktemp("qa-llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                                   bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    for f in qa_tokenizer_dir.iterdir():
        shutil.copy(f, path)
    return path


def _hf(base: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


def _adapted_modules(model) -> dict[str, tuple[str, str, bool]]:
    """HF module path -> (native module, part, transposed) for every LoRA-adapted HF linear of a native model."""
    layers = lora_layers(model)
    out = {}
    for hf_name, (native, part, transpose) in hf_name_table(model.config).items():
        module = native.removesuffix(".weight")
        if hf_name.endswith(".weight") and module in layers and (part or WHOLE) in layers[module].parts:
            out[hf_name.removesuffix(".weight")] = (module, part or WHOLE, transpose)
    return out


@pytest.mark.parametrize("family, init, targets, rslora", [
    ("llama", "pissa", "all-linear", False),
    ("llama", "olora", "all-linear", False),
    ("llama", "pissa", "q,v", True),
    ("gpt2", "pissa", "all-linear", False),
])
def test_init_matches_peft_and_keeps_the_output(family, init, targets, rslora, tiny_gpt2_dir, tiny_llama_dir):
    """A, B and the residual base weight equal peft's (fp32, 1e-4), and the model computes what the base did."""
    base = tiny_gpt2_dir if family == "gpt2" else tiny_llama_dir
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets.split(","), use_rslora=rslora, init=init)
    model = load_base_model(base)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, config)
    model.eval()
    modules = _adapted_modules(model)
    assert modules

    if family == "gpt2" and Version(peft.__version__) < Version("0.14"):
        pytest.skip("peft 0.13 (the declared floor) decomposes GPT-2's Conv1D weights in stored [in, out] order: "
                    "its pairs have the wrong shape (measured), so there is no reference to compare with")
    hf = _hf(base)
    peft_targets = sorted({m.rpartition(".")[2] for m in modules})
    reference = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=peft_targets, use_rslora=rslora, init_lora_weights=init,
        fan_in_fan_out=family == "gpt2")).eval()
    layers = lora_layers(model)
    for hf_module, (native, part, transpose) in modules.items():
        ref = reference.base_model.model.get_submodule(hf_module)
        layer = layers[native]
        torch.testing.assert_close(layer.lora_A[part], ref.lora_A["default"].weight, rtol=0, atol=ATOL)
        torch.testing.assert_close(layer.lora_B[part], ref.lora_B["default"].weight, rtol=0, atol=ATOL)
        residual = ref.base_layer.weight.t() if transpose else ref.base_layer.weight
        torch.testing.assert_close(layer.base.weight[layer.parts[part].rows], residual, rtol=0, atol=ATOL)
        assert (layer.lora_B[part] != 0).any()  # a decomposition, not a zero B
    # The residual and the pair hold W between them only up to fp32 rounding of W's own size; these checkpoints'
    # large weights (std 0.5) give logits of several units, so the output is compared relative to them too.
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=ATOL, atol=ATOL)
        torch.testing.assert_close(model(ids), reference(input_ids=ids).logits, rtol=ATOL, atol=ATOL)


class _OneLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("targets", [["c_attn"], ["q", "v"]])
def test_gpt2_parts_decompose_their_own_rows_as_peft_does_a_linear(init, targets, tiny_gpt2_dir):
    """GPT-2's fused c_attn: each adapted part (the whole layer, or the q and v row slices) is decomposed like a
    peft `nn.Linear` holding those rows of the `[out, in]` weight; rows without a pair (k) are untouched."""
    model = load_base_model(tiny_gpt2_dir)
    original = model.blocks[0].attn.qkv.weight.detach().clone()
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets, init=init))
    layer = lora_layers(model)["blocks.0.attn.qkv"]
    cfg = model.config
    for part_name, part in layer.parts.items():
        rows = part.rows if part_name == WHOLE else qkv_slice(cfg, part_name)
        reference = peft.get_peft_model(_OneLinear(original[rows]), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=init))
        ref = reference.base_model.model.proj
        torch.testing.assert_close(layer.lora_A[part_name], ref.lora_A["default"].weight, rtol=0, atol=ATOL)
        torch.testing.assert_close(layer.lora_B[part_name], ref.lora_B["default"].weight, rtol=0, atol=ATOL)
        torch.testing.assert_close(layer.base.weight[rows], ref.base_layer.weight, rtol=0, atol=ATOL)
    if targets == ["q", "v"]:
        k_rows = qkv_slice(cfg, "k")
        assert torch.equal(layer.base.weight[k_rows], original[k_rows])


def test_a_rank_above_the_layer_rank_is_refused(tiny_gpt2_dir):
    model = load_base_model(tiny_gpt2_dir)
    with pytest.raises(ConfigError, match=r"lora.r=65 is above the rank of blocks.0.attn.qkv"):
        apply_lora(model, LoRAConfig(r=65, targets=["q"], init="pissa"))


def test_a_checkpoints_initial_pair_rebuilds_the_residual(tiny_llama_dir):
    """A resume on a machine whose decomposition differs takes the checkpoint's (A0, B0): the residual becomes
    original - scaling * B0 @ A0 (the original weight recomputed from this machine's pair, float rounding)."""
    model = load_base_model(tiny_llama_dir)
    original = model.blocks[0].attn.qkv.weight.detach().clone()
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["q"], init="pissa"))
    layers = lora_layers(model)
    layer = layers["blocks.0.attn.qkv"]
    saved = {}
    for name, lay in layers.items():
        for part, (a0, b0) in lay.initial.items():
            saved[f"{name}.{INITIAL_A}.{part}"] = a0 * 1.5 if name == "blocks.0.attn.qkv" else a0
            saved[f"{name}.{INITIAL_B}.{part}"] = b0
    notes = restore_initial(layers, saved, "ckpt")
    assert len(notes) == 1 and "blocks.0.attn.qkv.q" in notes[0]
    rows = layer.parts["q"].rows
    a0, b0 = saved[f"blocks.0.attn.qkv.{INITIAL_A}.q"], saved[f"blocks.0.attn.qkv.{INITIAL_B}.q"]
    torch.testing.assert_close(layer.base.weight[rows], original[rows] - layer.scaling("q") * b0 @ a0,
                               rtol=0, atol=1e-5)
    assert torch.equal(layer.initial["q"][0], a0)
    assert restore_initial(layers, saved, "ckpt") == []  # now the same: nothing to rebuild
    with pytest.raises(Exception, match="missing"):
        restore_initial(layers, {}, "ckpt")


def _train(base: Path, out: Path, *extra: str) -> dict:
    return train_model(load_config(None, [
        f"model={base}", "method=lora", "data.train=sample", "train.batch_size=4", "train.lr=1e-2",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "train.progress=false", f"out={out}", *extra]))


def _trained_qatune_model(run: Path, base: Path, config: LoRAConfig) -> torch.nn.Module:
    """The model as qatune trained it (residual base + trained A, B from the result's checkpoint), rebuilt
    without the saved adapter."""
    model = load_base_model(base)
    apply_lora(model, config)
    best = ckpt.latest(run / "checkpoints", "best")
    ckpt.load_trainable(model, ckpt.load_weights(best), str(best))
    return model.eval()


@pytest.mark.parametrize("family, init, rslora, targets", [
    ("gpt2", "pissa", False, ["c_attn"]),
    ("gpt2", "olora", True, ["q", "v"]),  # slices: exported as one c_attn pair of rank 2 x 2r
    ("llama", "pissa", True, ["q", "v", "down"]),
    ("llama", "olora", False, ["q", "v", "down"]),
])
def test_a_pissa_run_saves_an_adapter_for_the_original_base(family, init, rslora, targets, qa_gpt2_dir,
                                                            qa_llama_dir, tmp_path):
    """peft applies the saved adapter (plain LoRA, rank 2r) to the UNTOUCHED base and computes qatune's trained
    logits; `qatune merge` gives the same function as a standalone model."""
    base = qa_gpt2_dir if family == "gpt2" else qa_llama_dir
    run = tmp_path / "run"
    _train(base, run, "train.max_steps=4", f"lora.init={init}", f"lora.use_rslora={str(rslora).lower()}",
           f"lora.targets=[{','.join(targets)}]")
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets, use_rslora=rslora, init=init)
    ours = _trained_qatune_model(run, base, config)
    ids = _ids(ours.config.vocab_size)

    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    slices = 2 if targets == ["q", "v"] else 1  # GPT-2's q and v slices: one c_attn pair of n x (2r)
    assert adapter_config["r"] == 8 * slices and adapter_config["init_lora_weights"] is True
    growth = 2 * slices  # the rank's: the scaling alpha/r (alpha/sqrt(r) with rslora) must not change
    assert adapter_config["lora_alpha"] == pytest.approx(8 * (growth ** 0.5 if rslora else growth))
    reference = peft.PeftModel.from_pretrained(_hf(base), run / "adapter").eval()
    with torch.no_grad():
        logits = ours(ids)
        torch.testing.assert_close(reference(input_ids=ids).logits, logits, rtol=0, atol=ATOL)
        assert (logits - _hf(base)(input_ids=ids).logits).abs().max() > 1e-2  # training changed the function
    merge_run(run, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=0, atol=ATOL)


def test_a_resumed_pissa_run_is_exact_and_its_checkpoints_keep_the_initial_pairs(qa_gpt2_dir, tmp_path):
    """4 steps straight = 2 steps, then resume to 4: the same adapter, bit for bit. Every checkpoint holds the
    starting (A0, B0), equal to what the run started from."""
    common = ("lora.init=pissa", "lora.targets=[q,v]", "train.schedule=constant", "train.save_every=2",
              "train.eval_every=100")
    _train(qa_gpt2_dir, tmp_path / "straight", "train.max_steps=4", *common)
    _train(qa_gpt2_dir, tmp_path / "resumed", "train.max_steps=2", *common)
    first = load_file(tmp_path / "resumed" / "checkpoints" / "step-000002" / "weights.safetensors")
    _train(qa_gpt2_dir, tmp_path / "resumed", "train.max_steps=4", "resume=true", *common)
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key

    model = load_base_model(qa_gpt2_dir)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["q", "v"], init="pissa"))
    initial = {k: v for k, v in first.items() if INITIAL_A in k or INITIAL_B in k}
    assert len(initial) == 2 * 2 * model.config.n_layer  # A0 and B0 of q and v in each block
    for name, layer in lora_layers(model).items():
        for part, (a0, b0) in layer.initial.items():
            assert torch.equal(initial[f"{name}.{INITIAL_A}.{part}"], a0)
            assert torch.equal(initial[f"{name}.{INITIAL_B}.{part}"], b0)


def test_pissa_with_backend_hf_is_refused():
    cfg = load_config(None, ["data.train=sample", "backend=hf", "lora.init=pissa"])
    with pytest.raises(ConfigError, match="lora.init=pissa needs backend=native"):
        cfg.resolved()
    with pytest.raises(ConfigError, match="lora.init"):
        load_config(None, ["lora.init=loftq"])
