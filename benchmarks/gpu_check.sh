#!/usr/bin/env bash
# The GPU half of qatune's benchmark, prepared for a session lent an H200 (device time is short: this script
# keeps itself under BUDGET_S seconds, default 540, so that one call fits in the 10-minute command limit).
#
# It installs nothing: the device machine's python3 holds torch, transformers and peft, and qatune runs from src/
# (PYTHONPATH); set PYTHON for another interpreter. Results: $OUT/gpu_check.log (what is printed) and
# $OUT/gpu_check.tar.gz (every section's JSON and full console output), rewritten after each section so that a
# run stopped at its limit still returns what it finished.
#
# Real data: ../shared does not travel to the device machine. Once, here, before the call:
#   echo /.shared/ >> .git/info/exclude
#   mkdir -p .shared/data .shared/tokenizers && cp -r ../shared/data/triviaqa ../shared/data/e2e .shared/data/ \
#     && cp -r ../shared/tokenizers/gpt2 .shared/tokenizers/
# then run(command="bash benchmarks/gpu_check.sh", carry=[".shared"], timeout_s=600).
#
# Sections, in priority order, with their runtime estimates (guesses for an H200 with 16 cores, not measured:
# process start and imports included, the machine's own start not):
#   env            nvidia-smi, versions                                                          ~10 s
#   sdpa           which attention kernels native and hf run in bf16 (profiler op/kernel names), and
#                  whether the native step runs with SDPA restricted to flash                    ~45 s
#   agreement      fast path vs eager, 50 bf16 training steps, gpt2 full + lora + dora, dropout off ~60 s
#   eager          gpt2, gpt2-medium, gpt2-large x {full, lora} x {native, native-fast, hf}       ~90 s
#   dora           gpt2 x {lora, dora} x {native, native-fast, hf}: native DoRA vs peft's DoRA    ~45 s
#   smollm2        the SmolLM2-135M (Llama) shape, random weights, {full, lora} x {native,
#                  native-fast, hf}, 16 x 512 bf16                                                ~45 s
#   smollm2-agreement  its fast path vs eager, 20 bf16 steps, dropout off                        ~20 s
#   eager-xl-full  gpt2-xl full (own process: 3 full copies + Adam state ~ 75 GiB)                ~60 s
#   eager-xl-lora  gpt2-xl lora                                                                   ~45 s
#   triviaqa       pad-to-longest / dynamic / packing, gpt2 full + lora                           ~60 s
#   compile-gpt2   gpt2 x {full, lora} x {native, hf, hf-compile, native-compile}                 ~180 s
#   e2e            as triviaqa, lora only                                                         ~45 s
#   compile-gpt2-medium, compile-gpt2-large, compile-gpt2-xl                                      ~200-300 s each
# All: about 11 min before the compile runs of the three larger shapes, which do not fit one call. A section
# whose estimate exceeds the time left is skipped (and says so); SECTIONS="compile-gpt2-medium ..." runs only
# the named ones (a second call, if device time is left).
set -u
OUT=${OUT:?set OUT to the folder that comes back}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
SECTIONS=${SECTIONS:-}
SHARED=${SHARED:-$([ -d .shared ] && echo .shared || echo ../shared)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
LOG="$OUT/gpu_check.log"
START=$SECONDS
BENCH=("$PY" -m qatune bench --device cuda --precision bf16 --batch 16 --seq 512 --steps 5 --warmup 2)

section() {  # section NAME ESTIMATE_S COMMAND...
    local name=$1 estimate=$2 left rc t0
    shift 2
    if [ -n "$SECTIONS" ] && [[ " $SECTIONS " != *" $name "* ]]; then return; fi
    left=$((BUDGET_S - (SECONDS - START)))
    if ((left < estimate)); then
        echo "== $name: skipped, ${left}s left for an estimated ${estimate}s" | tee -a "$LOG"
        return
    fi
    echo "== $name (estimated ${estimate}s, ${left}s left)" | tee -a "$LOG"
    t0=$SECONDS
    timeout --signal=INT "$left" "$@" >"$WORK/$name.txt" 2>&1
    rc=$?
    grep -v -e '^building ' -e '^round ' -e 'Warning' -e 'warnings.warn' "$WORK/$name.txt" | tail -n 40 | tee -a "$LOG"
    echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
    tar czf "$OUT/gpu_check.tar.gz" -C "$WORK" .
}

# PYCHECK OUT.json EXPRESSION: evaluate a qatune.bench expression, save its JSON, print the start of it.
PYCHECK=("$PY" -c 'import json, sys; from qatune.bench import *; t = json.dumps(eval(sys.argv[2])); open(sys.argv[1], "w").write(t); print(t[:3000])')

section env 10 bash -c "nvidia-smi; $PY -c 'import torch, transformers, peft; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, torch.cuda.get_device_name())'"
section sdpa 45 "${PYCHECK[@]}" "$WORK/sdpa.json" "sdpa_kernels('cuda', 'bf16')"
section agreement 60 "${PYCHECK[@]}" "$WORK/agreement.json" "fast_path_agreement('gpt2', ('full', 'lora', 'dora'), steps=50, batch=8, seq=512, device='cuda')"
section eager 90 "${BENCH[@]}" --shapes gpt2,gpt2-medium,gpt2-large --methods full,lora --backends native,native-fast,hf --json "$WORK/eager.json"
section dora 45 "${BENCH[@]}" --shapes gpt2 --methods lora,dora --backends native,native-fast,hf --json "$WORK/dora.json"
section smollm2 45 "${BENCH[@]}" --shapes smollm2-135m --methods full,lora --backends native,native-fast,hf --json "$WORK/smollm2.json"
section smollm2-agreement 20 "${PYCHECK[@]}" "$WORK/smollm2-agreement.json" "fast_path_agreement('smollm2-135m', steps=20, batch=8, seq=512, device='cuda')"
section eager-xl-full 60 "${BENCH[@]}" --shapes gpt2-xl --methods full --backends native,native-fast,hf --json "$WORK/eager-xl-full.json"
section eager-xl-lora 45 "${BENCH[@]}" --shapes gpt2-xl --methods lora --backends native,native-fast,hf --json "$WORK/eager-xl-lora.json"
section triviaqa 60 "${BENCH[@]}" --steps 10 --shapes gpt2 --methods full,lora --backends native,native-fast,hf --real-data "$SHARED/data/triviaqa/triviaqa_sm_sub.jsonl" --tokenizer "$SHARED/tokenizers/gpt2" --json "$WORK/triviaqa.json"
section compile-gpt2 180 "${BENCH[@]}" --shapes gpt2 --methods full,lora --backends native,hf,hf-compile,native-compile --json "$WORK/compile-gpt2.json"
section e2e 45 "${BENCH[@]}" --steps 10 --shapes gpt2 --methods lora --backends native,native-fast,hf --real-data "$SHARED/data/e2e/valid.txt" --tokenizer "$SHARED/tokenizers/gpt2" --json "$WORK/e2e.json"
for shape in gpt2-medium gpt2-large gpt2-xl; do
    section "compile-$shape" 240 "${BENCH[@]}" --shapes "$shape" --methods full,lora --backends native,hf,hf-compile,native-compile --json "$WORK/compile-$shape.json"
done
echo "== done in $((SECONDS - START))s; files: $(ls "$WORK" | tr '\n' ' ')" | tee -a "$LOG"
