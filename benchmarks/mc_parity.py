"""Multiple choice on a real checkpoint: qatune's scorer against an independent transformers computation.

For the first N items of each file, every choice's summed log-probability is computed twice:
- qatune: `score_multiple_choice` on `qatune.load_model` (shared context through a KV cache, batched, the LM
  head only on continuation tokens);
- transformers: `AutoModelForCausalLM` (from the GGUF for smollm2-135m), one full sequence per choice, no
  padding, no cache: log_softmax over the logits, gather of the continuation tokens, sum.
Both tokenize as lm-eval-harness's `_encode_pair` (trailing whitespace of the context moves onto the choice;
no special tokens). Prints the largest log-probability difference and how many per-item predictions (acc,
acc_norm) agree.

Usage: OMP_NUM_THREADS=1 python benchmarks/mc_parity.py [--model smollm2-135m] [--n 200] [FILE ...]
(default files: ../shared/data/mc/arc_easy.jsonl and piqa.jsonl)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from qatune.evaluation.multiple_choice import DEFAULT_DELIMITER, load_mc, score_multiple_choice
from qatune.generation.runs import load_for_inference
from qatune.models.loading import resolve_source

SHARED_MC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mc"


def load_reference(model: str):
    """The transformers model and tokenizer for `model`, loaded by transformers itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_source(model)
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), **kwargs)
    hf = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=torch.float32, **kwargs).eval()
    return hf, tokenizer


def reference_logprobs(hf, tokenizer, items, delimiter: str = DEFAULT_DELIMITER) -> list[list[float]]:
    """One full sequence per choice through transformers; summed log-probabilities of the choice's tokens."""
    out = []
    for item in items:
        context = item.query + delimiter
        stripped = context.rstrip()
        moved = context[len(stripped):]
        ctx_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
        sums = []
        for choice in item.choices:
            cont_ids = tokenizer(stripped + moved + choice, add_special_tokens=False)["input_ids"][len(ctx_ids):]
            ids = torch.tensor([(ctx_ids + cont_ids)[:-1]])
            with torch.inference_mode():
                logp = hf(ids).logits[0].float().log_softmax(-1)
            sums.append(float(logp[len(ctx_ids) - 1:].gather(1, torch.tensor(cont_ids)[:, None]).sum()))
        out.append(sums)
    return out


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def compare(name: str, items, rows, reference) -> None:
    diffs = [abs(a - b) for row, ref in zip(rows, reference) for a, b in zip(row["logprobs"], ref)]
    ref_acc = [argmax(ref) for ref in reference]
    ref_norm = [argmax([lp / len(c.encode("utf-8")) for lp, c in zip(ref, it.choices)])
                for ref, it in zip(reference, items)]
    same_acc = sum(r["pred_acc"] == p for r, p in zip(rows, ref_acc))
    same_norm = sum(r["pred_norm"] == p for r, p in zip(rows, ref_norm))
    n = len(items)
    print(f"{name}: {n} items, {len(diffs)} choices; max |logprob qatune - transformers| = {max(diffs):.2e} "
          f"(mean {sum(diffs) / len(diffs):.2e})")
    print(f"  identical predictions: acc {same_acc}/{n}, acc_norm {same_norm}/{n}")
    print(f"  acc      qatune {sum(r['correct_acc'] for r in rows) / n:.4f}  "
          f"transformers {sum(p == it.gold for p, it in zip(ref_acc, items)) / n:.4f}")
    print(f"  acc_norm qatune {sum(r['correct_norm'] for r in rows) / n:.4f}  "
          f"transformers {sum(p == it.gold for p, it in zip(ref_norm, items)) / n:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", default=[str(SHARED_MC / "arc_easy.jsonl"), str(SHARED_MC / "piqa.jsonl")])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=200, help="first N items of each file")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_for_inference(args.model)
    hf, hf_tokenizer = load_reference(args.model)
    print(f"model {args.model}; torch threads {torch.get_num_threads()}")
    for path in args.files:
        items = load_mc(path, max_examples=args.n)
        t0 = time.perf_counter()
        rows = score_multiple_choice(model, tokenizer, items)
        t1 = time.perf_counter()
        reference = reference_logprobs(hf, hf_tokenizer, items)
        t2 = time.perf_counter()
        compare(Path(path).name, items, rows, reference)
        print(f"  time: qatune {t1 - t0:.1f} s, transformers (one sequence at a time) {t2 - t1:.1f} s")


if __name__ == "__main__":
    main()
