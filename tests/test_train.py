"""Training pipeline: exact resume after SIGKILL, early stopping, packing, DDP equivalence, hf vs native."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from qatune import load_model
from qatune.data.batching import batches, count_tokens, encode_dataset, to_device
from qatune.data.prompts import PromptTemplate
from qatune.data.readers import SAMPLE_DATA, load_examples
from qatune.evaluation.loss import model_loss
from qatune.training.checkpoint import load_checkpoint
from qatune.training.config import load_config
from qatune.training.recipe import train_model

CPU = torch.device("cpu")


def _train_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def tiny_dropout_model_dir(tmp_path_factory, qa_gpt2_dir):
    """`qa_gpt2_dir` with GPT-2's default dropout 0.1: exact resume must restore the RNG that draws the masks."""
    path = tmp_path_factory.mktemp("tiny-gpt2-dropout")
    shutil.copytree(qa_gpt2_dir, path, dirs_exist_ok=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "train"}


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "qatune", "train", *args]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_exact_resume_after_sigkill(tiny_dropout_model_dir, tmp_path, method):
    common = [f"model={tiny_dropout_model_dir}", f"method={method}", "data.train=sample", "train.epochs=3",
              "train.batch_size=4", "train.save_every=5", "train.eval_every=25", "train.progress=false",
              "train.lr=1e-3", "lora.dropout=0.1"]
    full = tmp_path / "uninterrupted"
    subprocess.run(_cli(common + [f"out={full}"]), check=True, env=_train_env(), capture_output=True)
    reference = _losses(full)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(common + [f"out={run}"]), env=_train_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-000010").is_dir():  # wait for the checkpoint at step k=10
        assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint at step 10"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_losses(run))
    assert killed_at < max(reference), "the kill came too late to test anything"

    subprocess.run(_cli(common + [f"out={run}", "resume=true"]), check=True, env=_train_env(), capture_output=True)
    resumed = _losses(run)
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert abs(resumed[step] - loss) <= 1e-6, (step, resumed[step], loss)


def test_early_stopping_stops_where_patience_says_and_keeps_best(qa_gpt2_dir, tmp_path):
    # A learning rate far too high makes validation loss rise after the first evaluations.
    cfg = load_config(None, [f"model={qa_gpt2_dir}", "method=full", "data.train=sample", "train.epochs=50",
                             "train.batch_size=8", "train.lr=0.05", "train.schedule=constant", "train.eval_every=3",
                             "train.patience=2", "train.progress=false", f"out={tmp_path}"])
    summary = train_model(cfg)
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["event"] == "eval"]
    # Replay the rule independently: stop at the first evaluation that makes `patience` evaluations in a row
    # without a new best.
    best, bad, expected_stop, best_step = float("inf"), 0, None, None
    for r in evals:
        if r["val_loss"] < best:
            best, bad, best_step = r["val_loss"], 0, r["step"]
        else:
            bad += 1
            if bad >= 2:
                expected_stop = r["step"]
                break
    assert expected_stop is not None and summary["early_stopped"]
    assert summary["steps"] == expected_stop == evals[-1]["step"]
    assert summary["best_step"] == best_step and summary["best_val_loss"] == best
    best_dir = (tmp_path / "checkpoints" / "best").resolve()
    assert best_dir.name == f"step-{best_step:06d}"
    # The result is the best model, not the last one.
    result = load_file(tmp_path / "model" / "model.safetensors")
    kept = load_file(best_dir / "weights.safetensors")
    assert torch.equal(result["transformer.h.0.mlp.c_fc.weight"], kept["blocks.0.mlp.up.weight"].t())


def test_packed_and_unpacked_losses_are_equal(qa_gpt2_dir):
    model = load_model(qa_gpt2_dir)
    from qatune import load_tokenizer

    tok = load_tokenizer(qa_gpt2_dir)
    examples = load_examples(SAMPLE_DATA / "facts_train.jsonl")[:24]
    for answer_only in (True, False):
        feats = encode_dataset(tok, examples, PromptTemplate(), 128, answer_only=answer_only)
        padded = next(batches(feats, 24, pad_id=tok.pad_token_id, shuffle=False))
        packed = next(batches(feats, 24, pad_id=tok.pad_token_id, shuffle=False, packing=True, max_length=128))
        assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # really packed
        with torch.no_grad():
            na, nb = count_tokens(padded).label_tokens, count_tokens(packed).label_tokens
            a, b = model_loss(model, to_device(padded, CPU)) / na, model_loss(model, to_device(packed, CPU)) / nb
        assert na == nb and abs(a.item() - b.item()) <= 1e-5


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(qa_gpt2_dir, tmp_path, mode):
    """2 gloo processes x batch 4 == 1 process x batch 4 x grad_accum 2 (same global batch of 8)."""
    common = [f"model={qa_gpt2_dir}", "method=full", "data.train=sample", "train.max_steps=6",
              "train.epochs=1", "train.progress=false", "train.lr=1e-3", "train.eval_every=3"]
    one = tmp_path / "one"
    subprocess.run(_cli(common + ["train.batch_size=4", "train.grad_accum=2", f"out={one}"]),
                   check=True, env=_train_env(), capture_output=True)
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                "-m", "qatune", "train"]
    res = subprocess.run(torchrun + common + ["train.batch_size=4", f"train.fsdp={mode == 'fsdp'}", f"out={two}"],
                         env=_train_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(one / "model" / "model.safetensors")
    b = load_file(two / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    # FSDP reduce-scatters in another order than one process sums: float rounding only.
    tol = 1e-6 if mode == "ddp" else 1e-5
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=lambda m, k=k: f"{k}: {m}")
    la, lb = _losses(one), _losses(two)
    assert la.keys() == lb.keys() and all(abs(la[s] - lb[s]) <= tol for s in la)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("method", ["full", "lora"])
def test_hf_backend_and_native_backend_give_the_same_losses(qa_gpt2_dir, tmp_path, method):
    common = [f"model={qa_gpt2_dir}", f"method={method}", "data.train=sample", "train.max_steps=5",
              "train.progress=false", "train.lr=1e-3", "train.batch_size=4", "lora.dropout=0.0"]
    runs = {}
    for backend in ("native", "hf"):
        torch.manual_seed(0)
        train_model(load_config(None, common + [f"backend={backend}", f"out={tmp_path / backend}"]))
        runs[backend] = _losses(tmp_path / backend)
    # LoRA's A matrices are random and the two backends draw them differently, so LoRA runs agree exactly
    # on the first step (B = 0: the base model's loss) and full fine-tuning on every step.
    steps = [1] if method == "lora" else sorted(runs["native"])
    for s in steps:
        assert abs(runs["native"][s] - runs["hf"][s]) <= 1e-4, (s, runs["native"][s], runs["hf"][s])


def test_malformed_jsonl_fails_with_file_and_line(tmp_path, qa_gpt2_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": \n')
    res = subprocess.run(_cli([f"model={qa_gpt2_dir}", f"data.train={bad}", f"out={tmp_path / 'o'}"]),
                         capture_output=True, text=True, env=_train_env())
    assert res.returncode == 2 and f"{bad}:2" in res.stderr
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "a?", "reply": "b"}\n')
    res = subprocess.run(_cli([f"model={qa_gpt2_dir}", f"data.train={missing}", f"out={tmp_path / 'o'}"]),
                         capture_output=True, text=True, env=_train_env())
    assert res.returncode == 2 and "answer" in res.stderr and f"{missing}:1" in res.stderr


def test_config_errors_name_the_key(tmp_path):
    from qatune import QatuneError

    with pytest.raises(QatuneError, match="did you mean train.lr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(QatuneError, match="train.batch_size must be int"):
        load_config(None, ["train.batch_size=eight"])
    cfg = load_config(None, ["data.train=x.jsonl", "method=lora"]).resolved()
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (25, 8, 5e-4)
    cfg = load_config(None, ["data.train=x.jsonl", "method=full"]).resolved()
    assert (cfg.train.epochs, cfg.train.batch_size) == (40, 16)
    with pytest.raises(QatuneError, match="method must be one of lora, full"):
        load_config(None, ["data.train=x", "method=qlora"]).resolved()
    presets = Path(__file__).resolve().parents[1] / "configs"
    for preset in presets.glob("*.yaml"):
        load_config(preset).resolved()  # every shipped preset is valid


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_learns(qa_gpt2_dir, tmp_path, precision):
    """bf16 autocast, and fp16 autocast with a gradient scaler (CPU autocast here; CUDA in the GPU check)."""
    cfg = load_config(None, [f"model={qa_gpt2_dir}", "method=full", "data.train=sample", "train.max_steps=12",
                             "train.batch_size=8", "train.lr=1e-3", f"train.precision={precision}",
                             "train.progress=false", f"out={tmp_path}"])
    train_model(cfg)
    losses = _losses(tmp_path)
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[12] < losses[1]
    state = load_checkpoint(tmp_path / "checkpoints" / "last")[1]
    assert state["scaler"] if precision == "fp16" else not state["scaler"]  # the scaler's state only when used


def test_fp16_overflow_steps_are_skipped_counted_and_logged(qa_gpt2_dir, tmp_path, monkeypatch, caplog):
    """A loss scale so large that every scaled gradient overflows: the scaler skips each step (the weights stay as
    they were) and the run says so, counts them in metrics.jsonl and summary.json."""
    real_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **kw: real_scaler(*a, init_scale=2.0**120, **kw))
    cfg = load_config(None, [f"model={qa_gpt2_dir}", "method=lora", "data.train=sample", "train.max_steps=3",
                             "train.batch_size=4", "train.precision=fp16", "train.progress=false",
                             f"out={tmp_path}"])
    with caplog.at_level(logging.INFO, logger="qatune"):
        summary = train_model(cfg)
    assert summary["skipped_steps"] == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if r["event"] == "train"] == [1, 2, 3]
    lora_b = [v for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(not v.any() for v in lora_b)  # B starts at zero and no step changed it
    assert "fp16 gradient overflow" in caplog.text


def test_tensorboard_logs_the_same_events(qa_gpt2_dir, tmp_path):
    pytest.importorskip("tensorboard")  # an optional extra (`qatune[tensorboard]`)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, [f"model={qa_gpt2_dir}", "method=lora", "data.train=sample", "train.max_steps=4",
                             "train.tensorboard=true", "train.progress=false", f"out={tmp_path}"])
    train_model(cfg)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in _losses(tmp_path).items()] == logged


def test_base_dtype_bf16_keeps_lora_weights_fp32(qa_gpt2_dir, tmp_path):
    from safetensors.torch import load_file as load

    cfg = load_config(None, [f"model={qa_gpt2_dir}", "method=lora", "data.train=sample", "train.max_steps=3",
                             "train.base_dtype=bf16", "train.progress=false", f"out={tmp_path}"])
    train_model(cfg)
    adapter = load(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}


def test_a_lora_run_answers_and_merges_from_the_cli(qa_gpt2_dir, tmp_path, capsys):
    """The run directory is what users hand to `qatune ask` and `qatune merge`; the merged checkpoint loads in
    transformers alone and computes what the run's base + adapter computes."""
    from qatune.cli.commands import main
    from qatune.generation.runs import load_for_inference

    run = tmp_path / "run"
    train_model(load_config(None, [f"model={qa_gpt2_dir}", "method=lora", "data.train=sample", "train.max_steps=3",
                                   "lora.r=4", "train.lr=1e-2", "train.progress=false", f"out={run}"]))
    assert main(["ask", str(run), "What is the capital of France?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()  # a (random model's) answer was printed
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    model, _ = load_for_inference(run)
    ids = torch.randint(0, merged.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids), rtol=0, atol=1e-4)


def test_the_documented_keys_exist():
    """The keys the issue names, with these names: accepted by the parser and listed in `train --help`."""
    from qatune.training.config import describe_keys

    keys = ["model", "method", "backend", "data.train", "data.val", "lora.r", "lora.alpha", "lora.dropout",
            "lora.targets", "train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum", "train.lr",
            "train.weight_decay", "train.warmup_steps", "train.schedule", "train.precision", "train.seed",
            "train.eval_every", "train.save_every", "train.patience", "train.packing", "out", "resume"]
    listed = {line.split(" = ")[0].strip() for line in describe_keys().splitlines()}
    assert set(keys) <= listed
    values = {"method": "full", "backend": "hf", "lora.targets": "q,v", "train.schedule": "linear",
              "train.precision": "bf16", "train.packing": "true", "resume": "true", "lora.dropout": "0.05",
              "lora.alpha": "32", "train.lr": "1e-4", "train.weight_decay": "0.1"}
    cfg = load_config(None, [f"{k}={values.get(k, '3' if k.startswith(('train', 'lora')) else 'x')}" for k in keys])
    cfg = cfg.resolved()
    assert cfg.lora.targets == ["q", "v"] and cfg.train.packing is True and cfg.train.epochs == 3


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_resume_continues_the_same_run(qa_gpt2_dir, tmp_path, mode):
    """2 processes stop at step 3 and resume to step 6 (constant lr, so the step budget does not reshape the
    schedule): the losses are those of one process with the same global batch running 6 steps straight."""
    common = [f"model={qa_gpt2_dir}", "method=full", "data.train=sample", "train.epochs=1", "train.progress=false",
              "train.lr=1e-3", "train.schedule=constant", "train.save_every=3", "train.eval_every=100"]
    one = tmp_path / "one"
    subprocess.run(_cli(common + ["train.max_steps=6", "train.batch_size=4", "train.grad_accum=2", f"out={one}"]),
                   check=True, env=_train_env(), capture_output=True)
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
                "-m", "qatune", "train", *common, "train.batch_size=4", f"train.fsdp={mode == 'fsdp'}", f"out={two}"]
    for extra in (["train.max_steps=3"], ["train.max_steps=6", "resume=true"]):
        res = subprocess.run(torchrun + extra, env=_train_env(), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("Resumed from") == 1  # rank 0 only: the recipe silences the other ranks
    la, lb = _losses(one), _losses(two)
    assert sorted(lb) == list(range(1, 7))
    assert all(abs(la[s] - lb[s]) <= 1e-5 for s in la), (la, lb)


def test_hf_backend_names_targets_as_the_native_lora_does(tiny_gpt2_dir, tiny_llama_dir):
    """backend=hf reads the same target table as native LoRA, translated to peft's module names."""
    from qatune import QatuneError
    from qatune.training.hf_backend import _peft_targets

    gpt2 = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    llama = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert _peft_targets(gpt2, None) is None and _peft_targets(gpt2, ["all-linear"]) == "all-linear"
    assert _peft_targets(gpt2, ["qkv"]) == ["c_attn"]
    assert _peft_targets(gpt2, ["o", "up", "down"]) == ["c_fc", "c_proj"]
    assert _peft_targets(llama, ["q", "v"]) == ["q_proj", "v_proj"]
    assert _peft_targets(llama, ["gate", "down_proj"]) == ["down_proj", "gate_proj"]
    with pytest.raises(QatuneError, match="slices of GPT-2's fused c_attn"):
        _peft_targets(gpt2, ["q", "v"])
    with pytest.raises(QatuneError, match="unknown LoRA target"):
        _peft_targets(llama, ["c_attn"])
