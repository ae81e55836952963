"""Fixtures for the cloud tests (helpers live in cloudkit.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cloudkit import build_byte_tokenizer, build_tiny_byte_model  # noqa: E402


@pytest.fixture(scope="session")
def byte_tokenizer():  # type: ignore[no-untyped-def]
    return build_byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm():  # type: ignore[no-untyped-def]
    """The tiny byte-vocabulary model as a TorchCausalLM."""
    from tether.runtime import TorchCausalLM

    return TorchCausalLM(build_tiny_byte_model(seed=0), name="tiny-byte")


@pytest.fixture(scope="session")
def tiny_qwen_lm(tiny_hf_model):  # type: ignore[no-untyped-def]
    """The tiny model with the real Qwen vocabulary size."""
    from tether.runtime import TorchCausalLM

    return TorchCausalLM(tiny_hf_model, name="tiny-qwen2")


