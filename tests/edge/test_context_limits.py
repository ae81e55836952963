"""Context limits end cleanly: a reachable cloud at its max_tokens is the end of the text, not a dropped link."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from tether.edge import (
    ContextLengthExceeded,
    EdgeClient,
    InProcessCloud,
    Origin,
    ResilienceOptions,
    SpeculativeOptions,
)
from tether.routing import RoutingOptions

PROMPT = "tell me more"  # 12 tokens with the toy tokenizer
ROOM = 9  # tokens the cloud session has room for after the prompt


def greedy(hf_model: Any, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, hf_model(x).logits[0, -1].argmax().view(1, 1)], dim=1)
    return x[0, len(ids):].tolist()


class CountingCloud(InProcessCloud):
    """An in-process cloud that counts the sessions it hands out (a reconnect storm shows here)."""

    def __init__(self, manager: Any) -> None:
        super().__init__(manager)
        self.sessions = 0

    async def new_session(self) -> Any:
        self.sessions += 1
        return await super().new_session()


@pytest.fixture
async def small_cloud(tiny_cloud_hf: Any, toy_tokenizer: Any) -> AsyncIterator[Any]:
    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager
    from tether.runtime import TorchCausalLM

    limit = len(toy_tokenizer.encode(PROMPT)) + ROOM
    manager = SessionManager(TorchCausalLM(tiny_cloud_hf, name="tiny-cloud"),
                             config=CloudConfig(batch_window_s=0.0, max_tokens=limit))
    await manager.start()
    yield manager
    await manager.aclose()


def _client(edge_model: Any, manager: Any, on_disconnect: str) -> tuple[EdgeClient, CountingCloud]:
    cloud = CountingCloud(manager)
    opts = ResilienceOptions(on_disconnect=on_disconnect, backoff_initial=0.01, backoff_max=0.02)  # type: ignore[arg-type]
    return EdgeClient(edge_model, cloud, resilience=opts, speculative=SpeculativeOptions(draft_length=4)), cloud


MODES = [
    ("cloud", None),
    ("speculative", None),
    ("route-token", RoutingOptions(threshold=float("inf"))),  # every position is handed to the cloud
    ("route-query", RoutingOptions(threshold=float("inf"))),  # the query goes to the cloud
]


@pytest.mark.parametrize("on_disconnect", ["degrade", "raise"])
@pytest.mark.parametrize(("mode", "routing"), MODES, ids=[m for m, _ in MODES])
async def test_reaching_max_tokens_ends_with_length(edge_model, small_cloud, tiny_cloud_hf, mode, routing,  # type: ignore[no-untyped-def]
                                                    on_disconnect) -> None:
    client, cloud = _client(edge_model, small_cloud, on_disconnect)
    r = await client.generate(PROMPT, mode=mode, max_new_tokens=40, routing=routing)
    prompt_ids = edge_model.tokenizer.encode(PROMPT)
    # The cloud's own greedy tokens, up to the session's limit, and no edge stand-ins.
    assert list(r.token_ids) == greedy(tiny_cloud_hf, prompt_ids, ROOM)
    assert r.finish_reason == "length"
    assert Origin.EDGE_ONLY not in r.origins
    s = r.stats
    assert not s.degraded and s.link_failures == 0 and s.reconnects == 0
    assert cloud.sessions == 1, "a full session must not be taken for a dropped link (reconnects)"
    await client.aclose()


@pytest.mark.parametrize("mode", ["cloud", "speculative", "route-token"])
async def test_prompt_longer_than_the_cloud_limit_raises_before_compute(edge_model, small_cloud, mode) -> None:  # type: ignore[no-untyped-def]
    client, _ = _client(edge_model, small_cloud, "degrade")
    prompt = PROMPT + "x" * (ROOM + 1)  # one token more than the session holds
    limit = len(edge_model.tokenizer.encode(PROMPT)) + ROOM
    gen = client.stream(prompt, mode=mode, max_new_tokens=4, routing=RoutingOptions(threshold=0.5))
    with pytest.raises(ContextLengthExceeded, match=rf"the prompt has {limit + 1} tokens but the cloud session "
                                                    rf"holds at most {limit}") as info:
        await gen.collect()
    assert (info.value.prompt_tokens, info.value.limit, info.value.where) == (limit + 1, limit, "cloud session")
    s = gen.stats
    assert s.edge_forward_passes == 0 and s.cloud_forward_passes == 0 and s.link_failures == 0
    # A prompt that fills the session exactly leaves no room: empty output, "length".
    exact = await client.generate(PROMPT + "x" * ROOM, mode=mode, max_new_tokens=4,
                                  routing=RoutingOptions(threshold=0.5))
    assert exact.token_ids == () and exact.finish_reason == "length" and not exact.stats.degraded
    await client.aclose()


async def test_prompt_longer_than_the_edge_model_raises_at_once(edge_model) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, None, mode="edge")
    limit = edge_model.runtime.info.max_positions
    with pytest.raises(ContextLengthExceeded, match=f"holds at most {limit}") as info:
        client.stream("y" * (limit + 5), max_new_tokens=4)
    assert (info.value.prompt_tokens, info.value.where) == (limit + 5, "edge model")
    # Reaching the edge model's limit ends the text with "length".
    r = await client.generate("y" * (limit - 3), max_new_tokens=10)
    assert len(r.token_ids) == 3 and r.finish_reason == "length"
    await client.aclose()


async def test_raise_policy_still_raises_for_a_real_link_failure(edge_model, small_cloud) -> None:  # type: ignore[no-untyped-def]
    from tether.edge import CloudUnavailableError, EmulatedLink

    link = EmulatedLink(InProcessCloud(small_cloud))
    client = EdgeClient(edge_model, link, resilience=ResilienceOptions(on_disconnect="raise"))
    link.sever("reset")
    with pytest.raises(CloudUnavailableError):
        await client.generate(PROMPT, mode="cloud", max_new_tokens=4)
    await client.aclose()
