"""The training recipe's parts on their own: the state, the schedule, the optimizer groups, one step, and a
checkpoint round trip through `setup` without running the loop."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch
from torch import nn

from qatune.data.batching import collate_plan
from qatune.training.config import load_config
from qatune.training.optim import lr_factor, make_optimizer
from qatune.training.recipe import save_checkpoint, setup, train_step
from qatune.training.state import TrainState


def test_train_state_round_trip_keeps_the_persisted_fields_only():
    state = TrainState(step=7, epoch=1, micro_in_epoch=3, best_metric=1.5, best_step=5, bad_evals=1, tokens_seen=99,
                       train_time=12.5, history=[{"step": 5, "val_loss": 1.5}])
    saved = json.loads(json.dumps(state.to_dict()))  # plain JSON: nothing to unpickle
    assert "session_start" not in saved and "window_tokens" not in saved
    back = TrainState.from_dict(saved)
    assert back.to_dict() == state.to_dict()
    assert back.time_before == 12.5 and back.elapsed() >= 12.5  # wall time adds up over sessions
    saved["history"][0]["step"] = 6
    assert state.history[0]["step"] == 5  # the checkpoint holds a copy, not the live list


def test_record_eval_tracks_the_best_and_counts_patience():
    state = TrainState()
    outcomes = [state.record_eval(v, higher_is_better=False, min_delta=0.1) for v in (2.0, 1.95, 1.5, float("nan"))]
    assert outcomes == [True, False, True, False]  # 1.95 is within min_delta; NaN is never an improvement
    assert (state.best_metric, state.bad_evals) == (1.5, 1)
    assert state.record_eval(None, higher_is_better=False, min_delta=0) is False and state.bad_evals == 1
    f1 = TrainState()
    assert [f1.record_eval(v, higher_is_better=True, min_delta=0) for v in (10.0, 12.0, 11.0)] == [True, True, False]


def test_lr_factor_matches_hand_computed_values():
    cosine = lr_factor("cosine", warmup_steps=2, min_lr_ratio=0.1, total_steps=10)
    # warm-up: (step + 1) / 2; then progress = (step - 2) / 8 and factor = 0.1 + 0.9 * (1 + cos(pi * progress)) / 2
    assert [cosine(0), cosine(1), cosine(2)] == [0.5, 1.0, 1.0]
    assert cosine(6) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine(10) == pytest.approx(0.1) and cosine(50) == pytest.approx(0.1)
    linear = lr_factor("linear", warmup_steps=0, min_lr_ratio=0.0, total_steps=4)
    assert [linear(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_factor("constant", warmup_steps=0, min_lr_ratio=0.0, total_steps=4)(3) == 1.0
    assert math.isclose(cosine(4), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_weight_decay_applies_to_trainable_matrices_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.01, device=torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])] and decay["weight_decay"] == 0.01
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0  # biases, norm weight and bias


def _config(model_dir, out, *extra):
    return load_config(None, [f"model={model_dir}", "data.train=sample", f"out={out}", "train.progress=false",
                              "train.epochs=1", *extra]).resolved()


def _first_step_batches(recipe):
    plan = recipe.epoch_plan(0)
    micro = collate_plan(recipe.data.train, plan, pad_id=recipe.data.pad_id, packing=False)
    return list(itertools.islice(micro, recipe.plan.micro_per_step))


def test_gradient_accumulation_is_one_step_over_the_same_rows(qa_gpt2_dir, tmp_path):
    """One step of 2 micro-batches x 2 rows changes the weights exactly as one micro-batch of those 4 rows: the
    loss is normalised by the step's token count, not per micro-batch."""
    weights = {}
    for name, extra in (("accum", ["train.batch_size=2", "train.grad_accum=2"]), ("whole", ["train.batch_size=4"])):
        recipe, state = setup(_config(qa_gpt2_dir, tmp_path / name, "method=full", *extra))
        batches = _first_step_batches(recipe)
        assert sum(len(b["input_ids"]) for b in batches) == 4
        train_step(recipe, state, batches)
        assert (state.step, state.micro_in_epoch) == (1, len(batches))
        weights[name] = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    for n, w in weights["whole"].items():
        torch.testing.assert_close(weights["accum"][n], w, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_restores_every_part_without_running_the_loop(qa_gpt2_dir, tmp_path):
    cfg = _config(qa_gpt2_dir, tmp_path / "run", "train.batch_size=4")
    recipe, state = setup(cfg)
    for _ in range(2):
        train_step(recipe, state, _first_step_batches(recipe))
    save_checkpoint(recipe, state, best=False)
    recipe.lock.release()  # setup locks the run directory until the run ends (train_model releases it)
    resumed, back = setup(dataclasses.replace(cfg, resume=True))
    assert back.to_dict() == state.to_dict()
    for (name, p), q in zip(recipe.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert resumed.scheduler.state_dict() == recipe.scheduler.state_dict()
    original, restored = recipe.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert original["param_groups"] == restored["param_groups"]
    for key, moments in original["state"].items():
        for name, value in moments.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored["state"][key][name])), name
