"""Peak host memory of `qatune.load_model(..., dtype=bf16)` on a random gpt2-xl-sized checkpoint.

The acceptance bar: peak resident memory below 2x the model's bf16 size (no full fp32 copy in RAM).
Usage: python benchmarks/load_memory.py [--shape gpt2-xl] [--dir /tmp/qatune-gpt2-xl]
The checkpoint (fp32 safetensors, as the hub ships GPT-2) is created once in a separate process; the load is
measured in a fresh process so nothing else inflates its peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

SHAPES = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}

CREATE = """
import sys, torch, transformers
cfg = transformers.GPT2Config(**{shape})
torch.manual_seed(0)
transformers.GPT2LMHeadModel(cfg).save_pretrained(sys.argv[1])
"""

MEASURE = """
import json, resource, sys, time, torch
import qatune
t = time.perf_counter()
model = qatune.load_model(sys.argv[1], dtype=torch.bfloat16)
elapsed = time.perf_counter() - t
params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
print(json.dumps({"params": params, "bf16_bytes": params * 2, "load_s": elapsed,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""

BASELINE = """
import json, resource, sys, torch
import qatune
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="gpt2-xl", choices=SHAPES)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    path = Path(args.dir or f"/tmp/qatune-random-{args.shape}")
    if not (path / "config.json").is_file():
        print(f"creating a random {args.shape} checkpoint in {path} ...", flush=True)
        subprocess.run([sys.executable, "-c", CREATE.format(shape=SHAPES[args.shape]), str(path)], check=True)
    base = json.loads(subprocess.run([sys.executable, "-c", BASELINE], check=True, capture_output=True,
                                     text=True).stdout)
    res = json.loads(subprocess.run([sys.executable, "-c", MEASURE, str(path)], check=True, capture_output=True,
                                    text=True).stdout)
    import torch

    res.update(shape=args.shape, interpreter_and_imports_rss_bytes=base["peak_rss_bytes"],
               peak_over_bf16=res["peak_rss_bytes"] / res["bf16_bytes"],
               checkpoint_bytes=sum(f.stat().st_size for f in path.glob("*.safetensors")),
               machine=platform.platform(), python=platform.python_version(), torch=torch.__version__,
               date=str(date.today()))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
