"""The in-process session backend: every operation, limits, eviction, batching (tiny models)."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest
import torch

from cloudkit import BYTE_EOS, greedy_reference
from tether.cloud import (
    InvalidRequest,
    SamplingParams,
    ServerOverloaded,
    SessionEvicted,
    SessionLimitExceeded,
    SessionNotOpen,
    SparseProbs,
)
from tether.contract import as_messages
from tether.cloud._config import CloudConfig
from tether.cloud._manager import SessionManager

PROMPT = [5, 17, 42, 7, 99, 3]


@pytest.fixture
async def manager(tiny_lm, byte_tokenizer):  # type: ignore[no-untyped-def]
    async with SessionManager(tiny_lm, tokenizer=byte_tokenizer, config=CloudConfig(batch_window_s=0.002)) as m:
        yield m


async def test_greedy_verify_decoding_equals_greedy_generation(manager, tiny_lm) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    for trial in range(6):
        prompt = [rng.randrange(256) for _ in range(rng.randrange(1, 20))]
        ref = greedy_reference(tiny_lm, prompt, 40)
        s = await manager.open_session()
        await s.append(prompt, prefill=trial % 2 == 0)
        out: list[int] = []
        while len(out) < 40:
            k = rng.randrange(0, 7)
            # a draft that is right for a while and then wrong, or plain random
            good = ref[len(out):len(out) + k]
            cut = rng.randrange(0, len(good) + 1)
            draft = good[:cut] + [rng.randrange(256) for _ in range(k - cut)]
            r = await s.verify(draft)
            assert r.forward_passes == 1
            new = draft[:r.accepted] + [r.next_token]
            assert r.accepted >= cut or draft[:r.accepted] == ref[len(out):len(out) + r.accepted]
            out.extend(new)
            assert r.length == len(prompt) + len(out) == s.length
            assert r.is_bonus == (r.accepted == len(draft))
        assert out[:40] == ref
        await s.close()


async def test_generate_matches_reference_and_stops(manager, tiny_lm) -> None:  # type: ignore[no-untyped-def]
    ref = greedy_reference(tiny_lm, PROMPT, 12)
    s = await manager.open_session()
    await s.append(PROMPT)
    chunks = [c async for c in s.generate(12)]
    assert [t for c in chunks for t in c.token_ids] == ref
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    # stop on a token we know comes next
    await s.rollback(len(PROMPT))
    chunks = [c async for c in s.generate(12, stop_ids=[ref[3]])]
    got = [t for c in chunks for t in c.token_ids]
    assert got == ref[: ref.index(ref[3]) + 1] and chunks[-1].finish_reason == "stop"
    assert s.length == len(PROMPT) + len(got)
    assert [c async for c in s.generate(0)][0].finish_reason == "length"


async def test_score_matches_model_logprobs(manager, tiny_lm) -> None:  # type: ignore[no-untyped-def]
    s = await manager.open_session()
    await s.append(PROMPT[:3])
    res = await s.score(PROMPT[3:], top_k=3, commit=False)
    assert s.length == 3
    state = tiny_lm.new_state()
    lp = torch.log_softmax(tiny_lm.extend(state, PROMPT), dim=-1)
    tiny_lm.release(state)
    for i, t in enumerate(PROMPT[3:]):
        assert res.token_logprobs[i] == pytest.approx(float(lp[2 + i, t]), abs=1e-4)
    assert len(res.top_ids) == len(PROMPT) - 3 + 1
    assert res.top_ids[-1][0] == int(lp[-1].argmax())
    assert list(res.top_logprobs[0]) == sorted(res.top_logprobs[0], reverse=True)
    res2 = await s.score(PROMPT[3:], top_k=0)
    assert s.length == len(PROMPT) and res2.top_ids[0] == ()
    assert res2.token_logprobs == pytest.approx(res.token_logprobs, abs=1e-4)
    empty = await s.score([], top_k=1)
    assert empty.token_logprobs == () and empty.top_ids[0][0] == res.top_ids[-1][0]


async def test_rollback_then_continue(manager, tiny_lm) -> None:  # type: ignore[no-untyped-def]
    s = await manager.open_session()
    await s.append(PROMPT)
    _ = [c async for c in s.generate(5)]
    assert await s.rollback(2) == 2 and s.length == 2
    r = await s.verify([])
    assert r.next_token == greedy_reference(tiny_lm, PROMPT[:2], 1)[0]
    with pytest.raises(InvalidRequest, match="cannot roll back to length 9; the session holds 3"):
        await s.rollback(9)
    await s.rollback(0)
    with pytest.raises(InvalidRequest, match="verify needs at least one committed token"):
        await s.verify([1])


async def test_invalid_requests_leave_state_unchanged(manager) -> None:  # type: ignore[no-untyped-def]
    s = await manager.open_session()
    await s.append(PROMPT)
    with pytest.raises(InvalidRequest, match="token id 999 outside the vocabulary"):
        await s.verify([1, 999])
    q = SparseProbs(ids=((1,),), probs=((1.0,),))
    with pytest.raises(InvalidRequest, match="draft_probs has 1 rows for a draft of 2 tokens"):
        await s.verify([1, 2], q)
    assert s.length == len(PROMPT)
    s2 = await manager.open_session(sampling=SamplingParams(temperature=1.0, seed=1))
    await s2.append(PROMPT)
    with pytest.raises(InvalidRequest, match="draft token 2 at position 0 has probability 0"):
        await s2.verify([2], q)
    with pytest.raises(InvalidRequest, match="serves model 'tiny-byte', not 'gpt-5'"):
        await manager.open_session(model="gpt-5")
    with pytest.raises(InvalidRequest, match="already opened"):
        await s.open()


async def test_session_limits(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    cfg = CloudConfig(max_tokens=20, max_draft=4, max_pending=1, max_sessions=2, max_top_k=3)
    async with SessionManager(tiny_lm, config=cfg) as m:
        s = await m.open_session()
        with pytest.raises(SessionLimitExceeded, match=r"session would hold 21 tokens \(max_tokens=20\)") as e:
            await s.append(list(range(21)))
        assert (e.value.limit_name, e.value.value, e.value.limit) == ("max_tokens", 21, 20)
        await s.append(list(range(10)))
        with pytest.raises(SessionLimitExceeded, match="draft of 5 tokens exceeds max_draft=4"):
            await s.verify([1] * 5)
        with pytest.raises(SessionLimitExceeded, match="top_k=4 is outside"):
            await s.score([1], top_k=4)
        first = asyncio.ensure_future(s.verify([1, 2]))
        await asyncio.sleep(0)
        with pytest.raises(SessionLimitExceeded, match=r"already has 1 requests pending \(max_pending=1\)"):
            await s.verify([1])
        await first
        await m.open_session()
        with pytest.raises(ServerOverloaded, match="maximum of 2 sessions"):
            await m.open_session()


async def test_generate_and_chat_stop_at_max_tokens(tiny_lm, byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Reaching the session's token limit ends a generation with "length"; it is not refused."""
    cfg = CloudConfig(max_tokens=20)
    async with SessionManager(tiny_lm, config=cfg) as m:
        s = await m.open_session()
        await s.append(list(range(10)))
        chunks = [c async for c in s.generate(11)]
        ids = [t for c in chunks for t in c.token_ids]
        assert len(ids) == 10 and s.length == 20
        assert chunks[-1].finish_reason == "length" and chunks[-1].length == 20
        assert all(c.finish_reason is None for c in chunks[:-1])
        full = [c async for c in s.generate(5)]
        assert [(c.token_ids, c.finish_reason) for c in full] == [((), "length")]
        with pytest.raises(SessionLimitExceeded, match=r"session would hold 21 tokens \(max_tokens=20\)"):
            await s.verify([])
    # Chat: the reply stops at the room the prompt leaves; a prompt with no room is refused.
    hi = [{"role": "user", "content": "hi"}]
    async with SessionManager(tiny_lm, tokenizer=byte_tokenizer) as probe:
        room = len(probe.chat_prompt_ids(as_messages(hi))) + 3
    async with SessionManager(tiny_lm, tokenizer=byte_tokenizer, config=CloudConfig(max_tokens=room)) as m:
        s = await m.open_session()
        res = await s.chat(hi, max_tokens=200)
        assert res.completion_tokens <= 3 and res.prompt_tokens + res.completion_tokens <= room
        with pytest.raises(SessionLimitExceeded, match=f"leaves no room under max_tokens={room}"):
            await s.chat([{"role": "user", "content": "x" * room}], max_tokens=5)


async def test_lru_eviction_under_kv_budget(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    bpt = SessionManager(tiny_lm).kv_bytes_per_token
    cfg = CloudConfig(kv_budget_bytes=bpt * 600)  # caches are allocated 256 positions at a time
    async with SessionManager(tiny_lm, config=cfg) as m:
        a = await m.open_session()
        b = await m.open_session()
        await a.append(list(range(20)))
        await b.append(list(range(20)))
        await a.verify([])  # a is now more recently used than b
        c = await m.open_session()
        await c.append(list(range(20)))  # needs room: b (LRU) goes
        with pytest.raises(SessionEvicted, match=r"evicted \(memory\); open a new session and re-prefill") as e:
            await b.verify([1])
        assert e.value.reason == "memory"
        assert a.length == 21 and await a.verify([]) is not None
        assert m.kv_bytes() <= cfg.kv_budget_bytes
        with pytest.raises(SessionLimitExceeded, match="kv_budget_bytes"):
            await c.append([i % 256 for i in range(520)])
        # the evicted edge re-prefills on a new session
        b2 = await m.open_session()
        await b2.append(list(range(20)))
        assert b2.length == 20


async def test_idle_timeout(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    async with SessionManager(tiny_lm, config=CloudConfig(idle_timeout_s=0.2)) as m:
        s = await m.open_session()
        await s.append(PROMPT)
        await asyncio.sleep(0.6)
        with pytest.raises(SessionEvicted) as e:
            await s.verify([])
        assert e.value.reason == "idle"
        assert m.sessions == ()


async def test_closed_session_and_close_idempotent(manager) -> None:  # type: ignore[no-untyped-def]
    s = manager.session()
    with pytest.raises(SessionNotOpen, match="not open; call open"):
        await s.append([1])
    await s.open()
    await s.close()
    await s.close()
    with pytest.raises(SessionNotOpen, match="is closed"):
        await s.verify([])


async def test_cross_session_batching_equals_unbatched(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    prompts = [[i + 1, 2 * i + 3, 7, i] for i in range(6)]
    refs = [greedy_reference(tiny_lm, p, 16) for p in prompts]
    cfg = CloudConfig(batch_window_s=0.02, max_batch=8)
    async with SessionManager(tiny_lm, config=cfg) as m:
        sessions = [await m.open_session() for _ in prompts]
        await asyncio.gather(*(s.append(p) for s, p in zip(sessions, prompts)))
        before_f, before_s = m.batcher.forwards, m.batcher.sequences

        async def decode(s, ref):  # type: ignore[no-untyped-def]
            out: list[int] = []
            while len(out) < 16:
                r = await s.verify(ref[len(out):len(out) + 2])
                out += ref[len(out):len(out) + r.accepted] + [r.next_token]
            return out[:16]

        outs = await asyncio.gather(*(decode(s, r) for s, r in zip(sessions, refs)))
        assert outs == refs
        forwards = m.batcher.forwards - before_f
        sequences = m.batcher.sequences - before_s
        assert sequences / forwards > 3, (forwards, sequences)
        text = m.metrics.render().decode()
        assert "tether_batch_size_bucket" in text and "tether_tokens_accepted_total" in text


async def test_cancelled_verify_keeps_session_consistent(manager, tiny_lm) -> None:  # type: ignore[no-untyped-def]
    s = await manager.open_session()
    await s.append(PROMPT)
    task = asyncio.ensure_future(s.verify([1, 2, 3]))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s.length == len(PROMPT)
    r = await s.verify([])
    assert r.next_token == greedy_reference(tiny_lm, PROMPT, 1)[0]


async def test_continue_hidden_split_computing(manager, tiny_lm) -> None:  # type: ignore[no-untyped-def]
    layer = 2
    edge_state = tiny_lm.new_state()
    h = tiny_lm.run_layers(edge_state, tiny_lm.embed(PROMPT), 0, layer)
    s = await manager.open_session()
    r = await s.continue_hidden(h.numpy(), layer=layer, top_k=2)
    assert r.next_token == greedy_reference(tiny_lm, PROMPT, 1)[0] == r.top_ids[0]
    assert r.length == len(PROMPT) == s.length
    h2 = tiny_lm.run_layers(edge_state, tiny_lm.embed([r.next_token]), 0, layer)
    r2 = await s.continue_hidden(h2.numpy().astype(np.float16), layer=layer)
    assert r2.next_token == greedy_reference(tiny_lm, PROMPT, 2)[1]
    with pytest.raises(InvalidRequest, match="splits at layer 2, got 3"):
        await s.continue_hidden(h2.numpy(), layer=3)
    with pytest.raises(InvalidRequest, match="needs a token session"):
        await s.verify([])
    with pytest.raises(InvalidRequest, match=r"hidden states must be \[n >= 1, 64\]"):
        await s.continue_hidden(np.zeros((1, 3), np.float32), layer=layer)
    await s.rollback(len(PROMPT))
    r3 = await s.continue_hidden(h2.numpy(), layer=layer)
    assert r3.next_token == r2.next_token
    tiny_lm.release(edge_state)


async def test_chat_and_json_mode(manager) -> None:  # type: ignore[no-untyped-def]
    s = await manager.open_session()
    res = await s.chat([{"role": "user", "content": "hi"}], max_tokens=8)
    assert res.prompt_tokens > 5 and 0 < res.completion_tokens <= 8
    assert res.finish_reason in ("stop", "length")
    for temperature in (0.0, 1.0):
        res = await s.chat([{"role": "user", "content": "answer in JSON"}], max_tokens=40,
                           temperature=temperature, json_mode=True)
        assert isinstance(json.loads(res.text), dict), res.text
    assert s.length == 0  # chat does not touch the committed sequence


def _tiny_sampling_model():  # type: ignore[no-untyped-def]
    from cloudkit import build_tiny_byte_model

    from tether.runtime import TorchCausalLM

    return TorchCausalLM(build_tiny_byte_model(seed=3, vocab=6, head_scale=40.0, layers=2), name="tiny6")


async def test_sampling_verify_matches_target_distribution_on_tiny_model() -> None:
    """Chi-square: two tokens committed by draft+verify follow the model's own sampling law."""
    from _stats import chi_square_pvalue

    from tether.cloud._acceptance import target_probs

    model = _tiny_sampling_model()
    vocab = model.info.vocab_size
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
    prompt = [1, 4, 2]
    st = model.new_state()
    p0 = target_probs(model.extend(st, prompt)[-1:], sampling)[0]
    p1 = []
    for a in range(vocab):
        f = model.fork(st)
        p1.append(target_probs(model.extend(f, [a]), sampling)[0])
        model.release(f)
    expected = [float(p0[a] * p1[a][b]) for a in range(vocab) for b in range(vocab)]

    q_rows = ((0.1, 0.5, 0.2, 0.2), (0.25, 0.25, 0.25, 0.25))  # draft q over tokens 0..3 (exact)
    q = SparseProbs(ids=((0, 1, 2, 3), (0, 1, 2, 3)), probs=q_rows)
    rng = np.random.default_rng(0)
    counts = [0] * (vocab * vocab)
    async with SessionManager(model) as m:
        s = await m.open_session(sampling=sampling)
        await s.append(prompt)
        for _ in range(1500):
            draft = [int(rng.choice(4, p=q_rows[0])), int(rng.choice(4, p=q_rows[1]))]
            r = await s.verify(draft, q)
            out = draft[:r.accepted] + [r.next_token]
            if len(out) < 2:
                out.append((await s.verify([])).next_token)
            counts[out[0] * vocab + out[1]] += 1
            await s.rollback(len(prompt))
    pvalue = chi_square_pvalue(counts, expected)
    assert pvalue > 1e-3, pvalue
