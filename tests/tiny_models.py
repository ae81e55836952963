"""Tiny randomly initialised models with the real Qwen2.5 vocabulary, for fast unit tests.

A module of its own (not conftest) so tests anywhere can import it by a unique name.
"""

from __future__ import annotations

import torch

QWEN_VOCAB_SIZE = 151_936
QWEN_EOS = 151_645


def tiny_qwen2_config(*, num_layers: int = 4, seed_vocab: int = QWEN_VOCAB_SIZE):  # type: ignore[no-untyped-def]
    """A Qwen2 config small enough to build in milliseconds, with the real vocabulary."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=seed_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        bos_token_id=151_643,
        eos_token_id=QWEN_EOS,
        pad_token_id=151_643,
    )


def build_tiny_qwen2(seed: int = 0, **kwargs):  # type: ignore[no-untyped-def]
    """A randomly initialised tiny Qwen2ForCausalLM in eval mode, fp32."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_qwen2_config(**kwargs))
    # Random init gives near-uniform logits; scale the head so greedy choices are decisive
    # and tests comparing argmax paths are not decided by float noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()
