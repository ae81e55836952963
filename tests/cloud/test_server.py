"""A real `CloudServer` on loopback and a real encrypted client (`RemoteCloud`)."""

from __future__ import annotations

import asyncio
import random

import httpx
import numpy as np
import pytest

from cloudkit import greedy_reference, slow_model
from tether.cloud import (
    CloudSessionAPI,
    InvalidRequest,
    SamplingParams,
    ServerOverloaded,
    SessionEvicted,
    SessionLimitExceeded,
    SessionNotOpen,
    SparseProbs,
)
from tether.cloud._config import CloudConfig
from tether.cloud._manager import SessionManager
from tether.edge import RemoteCloud
from tether.cloud._server import CloudServer
from tether.protocol import Chat, ChatMessage, KeyPair
from tether.protocol import SamplingParams as WireSampling

PROMPT = [5, 17, 42, 7, 99, 3]


def _server(model, server_keys, client_keys, tokenizer=None, **cfg):  # type: ignore[no-untyped-def]
    m = SessionManager(model, tokenizer=tokenizer, config=CloudConfig(**cfg))
    return CloudServer(m, keys=server_keys, allowlist=[client_keys.public], http_port=0)


async def _cloud(srv: CloudServer, client_keys: KeyPair) -> RemoteCloud:
    return await RemoteCloud.connect(srv.url, client_keys, server_public_key=srv.keys.public)


async def test_every_operation_over_the_encrypted_protocol(tiny_lm, byte_tokenizer, server_keys, client_keys) -> None:  # type: ignore[no-untyped-def]
    ref = greedy_reference(tiny_lm, PROMPT, 24)
    async with _server(tiny_lm, server_keys, client_keys, byte_tokenizer) as srv:
        cloud = await _cloud(srv, client_keys)
        s = await cloud.new_session()
        assert isinstance(s, CloudSessionAPI)
        info = await s.open()
        assert info.model == "tiny-byte" and info.capabilities.verify and info.capabilities.hidden
        assert await s.append(PROMPT) == len(PROMPT)
        # verify-based greedy decoding equals the model's greedy generation
        rng = random.Random(3)
        out: list[int] = []
        while len(out) < 16:
            good = ref[len(out):len(out) + 4]
            draft = good[: rng.randrange(0, 5)] + [rng.randrange(256)]
            r = await s.verify(draft)
            assert r.is_bonus == (r.accepted == len(draft))
            out += draft[:r.accepted] + [r.next_token]
        assert out[:16] == ref[:16]
        assert s.length == len(PROMPT) + len(out)
        # empty draft = one cloud step
        await s.rollback(len(PROMPT))
        r = await s.verify([])
        assert r.next_token == ref[0] and s.length == len(PROMPT) + 1
        # generate, streamed
        chunks = [c async for c in s.generate(5)]
        assert [t for c in chunks for t in c.token_ids] == ref[1:6] and chunks[-1].finish_reason == "length"
        # score
        await s.rollback(len(PROMPT))
        sc = await s.score(ref[:3], top_k=2, commit=False)
        assert len(sc.token_logprobs) == 3 and len(sc.top_ids) == 4 and sc.top_ids[0][0] == ref[0]
        assert s.length == len(PROMPT)
        # chat
        res = await s.chat([{"role": "user", "content": "hi"}], max_tokens=5)
        assert 0 < res.completion_tokens <= 5 and res.prompt_tokens > 0
        await s.close()
        with pytest.raises(SessionNotOpen):
            await s.append([1])
        # split computing on its own session
        h = await cloud.new_session()
        await h.open()
        st = tiny_lm.new_state()
        hidden = tiny_lm.run_layers(st, tiny_lm.embed(PROMPT), 0, 2).numpy()
        hr = await h.continue_hidden(hidden.astype(np.float16), layer=2, top_k=3)
        assert hr.next_token == ref[0] and hr.length == len(PROMPT) and len(hr.top_ids) == 3
        tiny_lm.release(st)
        # streamed chat straight on the connection
        msg = Chat(messages=(ChatMessage(role="user", content="hello"),), model="tiny-byte", max_tokens=6,
                   sampling=WireSampling(temperature=0.0), stream=True)
        replies = [m async for m in cloud.connection.stream(msg)]
        assert replies[-1].finish_reason in ("stop", "length") and replies[-1].completion_tokens <= 6
        await cloud.aclose()


async def test_sampling_verify_over_protocol(tiny_lm, server_keys, client_keys) -> None:  # type: ignore[no-untyped-def]
    async with _server(tiny_lm, server_keys, client_keys) as srv:
        cloud = await _cloud(srv, client_keys)
        s = await cloud.new_session()
        await s.open(sampling=SamplingParams(temperature=1.0, seed=5))
        await s.append(PROMPT)
        q = SparseProbs(ids=((1, 2, 3), (4,)), probs=((0.2, 0.3, 0.5), (1.0,)))
        r = await s.verify([3, 4], q)
        assert 0 <= r.accepted <= 2 and s.length == len(PROMPT) + r.accepted + 1
        with pytest.raises(InvalidRequest, match="probability 0"):
            await s.verify([9, 4], SparseProbs(ids=((9, 1), (4,)), probs=((0.0, 1.0), (1.0,))))
        await cloud.aclose()


async def test_errors_limits_and_allowlist(tiny_lm, server_keys, client_keys) -> None:  # type: ignore[no-untyped-def]
    async with _server(tiny_lm, server_keys, client_keys, max_tokens=32, max_sessions=2) as srv:
        cloud = await _cloud(srv, client_keys)
        s = await cloud.new_session()
        with pytest.raises(InvalidRequest, match="not 'other-model'"):
            await s.open(model="other-model")
        s = await cloud.new_session()
        await s.open()
        with pytest.raises(SessionLimitExceeded, match="max_tokens=32"):
            await s.append(list(range(40)))
        with pytest.raises(InvalidRequest, match="cannot roll back"):
            await s.rollback(5)
        s2 = await cloud.new_session()
        await s2.open()
        with pytest.raises(ServerOverloaded, match="maximum of 2 sessions"):
            await (await cloud.new_session()).open()
        await cloud.aclose()
        # a key that is not on the allowlist is refused
        stranger = KeyPair.generate()
        with pytest.raises(Exception):
            await RemoteCloud.connect(srv.url, stranger, server_public_key=srv.keys.public)
        await asyncio.sleep(0.05)
        assert srv.manager.sessions == ()  # the disconnected client's sessions were closed


async def test_eviction_and_idle_timeout_reach_the_client(tiny_lm, server_keys, client_keys) -> None:  # type: ignore[no-untyped-def]
    bpt = SessionManager(tiny_lm).kv_bytes_per_token
    async with _server(tiny_lm, server_keys, client_keys, kv_budget_bytes=bpt * 400, idle_timeout_s=0.5) as srv:
        cloud = await _cloud(srv, client_keys)
        a, b = await cloud.new_session(), await cloud.new_session()
        await a.open()
        await b.open()
        await a.append(list(range(25)))
        await b.append(list(range(25)))  # a is least recently used: evicted
        with pytest.raises(SessionEvicted) as e:
            await a.verify([1])
        assert e.value.reason == "memory"
        # re-prefill on a new session works
        a2 = await cloud.new_session()
        await a2.open()
        await a2.append(list(range(10)))
        await asyncio.sleep(1.2)
        with pytest.raises(SessionEvicted) as e:
            await a2.verify([1])
        assert e.value.reason == "idle"
        await cloud.aclose()


async def test_graceful_shutdown_finishes_requests_in_flight(tiny_lm, server_keys, client_keys) -> None:  # type: ignore[no-untyped-def]
    slow = slow_model(tiny_lm, 0.15)
    srv = _server(slow, server_keys, client_keys)
    await srv.start()
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{srv.http_url}/readyz")).status_code == 200
        cloud = await _cloud(srv, client_keys)
        sessions = [await cloud.new_session() for _ in range(3)]
        for s in sessions:
            await s.open()
            await s.append(PROMPT, prefill=False)
        in_flight = [asyncio.ensure_future(s.verify([1, 2, 3])) for s in sessions]
        gen = asyncio.ensure_future(_collect(sessions[0], 0))  # queued behind the verify on session 0
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(srv.close(grace=5.0))
        await asyncio.sleep(0.02)
        assert not srv.ready
        results = await asyncio.gather(*in_flight)
        assert all(r.length == len(PROMPT) + r.accepted + 1 for r in results)
        await gen
        await closing
        # after the drain, nothing is accepted
        with pytest.raises(Exception):
            await sessions[1].verify([1])
        with pytest.raises(httpx.HTTPError):
            await http.get(f"{srv.http_url}/readyz")
        await cloud.aclose()


async def _collect(s, n):  # type: ignore[no-untyped-def]
    return [c async for c in s.generate(n)] if n else []


async def test_shutdown_grace_expiry_fails_requests_cleanly(tiny_lm, server_keys, client_keys) -> None:  # type: ignore[no-untyped-def]
    slow = slow_model(tiny_lm, 0.2)
    srv = _server(slow, server_keys, client_keys)
    await srv.start()
    cloud = await _cloud(srv, client_keys)
    s = await cloud.new_session()
    await s.open()
    await s.append(PROMPT, prefill=False)
    task = asyncio.ensure_future(_collect(s, 50))  # ~10 s of work
    await asyncio.sleep(0.3)
    await srv.close(grace=0.3)
    with pytest.raises((SessionEvicted, Exception)) as e:
        await task
    assert type(e.value).__module__.startswith("tether")
    await cloud.aclose()


async def test_metrics_and_health_endpoints(tiny_lm, server_keys, client_keys) -> None:  # type: ignore[no-untyped-def]
    async with _server(tiny_lm, server_keys, client_keys) as srv:
        cloud = await _cloud(srv, client_keys)
        s = await cloud.new_session()
        await s.open()
        await s.append(PROMPT)
        await s.verify([1, 2])
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{srv.http_url}/metrics")).text
            assert 'tether_requests_total{op="verify",outcome="ok"} 1.0' in text
            assert "tether_sessions_open 1.0" in text
            assert "tether_tokens_verified_total 2.0" in text
            assert "tether_forward_seconds_bucket" in text and "tether_queue_wait_seconds_count" in text
            ready = (await http.get(f"{srv.http_url}/readyz")).json()
            assert ready["sessions"] == 1 and ready["model"] == "tiny-byte"
        await cloud.aclose()
