"""Contract of `HttpCloudSession(engine="vllm")` against a live vLLM server.

Skipped unless ``TETHER_TEST_VLLM_URL`` names one (e.g. ``http://gpu-box:8000``), started as
docs/deploy.md section 3 shows::

    vllm serve Qwen/Qwen2.5-Coder-1.5B-Instruct --max-logprobs 20 --max-model-len 4096

Optional: ``TETHER_TEST_VLLM_MODEL`` (the served name; default: the first `/v1/models` lists)
and ``TETHER_TEST_VLLM_API_KEY`` (vLLM's ``--api-key``). Prompts are tokenized by the server
itself (vLLM's ``POST /tokenize``), so the test needs no tokenizer download.

What it pins down, operation by operation, is what the edge relies on: chat (and JSON mode),
generate with token ids, greedy verify that agrees exactly with greedy generation (accepting
the engine's own continuation in full, correcting the first wrong draft token), score whose
top-1 is that continuation and whose logprobs are consistent, and the session's context
limit ending a generation with ``"length"``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tether.cloud import HttpCloudSession, SamplingParams

URL = os.environ.get("TETHER_TEST_VLLM_URL", "").rstrip("/")
MODEL = os.environ.get("TETHER_TEST_VLLM_MODEL") or None
API_KEY = os.environ.get("TETHER_TEST_VLLM_API_KEY") or None

pytestmark = pytest.mark.skipif(not URL, reason="set TETHER_TEST_VLLM_URL to a live vLLM server to run this contract")

# A code prompt the coder model continues for many tokens without ending its turn.
PROMPT = "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
N = 12


async def _tokenize(text: str) -> list[int]:
    """The server's own token ids for `text` (vLLM's /tokenize), without special tokens."""
    headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
    body: dict[str, Any] = {"prompt": text, "add_special_tokens": False}
    if MODEL:
        body["model"] = MODEL
    async with httpx.AsyncClient(timeout=60.0, headers=headers) as http:
        r = await http.post(f"{URL}/tokenize", json=body)
    r.raise_for_status()
    return [int(t) for t in r.json()["tokens"]]


def _session(**kwargs: Any) -> HttpCloudSession:
    return HttpCloudSession(URL, engine="vllm", model=MODEL, api_key=API_KEY, timeout=120.0, **kwargs)


@pytest.fixture
async def session() -> AsyncIterator[HttpCloudSession]:
    s = _session()
    await s.open(sampling=SamplingParams(temperature=0.0))
    yield s
    await s.close()


@pytest.fixture
async def prompt_ids() -> list[int]:
    return await _tokenize(PROMPT)


async def _generate(s: HttpCloudSession, n: int) -> tuple[list[int], str | None]:
    ids: list[int] = []
    finish = None
    async for chunk in s.generate(n):
        ids.extend(chunk.token_ids)
        finish = chunk.finish_reason
    return ids, finish


async def test_open_reports_model_context_and_capabilities() -> None:
    s = _session()
    info = await s.open(sampling=SamplingParams(temperature=0.0))
    try:
        assert info.model == (MODEL or info.model) and info.model
        assert info.max_tokens > 0, "vLLM lists max_model_len in /v1/models"
        caps = info.capabilities
        assert caps.verify and caps.score and caps.generate and caps.chat and not caps.hidden
        assert not caps.sampling_verify  # greedy session: no top_k, no exact sampling verification
    finally:
        await s.close()


async def test_chat_plain_and_json_mode(session: HttpCloudSession) -> None:
    res = await session.chat([{"role": "user", "content": "Say hello in one short sentence."}], max_tokens=24)
    assert res.text.strip()
    assert 0 < res.completion_tokens <= 24 and res.prompt_tokens > 0
    assert res.finish_reason in ("stop", "length")
    res = await session.chat([{"role": "user", "content": "Give a JSON object with a key 'answer' set to 4."}],
                             max_tokens=64, json_mode=True)
    assert isinstance(json.loads(res.text), dict), res.text


async def test_generate_returns_token_ids_and_commits_them(session: HttpCloudSession, prompt_ids: list[int]) -> None:
    await session.append(prompt_ids)
    ids, finish = await _generate(session, N)
    assert 0 < len(ids) <= N and finish in ("stop", "length")
    assert session.length == len(prompt_ids) + len(ids)
    # The same request again from the same prefix is deterministic under greedy decoding.
    await session.rollback(len(prompt_ids))
    again, _ = await _generate(session, N)
    assert again == ids


async def test_greedy_verify_agrees_with_greedy_generate(session: HttpCloudSession, prompt_ids: list[int]) -> None:
    await session.append(prompt_ids)
    ids, finish = await _generate(session, N)
    assert len(ids) >= 4, f"the prompt should continue for a while, got {len(ids)} tokens ({finish})"
    await session.rollback(len(prompt_ids))
    # The engine's own continuation as a draft: every token is accepted, plus a bonus token.
    r = await session.verify(ids)
    assert (r.accepted, r.is_bonus) == (len(ids), True)
    assert r.length == len(prompt_ids) + len(ids) + 1 == session.length
    # A draft wrong at position 2: the first two are accepted and the engine's token corrects the third.
    await session.rollback(len(prompt_ids))
    wrong = ids[2] - 1 if ids[2] > 0 else 1
    r = await session.verify([ids[0], ids[1], wrong, ids[3]])
    assert (r.accepted, r.next_token, r.is_bonus) == (2, ids[2], False)
    assert session.length == len(prompt_ids) + 3


async def test_score_top1_is_the_greedy_continuation(session: HttpCloudSession, prompt_ids: list[int]) -> None:
    await session.append(prompt_ids)
    ids, _ = await _generate(session, N)
    await session.rollback(len(prompt_ids))
    res = await session.score(ids, top_k=3, commit=False)
    assert session.length == len(prompt_ids), "commit=False leaves the session as it was"
    assert len(res.token_logprobs) == len(ids) and len(res.top_ids) == len(res.top_logprobs) == len(ids) + 1
    for i, t in enumerate(ids):
        assert res.top_ids[i][0] == t, f"position {i}: the greedy token is not the top-1"
        assert math.isclose(res.token_logprobs[i], res.top_logprobs[i][0], abs_tol=1e-4)
    for row_ids, row_lp in zip(res.top_ids, res.top_logprobs):
        assert len(row_ids) == len(row_lp) == 3
        assert all(v <= 0.0 for v in row_lp) and list(row_lp) == sorted(row_lp, reverse=True)
    committed = await session.score(ids[:3], top_k=0)
    assert committed.length == session.length == len(prompt_ids) + 3
    assert committed.top_ids == ((),) * 4


async def test_generate_stops_at_the_session_limit(prompt_ids: list[int]) -> None:
    s = _session(max_tokens=len(prompt_ids) + 3)
    info = await s.open(sampling=SamplingParams(temperature=0.0))
    try:
        assert info.max_tokens == len(prompt_ids) + 3
        await s.append(prompt_ids)
        ids, finish = await _generate(s, N)
        assert len(ids) <= 3 and s.length <= info.max_tokens
        if len(ids) == 3:
            assert finish == "length"
            assert await _generate(s, N) == ([], "length")
    finally:
        await s.close()
