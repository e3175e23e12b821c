"""Tiny random causal LMs shared by the language-model tests.

Each factory seeds torch's global generator, then builds the model: the same arguments give the same
weights, so every test that moved here builds exactly the model it built before.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from torch import nn

VOCAB = 64


def _transformers() -> ModuleType:
    """``transformers``, or a skip: imported on first use, so a test module that imports these
    factories still runs its other tests without it."""
    return pytest.importorskip("transformers")


def llama(
    seed: int = 0,
    vocab: int = VOCAB,
    hidden: int = 16,
    layers: int = 4,
    *,
    tie: bool = True,
    init_range: float | None = None,
    exact: bool = True,
) -> nn.Module:
    """A tiny ``LlamaForCausalLM``: logits ``(N, T, vocab)``, 2 heads sharing 1 key/value head,
    MLP width ``2 * hidden``. ``init_range`` is the weights' standard deviation (None: the config's
    default, 0.02); ``exact`` gives float64 in eval mode (for exactness checks), else float32 as built,
    in training mode."""
    transformers = _transformers()
    torch.manual_seed(seed)
    options = {} if init_range is None else {"initializer_range": init_range}
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
        **options,
    )
    model = transformers.LlamaForCausalLM(config)
    return model.double().eval() if exact else model


def gpt2(seed: int = 0, vocab: int = VOCAB) -> nn.Module:
    """A tiny float64 ``GPT2LMHeadModel`` in eval mode: logits ``(N, T, vocab)``, width 16, 2 layers, 2 heads."""
    transformers = _transformers()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=vocab)
    return transformers.GPT2LMHeadModel(config).double().eval()
