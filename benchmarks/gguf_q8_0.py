"""What q8_0 export does to a fine-tuned model's answers, measured once outside CI.

1. Is qatune's q8_0 file what llama.cpp itself makes? The run is exported as f32 and as q8_0; llama.cpp's own
   quantizer (`llama_model_quantize`, through llama-cpp-python) turns the f32 file into q8_0, and every tensor
   of the two q8_0 files is compared byte for byte.
2. Which greedy answers change, and why? For each of the demo's held-out questions (in the run's prompt format),
   the greedy answer (up to the end of turn, at most --new tokens) of the fp32 merged model is compared with
   that of transformers reading the q8_0 file (`gguf_file=`, dequantized to fp32) and of llama.cpp running it.
   Where they differ, the first differing step is reported with the fp32 model's logit margin between its own
   choice and the q8_0 choice there: a small margin means a near-tie that q8_0's rounding error can flip.
3. EM and F1 of the fp32 and q8_0 answers against the gold answers.

Usage: OMP_NUM_THREADS=1 python benchmarks/gguf_q8_0.py --run runs/demo [--json OUT]
(the run is `make demo`'s; needs `pip install llama-cpp-python`)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
from pathlib import Path

import torch
from gguf_parity import llama_greedy  # this folder is on sys.path when the script runs

from qatune.data.prompts import DEFAULT_TEMPLATE, make_prompt_format
from qatune.data.readers import load_examples
from qatune.evaluation.metrics import qa_scores
from qatune.generation.runs import load_for_inference, run_data_section
from qatune.lora.inject import merged_state_dict
from qatune.models.loading import build_model
from qatune.publish.gguf_writer import write_gguf


def same_as_llama_cpp_quantizer(f32_path: Path, ours: Path) -> dict:
    """Quantize the f32 file with llama.cpp's own quantizer and compare every tensor with qatune's q8_0 file."""
    import llama_cpp
    from gguf import GGUFReader

    theirs = ours.with_name("llama-cpp-q8_0.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    if llama_cpp.llama_model_quantize(str(f32_path).encode(), str(theirs).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError("llama_model_quantize failed")
    a = {t.name: t for t in GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in GGUFReader(str(theirs)).tensors}
    differ = sorted(n for n in set(a) | set(b) if n not in a or n not in b or a[n].tensor_type != b[n].tensor_type
                    or a[n].data.tobytes() != b[n].data.tobytes())
    types = sorted({t.tensor_type.name for t in a.values()})
    return {"tensors": len(a), "byte_identical": len(a) - len(differ), "differ": differ, "types": types}


def greedy(logits_of, prompt: list[int], n: int, eos: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(logits_of(torch.tensor([ids]))[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
    return ids[len(prompt):]


def llama_cpp_greedy(path: Path, prompts: list[list[int]], n: int, eos: int) -> list[list[int]]:
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=1, logits_all=True, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    return llama_greedy(llm, prompts, n, eos)


def divergence(merged, prompt: list[int], ref: list[int], got: list[int], eos: int) -> dict:
    """The first step where `got` leaves `ref`, and the fp32 logit margin between the two choices there."""
    ref_t, got_t = ref + [eos], got + [eos]
    step = next(i for i in range(min(len(ref_t), len(got_t))) if ref_t[i] != got_t[i])
    with torch.no_grad():
        logits = merged(torch.tensor([prompt + ref_t[:step]]))[0, -1]
    top2 = logits.topk(2).values
    return {"step": step, "fp32_margin": float(logits[ref_t[step]] - logits[got_t[step]]),
            "fp32_top2_gap": float(top2[0] - top2[1])}


def compare(name: str, merged, prompts, ref, got, tokenizer, golds) -> dict:
    eos = tokenizer.eos_token_id
    diffs = [dict(question=i, **divergence(merged, prompts[i], ref[i], got[i], eos),
                  fp32=tokenizer.decode(ref[i]), q8_0=tokenizer.decode(got[i]))
             for i in range(len(prompts)) if ref[i] != got[i]]
    scores = qa_scores([tokenizer.decode(g).strip() for g in got], golds)
    row = {"answers_equal": len(prompts) - len(diffs), "questions": len(prompts),
           "em": scores["em"], "f1": scores["f1"], "divergences": diffs}
    print(name, json.dumps({k: v for k, v in row.items() if k != "divergences"}), flush=True)
    for d in diffs:
        print("   ", json.dumps(d), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a SmolLM2 LoRA run (make demo's)")
    parser.add_argument("--new", type=int, default=32, help="at most this many greedy tokens per answer")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_for_inference(args.run)
    data = run_data_section(args.run) or {}
    style = make_prompt_format(data.get("prompt_format") or "auto", data.get("template") or DEFAULT_TEMPLATE,
                               tokenizer)
    examples = load_examples("sample-test")
    prompts = [tokenizer(style.prompt(ex), add_special_tokens=False).input_ids for ex in examples]
    golds = [ex.aliases for ex in examples]
    state = merged_state_dict(model)
    merged = build_model(model.config, {k: v for k, v in state.items()
                                        if k != "lm_head.weight" or not model.config.tie_embeddings}).eval()
    eos = tokenizer.eos_token_id
    ref = [greedy(merged, p, args.new, eos) for p in prompts]
    report = {"run": str(args.run), "questions": len(prompts),
              "fp32": qa_scores([tokenizer.decode(r).strip() for r in ref], golds)}
    with tempfile.TemporaryDirectory() as tmp:
        f32 = write_gguf(model.config, state, tokenizer, Path(tmp) / "f32.gguf", out_type="f32")
        q8 = write_gguf(model.config, state, tokenizer, Path(tmp) / "q8_0.gguf", out_type="q8_0")
        report["llama_cpp_quantizer"] = same_as_llama_cpp_quantizer(f32, q8)
        print("llama.cpp quantizer", json.dumps(report["llama_cpp_quantizer"]), flush=True)
        hf = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=q8.name, dtype=torch.float32).eval()
        got = [greedy(lambda ids: hf(ids).logits, p, args.new, eos) for p in prompts]
        report["transformers_q8_0"] = compare("transformers q8_0", merged, prompts, ref, got, tokenizer, golds)
        got = llama_cpp_greedy(q8, prompts, args.new, eos)
        report["llama_cpp_q8_0"] = compare("llama.cpp q8_0", merged, prompts, ref, got, tokenizer, golds)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
