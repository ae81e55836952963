"""Link drops, timeouts and reconnection: a generation always completes, never half-done."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tether.edge import (
    CloudUnavailableError,
    EdgeClient,
    EmulatedLink,
    InProcessCloud,
    Origin,
    ResilienceOptions,
)

PROMPT = "tell me more"
N = 48


def greedy(hf_model, ids: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, hf_model(x).logits[0, -1].argmax().view(1, 1)], dim=1)
    return x[0, len(ids) :].tolist()


def make_client(edge_model, cloud_manager, **resilience) -> tuple[EdgeClient, EmulatedLink]:  # type: ignore[no-untyped-def]
    link = EmulatedLink(InProcessCloud(cloud_manager))
    opts = ResilienceOptions(backoff_initial=0.01, backoff_max=0.05, **resilience)
    return EdgeClient(edge_model, link, resilience=opts), link


async def run_with_cut(client, link, *, mode="speculative", cut_after=5, restore_after_edge_only=None,  # type: ignore[no-untyped-def]
                       cut_mode="reset"):
    gen = client.stream(PROMPT, mode=mode, max_new_tokens=N)
    edge_only = 0
    async for tok in gen:
        if tok.index + 1 == cut_after:
            link.sever(cut_mode)
        if tok.origin is Origin.EDGE_ONLY:
            edge_only += 1
            if restore_after_edge_only is not None and edge_only == restore_after_edge_only:
                link.restore()
    return gen.result


@pytest.mark.parametrize("mode", ["speculative", "cloud"])
async def test_link_drop_finishes_on_the_edge(edge_model, cloud_manager, tiny_cloud_hf, mode) -> None:  # type: ignore[no-untyped-def]
    client, link = make_client(edge_model, cloud_manager)
    r = await run_with_cut(client, link, mode=mode)
    assert len(r.token_ids) == N and r.finish_reason == "length"
    assert r.stats.degraded and r.stats.link_failures >= 1 and r.stats.reconnects == 0
    first_edge = r.origins.index(Origin.EDGE_ONLY)
    assert first_edge >= 4
    assert all(o is Origin.EDGE_ONLY for o in r.origins[first_edge:])
    # Before the cut the output is the cloud's own.
    prompt_ids = edge_model.tokenizer.encode(PROMPT)
    assert list(r.token_ids[:first_edge]) == greedy(tiny_cloud_hf, prompt_ids, first_edge)


@pytest.mark.parametrize("mode", ["speculative", "cloud"])
async def test_reconnect_resyncs_and_resumes_verification(edge_model, cloud_manager, tiny_cloud_hf, mode) -> None:  # type: ignore[no-untyped-def]
    client, link = make_client(edge_model, cloud_manager)
    r = await run_with_cut(client, link, mode=mode, restore_after_edge_only=2)
    assert len(r.token_ids) == N
    s = r.stats
    assert s.degraded and s.reconnects >= 1
    last_edge = max(i for i, o in enumerate(r.origins) if o is Origin.EDGE_ONLY)
    assert last_edge < N - 3, "verification never resumed"
    assert all(o is not Origin.EDGE_ONLY for o in r.origins[last_edge + 1 :])
    # After the re-sync the cloud continues exactly from everything committed so far.
    prompt_ids = edge_model.tokenizer.encode(PROMPT)
    prefix = prompt_ids + list(r.token_ids[: last_edge + 1])
    assert list(r.token_ids[last_edge + 1 :]) == greedy(tiny_cloud_hf, prefix, N - last_edge - 1)


async def test_verify_timeout_degrades(edge_model, cloud_manager) -> None:  # type: ignore[no-untyped-def]
    client, link = make_client(edge_model, cloud_manager, request_timeout=0.2)
    r = await run_with_cut(client, link, cut_mode="blackhole")
    assert len(r.token_ids) == N and r.stats.degraded and r.stats.link_failures >= 1


async def test_cloud_unreachable_from_the_start(edge_model, cloud_manager) -> None:  # type: ignore[no-untyped-def]
    client, link = make_client(edge_model, cloud_manager)
    link.sever()
    r = await client.generate(PROMPT, max_new_tokens=10)
    assert len(r.token_ids) == 10 and set(r.origins) == {Origin.EDGE_ONLY} and r.stats.degraded
    edge = await client.generate(PROMPT, mode="edge", max_new_tokens=10)
    assert r.token_ids == edge.token_ids  # greedy edge-only output is the edge's own


async def test_raise_policy(edge_model, cloud_manager) -> None:  # type: ignore[no-untyped-def]
    client, link = make_client(edge_model, cloud_manager, on_disconnect="raise")
    with pytest.raises(CloudUnavailableError) as info:
        await run_with_cut(client, link)
    assert info.value.cause is not None
    link.restore()
    r = await client.generate(PROMPT, max_new_tokens=8)
    assert len(r.token_ids) == 8 and not r.stats.degraded


async def test_emulated_rtt_and_bytes(edge_model, cloud_manager) -> None:  # type: ignore[no-untyped-def]
    link = EmulatedLink.with_rtt(InProcessCloud(cloud_manager), 0.04, jitter_s=0.005, seed=1)
    client = EdgeClient(edge_model, link)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await client.generate(PROMPT, max_new_tokens=12)
    s = r.stats
    assert s.rtt_s is not None and 0.038 <= s.rtt_s <= 0.08
    assert loop.time() - t0 >= 0.04 * (s.rounds + 2)
    assert s.bytes_up > 0 and s.bytes_down > 0
    assert s.bytes_up == link.bytes_sent and s.bytes_down == link.bytes_received


class _Overloaded:
    """A connector whose sessions refuse the first `refusals` verify/generate requests as
    overloaded (as a rate-limited server does, before doing any work)."""

    def __init__(self, inner, refusals: int) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.left = inner, refusals

    async def new_session(self):  # type: ignore[no-untyped-def]
        from tether.cloud import ServerOverloaded

        session, outer = await self.inner.new_session(), self

        class Session:
            def __getattr__(self, name):  # type: ignore[no-untyped-def]
                return getattr(session, name)

            async def verify(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                if outer.left > 0:
                    outer.left -= 1
                    raise ServerOverloaded("rate limit: over 5 requests/s for this client; retry in 0.010 s")
                return await session.verify(*args, **kwargs)

            async def generate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                if outer.left > 0:
                    outer.left -= 1
                    raise ServerOverloaded("rate limit: over 5 requests/s for this client; retry in 0.010 s")
                async for chunk in session.generate(*args, **kwargs):
                    yield chunk

        return Session()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("mode", ["speculative", "cloud"])
async def test_overloaded_requests_are_retried_not_degraded(edge_model, cloud_manager, tiny_cloud_hf,  # type: ignore[no-untyped-def]
                                                            mode) -> None:
    opts = ResilienceOptions(backoff_initial=0.01, backoff_max=0.05)
    client = EdgeClient(edge_model, _Overloaded(InProcessCloud(cloud_manager), refusals=3), resilience=opts)
    r = await client.generate(PROMPT, mode=mode, max_new_tokens=N)
    assert r.stats.overload_retries == 3 and not r.stats.degraded and r.stats.link_failures == 0
    assert Origin.EDGE_ONLY not in r.origins
    reference = await EdgeClient(edge_model, InProcessCloud(cloud_manager)).generate(PROMPT, mode="cloud",
                                                                                      max_new_tokens=N)
    assert r.token_ids == reference.token_ids


async def test_overload_retries_are_bounded(edge_model, cloud_manager, tiny_cloud_hf) -> None:  # type: ignore[no-untyped-def]
    opts = ResilienceOptions(backoff_initial=0.01, backoff_max=0.02, overload_retries=2)
    client = EdgeClient(edge_model, _Overloaded(InProcessCloud(cloud_manager), refusals=10**6), resilience=opts)
    r = await client.generate(PROMPT, mode="speculative", max_new_tokens=8)
    assert len(r.token_ids) == 8 and r.stats.degraded and r.stats.overload_retries >= 2
    with pytest.raises(ValueError, match="overload_retries"):
        ResilienceOptions(overload_retries=-1)
