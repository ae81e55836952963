"""Shared fixtures.

Tiny randomly initialised Qwen2-architecture models with the real Qwen2.5 vocabulary
size (151,936) stand in for the real pair in fast unit tests; tests marked
`real_model` use the real default pair and share one loaded copy per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.protocol import KeyPair
from tiny_models import QWEN_EOS, QWEN_VOCAB_SIZE, build_tiny_qwen2, tiny_qwen2_config

__all__ = ["QWEN_EOS", "QWEN_VOCAB_SIZE", "build_tiny_qwen2", "tiny_qwen2_config"]


@pytest.fixture(scope="session")
def tiny_hf_model():  # type: ignore[no-untyped-def]
    return build_tiny_qwen2(seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model) -> Path:  # type: ignore[no-untyped-def]
    """The tiny model saved as a Hugging Face model directory (safetensors + config)."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_hf_model.save_pretrained(path)
    return path


# One static key pair per side for every test that runs a server and a client.
@pytest.fixture(scope="session")
def server_keys() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture(scope="session")
def client_keys() -> KeyPair:
    return KeyPair.generate()
