"""Fixtures for the edge SDK: a tiny cloud model, a noisy copy of it as the edge, a toy tokenizer.

The edge is the cloud model with Gaussian noise added to its weights, so the pair agrees
often (non-trivial acceptance) but not always (rejections happen).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import torch

from tests.conftest import build_tiny_qwen2


class ToyTokenizer:
    """A stand-in for a Hugging Face tokenizer over the Qwen vocabulary.

    Token i decodes to "<i>" (specials to ""); text encodes as its code points mod 1000
    plus 1000, so any string round-trips to some ids. No chat template unless given one.
    """

    eos_token_id = 151_645
    specials = {151_643, 151_645}

    def __init__(self, chat_template: str | None = None) -> None:
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1000 + (ord(c) % 1000) for c in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join("" if (skip_special_tokens and t in self.specials) else f"<{t}>" for t in token_ids)

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> str:
        return "".join(f"[{m['role']}]{m['content']}" for m in conversation) + "[assistant]"


def noisy_copy(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy of `model` with N(0, (scale * std(w))^2) noise added to every weight matrix."""
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    return twin.eval()


@pytest.fixture(scope="session")
def tiny_cloud_hf():  # type: ignore[no-untyped-def]
    return build_tiny_qwen2(seed=1)


@pytest.fixture(scope="session")
def tiny_edge_hf(tiny_cloud_hf):  # type: ignore[no-untyped-def]
    return noisy_copy(tiny_cloud_hf, scale=0.1, seed=2)


@pytest.fixture(scope="session")
def toy_tokenizer() -> ToyTokenizer:
    return ToyTokenizer()


@pytest.fixture
def edge_model(tiny_edge_hf, toy_tokenizer):  # type: ignore[no-untyped-def]
    from tether.edge import EdgeModel
    from tether.runtime import TorchCausalLM

    model = EdgeModel(TorchCausalLM(tiny_edge_hf, name="tiny-edge"), toy_tokenizer)
    yield model
    model.close()


@pytest.fixture
async def cloud_manager(tiny_cloud_hf) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager
    from tether.runtime import TorchCausalLM

    manager = SessionManager(TorchCausalLM(tiny_cloud_hf, name="tiny-cloud"), config=CloudConfig(batch_window_s=0.0))
    await manager.start()
    yield manager
    await manager.aclose()
