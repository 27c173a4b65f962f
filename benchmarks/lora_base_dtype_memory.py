"""Memory saved by holding LoRA's frozen base in bf16 (LoRA weights and AdamW state stay fp32).

Trains a few LoRA steps (r=8 on c_attn, batch 4 x 128 tokens) on a random gpt2-shaped model with the base in
fp32 and then in bf16, each in a fresh process, and reports the weights' bytes and the process's peak RSS.
On CUDA the same comparison is `peak_memory_bytes` in summary.json of two runs differing in
`train.base_dtype`. Usage: python benchmarks/lora_base_dtype_memory.py [--shape gpt2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import date

RUN = """
import json, resource, sys, torch, transformers
from qatune.data.batching import label_positions
from qatune.evaluation.loss import model_loss
from qatune.models.decoder import Decoder
from qatune.models.config import from_hf_config
from qatune.lora import LoRAConfig, apply_lora, count_parameters
shape, base_dtype, steps = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[base_dtype]
cfg = from_hf_config(transformers.GPT2Config(**shape).to_dict())
torch.manual_seed(0)
model = Decoder(cfg)
model.init_weights()
model.to(dtype)
apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.1, targets=["c_attn"]))
for p in model.parameters():
    if p.requires_grad:
        p.data = p.data.float()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.01)
ids = torch.randint(0, cfg.vocab_size, (4, 128))
batch = {"input_ids": ids, **label_positions(ids)}
model.train()
for _ in range(steps):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model_loss(model, batch) / batch["loss_targets"].numel()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
print(json.dumps({"base_dtype": base_dtype, "weight_bytes": weights, "optimizer_state_bytes": state,
                  "trainable": count_parameters(model)[0],
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    shape = dict(n_embd=768, n_layer=12, n_head=12)  # gpt2 (124M)
    rows = [json.loads(subprocess.run([sys.executable, "-c", RUN, json.dumps(shape), d, str(args.steps)],
                                      check=True, capture_output=True, text=True).stdout) for d in ("fp32", "bf16")]
    import torch

    fp32, bf16 = rows
    print(json.dumps({"shape": "gpt2", "runs": rows,
                      "weights_saved_bytes": fp32["weight_bytes"] - bf16["weight_bytes"],
                      "peak_rss_saved_bytes": fp32["peak_rss_bytes"] - bf16["peak_rss_bytes"],
                      "machine": platform.platform(), "torch": torch.__version__, "date": str(date.today())},
                     indent=2))


if __name__ == "__main__":
    main()
