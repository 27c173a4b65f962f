"""The next-token loss (`evaluation.loss`), one function for the native and the hf backend: against
`F.cross_entropy` on the full logits of the model's own forward (and of transformers'), padded (right and left)
and packed, with and without label smoothing, reference and fast path; and `torch.compile` of the training
loss without a graph break."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from qatune.data.batching import Feature, collate, collate_packed, count_tokens, to_device
from qatune.errors import ModelError
from qatune.evaluation.loss import model_loss, next_token_loss
from qatune.lora import LoRAConfig, apply_lora
from qatune.models.config import from_hf_config
from qatune.models.decoder import Decoder
from qatune.models.weights import native_to_hf
from qatune.training.build import LossModule
from qatune.training.hf_backend import HFCausalLM, apply_peft_lora

CPU = torch.device("cpu")
VOCAB = 97
HF_CONFIG = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                       eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _features(lengths: tuple[int, ...], seed: int = 0) -> list[Feature]:
    """Answer-only QA-like features: the first half of each is an unlabelled prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append(Feature(ids, [-100] * (n // 2) + ids[n // 2:]))
    return out


FEATURES = _features((7, 12, 9, 5))
BATCHES = {
    "right-padded": collate(FEATURES, pad_id=0),
    "left-padded": collate(FEATURES, pad_id=0, padding_side="left"),
    "packed": collate_packed([FEATURES[:2], FEATURES[2:]], pad_id=0),
}


def _model(fast_path: bool) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(from_hf_config(HF_CONFIG.to_dict()), fast_path=fast_path)
    model.init_weights(std=0.2)  # logits far from uniform: a wrong position or target shows
    return model.eval()


def _reference_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The textbook shifted loss on the full logits: position t predicts labels[t+1], -100 ignored."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum", label_smoothing=label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("fast_path", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("kind", BATCHES)
def test_loss_equals_cross_entropy_on_the_models_full_logits(kind, fast_path, label_smoothing):
    model = _model(fast_path)
    batch = BATCHES[kind]
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"], doc_ids=batch.get("doc_ids"))
        expected = _reference_loss(logits, batch["labels"], label_smoothing)
        # as training feeds it: to_device drops a padded batch's mask (right padding cannot change earlier
        # tokens); a left-padded batch (generation's side) keeps it
        inputs = batch if kind == "left-padded" else to_device(batch, CPU)
        loss = model_loss(model, inputs, label_smoothing=label_smoothing, chunked=fast_path)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    labelled = 4 + 6 + 5 + 3  # n - n // 2 of each feature
    assert count_tokens(batch).label_tokens == int((batch["labels"][:, 1:] != -100).sum()) == labelled


def test_loss_gradient_equals_cross_entropys():
    model = _model(fast_path=False).train()
    batch = BATCHES["packed"]
    model_loss(model, to_device(batch, CPU), label_smoothing=0.1).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"],
                   attention_mask=batch["attention_mask"])
    _reference_loss(logits, batch["labels"], 0.1).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_batch_without_loss_positions_is_refused():
    model = _model(fast_path=False)
    with pytest.raises(KeyError, match="loss_positions"):
        next_token_loss(torch.zeros(1, 3, 32), model.lm_head.weight, {"input_ids": torch.zeros(1, 3).long()})


def _hf_twin(native: Decoder, lora: bool) -> HFCausalLM:
    hf = GPT2LMHeadModel(HF_CONFIG)
    missing, unexpected = hf.load_state_dict(dict(native_to_hf(native.state_dict(), native.config)), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to wte
    if lora:
        hf = apply_peft_lora(hf, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["c_attn"]))
    return HFCausalLM(hf).eval()


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "peft"])
@pytest.mark.parametrize("kind", ["right-padded", "left-padded"])
def test_hf_backend_and_native_give_the_same_loss_on_the_same_weights(kind, lora):
    """One function for both backends; transformers' own logits are the reference for both."""
    native = _model(fast_path=False)
    hf = _hf_twin(native, lora)  # peft's LoRA B starts at zero: the same function as the plain model
    batch = BATCHES[kind]
    with torch.no_grad():
        theirs = hf.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"]).logits
        expected = _reference_loss(theirs, batch["labels"], 0.1)
        torch.testing.assert_close(model_loss(hf, batch, label_smoothing=0.1), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model_loss(native, batch, label_smoothing=0.1), expected, rtol=1e-5, atol=1e-5)


def test_hf_backend_refuses_a_head_the_loss_cannot_compute():
    """The loss reads the head's weight only: an adapter or a bias on the head would be skipped silently."""
    import peft

    adapted = peft.get_peft_model(GPT2LMHeadModel(HF_CONFIG), peft.LoraConfig(
        r=4, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    biased = GPT2LMHeadModel(HF_CONFIG)
    biased.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    for model in (adapted, biased):
        with pytest.raises(ModelError, match="LM head"):
            HFCausalLM(model)


def _loss_module(method: str, fast_path: bool) -> LossModule:
    model = _model(fast_path).train()
    if method == "lora":
        apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=["c_attn"]))
    return LossModule(model, label_smoothing=0.1)


@pytest.mark.parametrize("fast_path", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_loss_compiles_without_graph_breaks(method, fast_path):
    """`train.compile=true` compiles `LossModule` (forward + loss): one graph per batch layout, no graph break
    (no host sync, no data-dependent shape), padded and packed."""
    loss_module = _loss_module(method, fast_path)
    for kind in ("right-padded", "packed"):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(loss_module)(to_device(BATCHES[kind], CPU))
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_compiled_training_loss_and_gradients_are_the_eager_ones(method):
    """fullgraph=True (a graph break would raise) over batches of new widths and label counts (dynamic shapes)
    and a packed one; the default fast path, dropout off so that both runs compute the same function."""
    loss_module = _loss_module(method, fast_path=True)
    model = loss_module.model
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch._dynamo.reset()
    compiled = torch.compile(loss_module, fullgraph=True, backend="aot_eager")
    batches = [to_device(BATCHES["right-padded"], CPU), to_device(collate(_features((5, 16, 3), 1), 0), CPU),
               to_device(BATCHES["packed"], CPU)]
    for batch in batches:
        results = []
        for module in (loss_module, compiled):
            loss = module(batch)
            loss.backward()
            results.append([loss.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
            model.zero_grad(set_to_none=True)
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
