"""Fixtures for the Minion / MinionS tests: a byte-level tokenizer, a tiny edge model, a scripted planner.

The planner double stands in for the remote model in unit tests: it replies from a script
(a list of strings, or a function of the messages it was sent) and records every request.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tether.cloud import ChatResult

sys.path.insert(0, str(Path(__file__).parent.parent / "cloud"))

from cloudkit import build_byte_tokenizer, build_tiny_byte_model  # noqa: E402

REPORT = """# Quarterly report

## 1. Sales

The Aurora team sold 120 units in March. The Borealis team sold 75 units in March.
Demand was steady across the region and no shortages were reported.

Returns stayed low, at 3 units for the whole quarter.

## 2. People

At the end of March the company employed 48 people. Hiring slowed after February.

## 3. Outlook

Management expects sales to grow modestly next quarter.
"""


class ScriptedPlanner:
    """A `ChatModel` test double: replies from a script and records what it was sent."""

    name = "scripted"

    def __init__(self, script: Sequence[str] | Callable[[list[dict[str, str]]], str]) -> None:
        self.script = script
        self.sent: list[list[dict[str, str]]] = []
        self.json_flags: list[bool] = []
        self.closed = False

    async def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int, temperature: float = 0.0,
                   json_mode: bool = False) -> ChatResult:
        msgs = [dict(m) for m in messages]
        self.sent.append(msgs)
        self.json_flags.append(json_mode)
        if callable(self.script):
            text = self.script(msgs)
        else:
            text = self.script[len(self.sent) - 1]
        prompt = sum(len(m["content"]) for m in msgs) // 4
        return ChatResult(text=text, prompt_tokens=prompt, completion_tokens=max(1, len(text) // 4))

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture(scope="session")
def byte_tokenizer() -> Any:
    return build_byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_byte_hf() -> Any:
    return build_tiny_byte_model(seed=3)


@pytest.fixture
def byte_edge(tiny_byte_hf: Any, byte_tokenizer: Any) -> Any:
    """An `EdgeModel` over the tiny byte-vocabulary model."""
    from tether.edge import EdgeModel
    from tether.runtime import TorchCausalLM

    model = EdgeModel(TorchCausalLM(tiny_byte_hf, name="tiny-byte-edge"), byte_tokenizer)
    yield model
    model.close()
