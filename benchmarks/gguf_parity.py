"""GGUF export parity, measured once outside CI: transformers and llama.cpp (llama-cpp-python) against qatune.

For a SmolLM2-135M LoRA run (the demo's recipe, shortened) and a random GPT-2-shaped model with a byte-level BPE
tokenizer trained on the shipped QA facts, every type (f32, f16, bf16, q8_0) is exported and:
- transformers (`gguf_file=`) logits on a few prompts vs the fp32 merged model: max |diff|;
- llama.cpp: the same prompts tokenized identically, last-position logits vs qatune reading the same file, and
  the greedy continuation (N tokens, EOS ignored) of the demo's held-out questions vs qatune's fp32 merged model
  and vs qatune reading the same file (same weights, two engines);
- q8_0 through transformers: greedy answers equal to the fp32 merged model's.

Usage: OMP_NUM_THREADS=1 python benchmarks/gguf_parity.py [--run RUN] [--steps 40] [--new 12] [--json OUT]
(needs `pip install llama-cpp-python`; without it the llama.cpp columns are skipped)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qatune import load_model
from qatune.data.prompts import DEFAULT_TEMPLATE, make_prompt_format
from qatune.data.readers import SAMPLE_DATA, load_examples
from qatune.generation.runs import load_for_inference, run_data_section
from qatune.lora.inject import merged_state_dict
from qatune.models.loading import build_model
from qatune.publish.gguf_writer import GGUF_TYPES, write_gguf
from qatune.training.config import load_config
from qatune.training.recipe import train_model

PROMPTS = ["Question: What is the capital of France?\nAnswer:", "Question: Who wrote Hamlet?\nAnswer:",
           "The quick brown fox jumps over the lazy dog. Numbers: 3.14, 42 and 1999."]


def smollm2_run(path: Path, steps: int) -> Path:
    if not (path / "summary.json").is_file():
        overrides = [f"out={path}", f"train.max_steps={steps}", "train.progress=false", "train.patience=null"]
        train_model(load_config(SAMPLE_DATA / "demo.yaml", overrides))
    return path


def gpt2_model(path: Path) -> Path:
    """A random GPT-2 (1024 positions, as transformers' GGUF loader assumes) with a QA-trained BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    if (path / "config.json").is_file():
        return path
    texts = [f"Question: {ex.question}\nAnswer: {ex.answer}" for ex in load_examples("sample")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(texts + PROMPTS, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=len(tok), bos_token_id=0,
                               eos_token_id=0, initializer_range=0.2)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def cut(tokens: list[int], eos: int | None) -> list[int]:
    """The answer: the greedy tokens up to the first EOS (end of turn)."""
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def agree(a: list[list[int]], b: list[list[int]], eos: int | None) -> dict[str, int]:
    """How many continuations are equal token for token, and how many answers (up to EOS)."""
    pairs = list(zip(a, b))
    return {"tokens": sum(x == y for x, y in pairs), "answers": sum(cut(x, eos) == cut(y, eos) for x, y in pairs)}


def greedy_qatune(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            out.append(ids[len(p):])
    return out


def llama_greedy(llm, prompts: list[list[int]], n: int, eos: int | None = None) -> list[list[int]]:
    """llama.cpp's greedy continuation of each prompt: n tokens, or up to `eos` (not included) when given."""
    out = []
    for p in prompts:
        llm.reset()
        llm.eval(p)
        new = []
        for _ in range(n):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if nxt == eos:
                break
            new.append(nxt)
            llm.eval([nxt])
        out.append(new)
    return out


def llama_cpp_check(path: Path, qatune_file_model, ref_greedy: list[list[int]], tokenizer, prompts: list[list[int]],
                    texts: list[str], n: int) -> dict:
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=1, logits_all=True, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)  # f32 KV cache: compare the weights, not the cache
    same_tokens = all(llm.tokenize(t.encode(), add_bos=False, special=True) == tokenizer(t).input_ids
                      for t in texts)
    diff = 0.0
    for p in prompts[:5]:
        llm.reset()
        llm.eval(p)
        with torch.no_grad():
            ours = qatune_file_model(torch.tensor([p]))[0].numpy()
        diff = max(diff, float(np.abs(np.array(llm.scores[: len(p)]) - ours).max()))
    theirs = llama_greedy(llm, prompts, n)
    vs_file = greedy_qatune(qatune_file_model, prompts, n)
    return {"tokenize_equal": same_tokens, "max_logit_diff_vs_qatune_same_file": diff,
            "greedy_equal_vs_qatune_same_file": agree(theirs, vs_file, tokenizer.eos_token_id),
            "greedy_equal_vs_qatune_fp32_merged": agree(theirs, ref_greedy, tokenizer.eos_token_id),
            "prompts": len(prompts), "example": tokenizer.decode(theirs[0])}


def check(source: Path, out_dir: Path, n_questions: int, n: int) -> dict:
    """Every type of `source`; the questions are put in the prompt format the run was trained with."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_for_inference(source)
    data = run_data_section(source) or {}
    style = make_prompt_format(data.get("prompt_format") or "auto", data.get("template") or DEFAULT_TEMPLATE,
                               tokenizer)
    questions = [style.prompt(ex) for ex in load_examples("sample-test")[:n_questions]]
    state = merged_state_dict(model)
    merged = build_model(model.config, {k: v for k, v in state.items()
                                        if k != "lm_head.weight" or not model.config.tie_embeddings}).eval()
    prompts = [tokenizer(q, add_special_tokens=False).input_ids for q in questions]
    with torch.no_grad():
        ref = [merged(torch.tensor([tokenizer(p).input_ids]))[0] for p in PROMPTS]
    ref_greedy = greedy_qatune(merged, prompts, n)
    results = {}
    for out_type in GGUF_TYPES:
        start = time.perf_counter()
        path = write_gguf(model.config, state, tokenizer, out_dir / f"{source.name}-{out_type}.gguf",
                          out_type=out_type, name=source.name)
        row = {"export_s": time.perf_counter() - start, "bytes": path.stat().st_size}
        hf = AutoModelForCausalLM.from_pretrained(str(out_dir), gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            got = [hf(torch.tensor([tokenizer(p).input_ids])).logits[0] for p in PROMPTS]
        row["transformers_max_logit_diff"] = max((g - r).abs().max().item() for g, r in zip(got, ref))
        row["transformers_greedy_equal_vs_fp32"] = agree(
            greedy_qatune(lambda ids, hf=hf: hf(ids).logits, prompts, n), ref_greedy, tokenizer.eos_token_id)
        try:
            row["llama_cpp"] = llama_cpp_check(path, load_model(path), ref_greedy, tokenizer, prompts,
                                               PROMPTS + questions[:5], n)
        except ImportError as e:
            row["llama_cpp"] = f"skipped: {e}"
        results[out_type] = row
        print(out_type, json.dumps(row), flush=True)
        path.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/gguf-parity", help="SmolLM2 LoRA run (trained here when missing)")
    parser.add_argument("--steps", type=int, default=40, help="training steps when the run is trained here")
    parser.add_argument("--new", type=int, default=12, help="greedy tokens per question")
    parser.add_argument("--questions", type=int, default=20, help="the demo's first N held-out questions")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report["smollm2_lora"] = check(smollm2_run(Path(args.run), args.steps), tmp, args.questions, args.new)
        report["gpt2_shaped"] = check(gpt2_model(tmp / "gpt2"), tmp, args.questions, args.new)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
