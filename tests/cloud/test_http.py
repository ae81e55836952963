"""The OpenAI-compatible endpoint and the httpx backend against it, on loopback."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from cloudkit import UvicornServer, greedy_reference
from tether.cloud import (
    InvalidRequest,
    SamplingParams,
    SessionLimitExceeded,
    SparseProbs,
    UnsupportedOperation,
)
from tether.cloud._config import CloudConfig
from tether.cloud._http import HttpCloudSession
from tether.cloud._manager import SessionManager
from tether.cloud._openai import OpenAIApp

PROMPT = [5, 17, 42, 7, 99, 3]


@pytest.fixture
async def endpoint(tiny_lm, byte_tokenizer):  # type: ignore[no-untyped-def]
    async with SessionManager(tiny_lm, tokenizer=byte_tokenizer, config=CloudConfig(max_tokens=512)) as m:
        async with UvicornServer(OpenAIApp(m, api_key="sekrit").app) as srv:
            yield srv.url, m


def _session(url: str, **kw):  # type: ignore[no-untyped-def]
    return HttpCloudSession(url, api_key="sekrit", vocab_size=259, **kw)


async def test_models_health_metrics_and_auth(endpoint) -> None:  # type: ignore[no-untyped-def]
    url, _ = endpoint
    async with httpx.AsyncClient() as c:
        assert (await c.get(f"{url}/v1/models")).status_code == 401
        r = await c.get(f"{url}/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert r.json()["data"][0]["id"] == "tiny-byte"
        assert (await c.get(f"{url}/healthz")).json() == {"status": "ok"}
        assert (await c.get(f"{url}/readyz")).json()["status"] == "ready"
        text = (await c.get(f"{url}/metrics")).text
        assert "tether_sessions_open" in text


async def test_http_greedy_verify_equals_greedy_generation(endpoint, tiny_lm) -> None:  # type: ignore[no-untyped-def]
    url, _ = endpoint
    ref = greedy_reference(tiny_lm, PROMPT, 20)
    rng = random.Random(1)
    async with _session(url) as s:
        info = await s.open()
        assert info.model == "tiny-byte" and info.capabilities.verify
        await s.append(PROMPT)
        out: list[int] = []
        while len(out) < 20:
            good = ref[len(out):len(out) + 3]
            draft = good[: rng.randrange(0, 4)] + [rng.randrange(256)]
            r = await s.verify(draft)
            out += draft[:r.accepted] + [r.next_token]
        assert out[:20] == ref
        assert s.length == len(PROMPT) + len(out)


async def test_http_score_matches_in_process(endpoint, tiny_lm) -> None:  # type: ignore[no-untyped-def]
    url, m = endpoint
    local = await m.open_session()
    await local.append(PROMPT[:2])
    want = await local.score(PROMPT[2:], top_k=3)
    async with _session(url) as s:
        await s.open()
        await s.append(PROMPT[:2])
        got = await s.score(PROMPT[2:], top_k=3)
    assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-4)
    assert got.top_ids == want.top_ids
    assert got.length == len(PROMPT)


async def test_http_generate_and_rollback(endpoint, tiny_lm) -> None:  # type: ignore[no-untyped-def]
    url, _ = endpoint
    ref = greedy_reference(tiny_lm, PROMPT, 10)
    async with _session(url) as s:
        await s.open()
        await s.append(PROMPT)
        chunks = [c async for c in s.generate(10)]
        assert [t for c in chunks for t in c.token_ids] == ref
        assert chunks[-1].finish_reason == "length"
        await s.rollback(len(PROMPT))
        chunks = [c async for c in s.generate(10, stop_ids=[ref[2]])]
        got = [t for c in chunks for t in c.token_ids]
        assert got == ref[: ref.index(ref[2]) + 1] and chunks[-1].finish_reason == "stop"


async def test_http_sampling_verify_needs_top_k(endpoint) -> None:  # type: ignore[no-untyped-def]
    url, _ = endpoint
    q = SparseProbs(ids=((1, 2),), probs=((0.5, 0.5),))
    async with _session(url) as s:
        info = await s.open(sampling=SamplingParams(temperature=1.0, seed=1))
        assert not info.capabilities.sampling_verify
        await s.append(PROMPT)
        with pytest.raises(UnsupportedOperation, match="top_k"):
            await s.verify([1], q)
    async with _session(url) as s:
        info = await s.open(sampling=SamplingParams(temperature=1.0, top_k=5, seed=1))
        assert info.capabilities.sampling_verify
        await s.append(PROMPT)
        r = await s.verify([1], q)
        assert 0 <= r.accepted <= 1 and s.length == len(PROMPT) + r.accepted + 1


async def test_http_chat_and_json_mode(endpoint) -> None:  # type: ignore[no-untyped-def]
    url, _ = endpoint
    async with _session(url) as s:
        await s.open()
        res = await s.chat([{"role": "user", "content": "hi"}], max_tokens=6)
        assert res.prompt_tokens > 0 and 0 < res.completion_tokens <= 6
        res = await s.chat([{"role": "user", "content": "json please"}], max_tokens=30, json_mode=True)
        assert isinstance(json.loads(res.text), dict)


async def test_http_errors_map_to_cloud_errors(endpoint) -> None:  # type: ignore[no-untyped-def]
    url, _ = endpoint
    async with _session(url) as s:
        with pytest.raises(InvalidRequest, match="not 'nope'"):
            await s.open(model="nope")
    async with _session(url) as s:
        await s.open()
        with pytest.raises(SessionLimitExceeded, match="max_tokens=512"):
            await s.append([1] * 600)
        with pytest.raises(InvalidRequest, match="append the prompt first"):
            await s.verify([1])
        await s.append(PROMPT)
        with pytest.raises(UnsupportedOperation):
            import numpy as np

            await s.continue_hidden(np.zeros((1, 64), np.float32), layer=1)


async def test_generic_engine_reports_capabilities(endpoint, byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    url, _ = endpoint
    async with _session(url, engine="generic", tokenizer=byte_tokenizer) as s:
        info = await s.open()
        assert not info.capabilities.verify and not info.capabilities.score and info.capabilities.chat
        await s.append(PROMPT)
        with pytest.raises(UnsupportedOperation, match="cannot score prompts"):
            await s.verify([1])
        chunks = [c async for c in s.generate(4)]
        assert chunks[-1].finish_reason in ("stop", "length")


async def test_generic_engine_sends_a_text_prompt(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """llama.cpp's server takes only string prompts (a token-id list fails validation with a 500)."""
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "model.gguf"}]})
        body = json.loads(request.content)
        seen.append(body)
        if not isinstance(body["prompt"], str):
            return httpx.Response(500, json={"error": {"message": "prompt: Input should be a valid string"}})
        return httpx.Response(200, json={"choices": [{"text": "ok", "finish_reason": "length"}]})

    prompt = "<|im_start|>user\nhi<|im_end|>\n"
    ids = byte_tokenizer.encode(prompt, add_special_tokens=False)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
        async with HttpCloudSession("http://llama", engine="generic", tokenizer=byte_tokenizer, client=c) as s:
            await s.open()
            await s.append(ids)
            chunks = [c async for c in s.generate(2)]
    assert seen[0]["prompt"] == prompt
    assert [t for ch in chunks for t in ch.token_ids] == byte_tokenizer.encode("ok", add_special_tokens=False)
    assert s.length == len(ids) + 2

async def test_openai_completions_echo_logprobs_and_streaming(endpoint, tiny_lm) -> None:  # type: ignore[no-untyped-def]
    url, _ = endpoint
    h = {"Authorization": "Bearer sekrit"}
    ref = greedy_reference(tiny_lm, PROMPT, 4)
    async with httpx.AsyncClient(headers=h) as c:
        r = await c.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                                        "echo": True, "logprobs": 2,
                                                        "return_tokens_as_token_ids": True})
        body = r.json()
        lp = body["choices"][0]["logprobs"]
        assert [int(t.split(":")[1]) for t in lp["tokens"]] == PROMPT + ref
        assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(PROMPT) + 4
        assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
        # text prompt + SSE streaming
        events = []
        async with c.stream("POST", f"{url}/v1/completions",
                            json={"prompt": "hello", "max_tokens": 5, "temperature": 0, "stream": True}) as s:
            async for line in s.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        # chat streaming
        events = []
        async with c.stream("POST", f"{url}/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                  "stream": True, "stream_options": {"include_usage": True}}) as s:
            async for line in s.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        first = json.loads(events[0])
        assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
        usage = json.loads(events[-2])  # asked for: a last chunk with no choices
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 5
        # bad requests
        r = await c.post(f"{url}/v1/completions", json={"prompt": PROMPT, "logprobs": 99})
        assert r.status_code == 400 and "max_top_k" in r.json()["error"]["message"]
        r = await c.post(f"{url}/v1/completions", content=b"{nope")
        assert r.status_code == 400
