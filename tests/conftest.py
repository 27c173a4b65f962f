"""Shared fixtures: tiny random checkpoints saved the way Hugging Face saves them, and the real GPT-2 tokenizer.

The checkpoints use a large init std (0.5 instead of 0.02): the logits then spread over several units, so a
comparison with transformers is decided by the model and never by float noise between two near-equal tokens,
and greedy decoding wanders over many tokens instead of repeating one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GPT2_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "tokenizers" / "gpt2"


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A random GPT-2 (2 layers, width 64, vocab 320, 128 positions, bos 1, eos 2) saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=128,
                     bos_token_id=1, eos_token_id=2, initializer_range=0.5)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random Llama with grouped-query attention (4 query heads, 2 kv heads), untied head, vocab 320."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.5)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    """The real GPT-2 tokenizer in ../shared (read-only, outside the repository): skip where it is absent."""
    if not (GPT2_TOKENIZER_DIR / "vocab.json").is_file():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2_TOKENIZER_DIR}")
    return GPT2_TOKENIZER_DIR.resolve()


@pytest.fixture(scope="session")
def qa_gpt2_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A small random GPT-2 (width 32, 2 layers, 128 positions) with the real GPT-2 tokenizer beside it, for
    training, evaluation and sweep tests. Dropout is 0 so that runs differing only in how the work is split
    (DDP, backends) see identical computations; tests that need dropout set it on a copy."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("qa-gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(gpt2_tokenizer_dir / f, path)
    return path
