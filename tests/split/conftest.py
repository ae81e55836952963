"""Fixtures for split computing: a tiny Qwen2-architecture cloud model, an edge model, a toy tokenizer.

The cloud model has 6 layers so that many split points can be tried; the edge (draft)
model is a different tiny model, only used while the cloud is unreachable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from split_toys import ToyTokenizer
from tiny_models import build_tiny_qwen2

SPLIT_LAYERS = 6


@pytest.fixture(scope="session")
def split_hf():  # type: ignore[no-untyped-def]
    return build_tiny_qwen2(seed=11, num_layers=SPLIT_LAYERS)


@pytest.fixture(scope="session")
def split_runtime(split_hf):  # type: ignore[no-untyped-def]
    from tether.runtime import TorchCausalLM

    return TorchCausalLM(split_hf, name="tiny-split")


@pytest.fixture(scope="session")
def draft_hf():  # type: ignore[no-untyped-def]
    return build_tiny_qwen2(seed=12, num_layers=2)


@pytest.fixture
def toy_tokenizer() -> ToyTokenizer:
    return ToyTokenizer()


@pytest.fixture
def edge_model(draft_hf, toy_tokenizer):  # type: ignore[no-untyped-def]
    from tether.edge import EdgeModel
    from tether.runtime import TorchCausalLM

    model = EdgeModel(TorchCausalLM(draft_hf, name="tiny-draft"), toy_tokenizer)
    yield model
    model.close()


@pytest.fixture
async def manager(split_runtime) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager

    m = SessionManager(split_runtime, config=CloudConfig(batch_window_s=0.0))
    await m.start()
    yield m
    await m.aclose()
