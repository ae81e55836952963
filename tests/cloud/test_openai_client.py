"""The OpenAI-compatible port driven by the official `openai` package, on loopback.

The served model is scripted: after any prompt it continues a fixed text, whose tokenizer
merges some letter pairs, so the tests know the text to expect and can place stop strings
across tokens and inside them. Its logits leave the scripted token only a third of the
mass, so sampling without top-k/top-p wanders off the script and greedy stays on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import openai
import pytest
import torch

from cloudkit import CHAT_TEMPLATE, UvicornServer, build_tiny_byte_model, slow_model
from tether.cloud._config import CloudConfig
from tether.cloud._manager import SessionManager
from tether.cloud._openai import OpenAIApp
from tether.protocol import KeyPair
from tether.runtime import CausalLM, KVState, TorchCausalLM

KEY = "sekrit"
SCRIPT = "the cat sat on the mat, then the hen ate. "
MERGES = [("t", "h"), ("a", "t"), ("e", "n"), ("h", "e"), ("Ġ", "c"), ("o", "n"), ("Ġ", "t")]


def build_merged_tokenizer():  # type: ignore[no-untyped-def]
    """Byte-level BPE: ids 0..255 are bytes, then a few merged pairs, then <|im_end|> (eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


class ScriptedLM(CausalLM):
    """Wraps a real tiny model (for its KV states); the next token after position p is
    ``script[(p + 1) % len(script)]`` with logit 5 against 0 for every other token."""

    def __init__(self, inner: CausalLM, script: Sequence[int]) -> None:
        self.inner = inner
        self.info = inner.info
        self.script = list(script)

    def _rows(self, start: int, n: int) -> torch.Tensor:
        out = torch.zeros(n, self.info.vocab_size)
        for j in range(n):
            out[j, self.script[(start + j + 1) % len(self.script)]] = 5.0
        return out

    def new_state(self) -> KVState:
        return self.inner.new_state()

    def extend(self, state: KVState, token_ids: Sequence[int]) -> torch.Tensor:
        start = state.length
        self.inner.extend(state, token_ids)
        return self._rows(start, len(token_ids))

    def extend_batch(self, states: Sequence[KVState], token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        starts = [s.length for s in states]
        self.inner.extend_batch(states, token_ids)
        return [self._rows(start, len(ids)) for start, ids in zip(starts, token_ids)]

    def truncate(self, state: KVState, length: int) -> None:
        self.inner.truncate(state, length)

    def fork(self, state: KVState) -> KVState:
        return self.inner.fork(state)

    def release(self, state: KVState) -> None:
        self.inner.release(state)


@pytest.fixture(scope="module")
def merged_tokenizer():  # type: ignore[no-untyped-def]
    return build_merged_tokenizer()


@pytest.fixture(scope="module")
def scripted_lm(merged_tokenizer):  # type: ignore[no-untyped-def]
    vocab = len(merged_tokenizer)
    inner = TorchCausalLM(build_tiny_byte_model(seed=0, vocab=vocab, layers=1), name="scripted")
    script = merged_tokenizer.encode(SCRIPT, add_special_tokens=False)
    return ScriptedLM(inner, script)


@pytest.fixture
async def port(scripted_lm, merged_tokenizer) -> AsyncIterator[tuple[str, SessionManager, OpenAIApp]]:  # type: ignore[no-untyped-def]
    config = CloudConfig(max_tokens=512, batch_window_s=0.0, max_request_bytes=64 * 1024)
    async with SessionManager(scripted_lm, tokenizer=merged_tokenizer, config=config) as m:
        app = OpenAIApp(m, api_key=KEY)
        async with UvicornServer(app.app) as srv:
            yield srv.url, m, app


@pytest.fixture
async def client(port) -> AsyncIterator[openai.AsyncOpenAI]:  # type: ignore[no-untyped-def]
    async with openai.AsyncOpenAI(base_url=port[0] + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


MSGS = [{"role": "user", "content": "hi"}]


async def _reference(client: openai.AsyncOpenAI, prompt: str, n: int) -> tuple[str, list[str]]:
    """The greedy completion of `prompt` and the text of each token generated."""
    r = await client.completions.create(model="scripted", prompt=prompt, max_tokens=n, temperature=0, logprobs=0)
    assert r.choices[0].logprobs is not None and r.choices[0].logprobs.tokens is not None
    return r.choices[0].text, r.choices[0].logprobs.tokens


# -- models -----------------------------------------------------------------------------------


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == ["scripted"]
    assert page.data[0].object == "model" and page.data[0].owned_by == "tether"
    model = await client.models.retrieve("scripted")
    assert model.id == "scripted" and model.object == "model" and isinstance(model.created, int)


async def test_unknown_model_is_a_json_404_model_not_found(client: openai.AsyncOpenAI, port) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("gpt-9")
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert info.value.type == "invalid_request_error" and "gpt-9" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-9", messages=MSGS, max_tokens=2)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as info:
        await client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    assert info.value.code == "model_not_found"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as c:
        r = await c.get(f"{port[0]}/v1/nowhere")
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = await c.get(f"{port[0]}/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
        r = await c.get(f"{port[0]}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# -- chat -------------------------------------------------------------------------------------


async def test_chat_completion_fields(client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "scripted"
    assert isinstance(r.created, int)
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content and choice.message.content in SCRIPT * 2
    assert choice.logprobs is None
    assert r.usage is not None and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


async def _chunks(stream: Any) -> list[Any]:
    return [c async for c in stream]


async def test_chat_stream_usage_only_when_asked(client: openai.AsyncOpenAI) -> None:
    plain = await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=8, temperature=0)
    chunks = await _chunks(await client.chat.completions.create(
        model="scripted", messages=MSGS, max_tokens=8, temperature=0, stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.object == "chat.completion.chunk" and c.model == "scripted" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    chunks = await _chunks(await client.chat.completions.create(
        model="scripted", messages=MSGS, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 8 and last.usage.prompt_tokens == plain.usage.prompt_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


async def test_chat_logprobs(client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=5, temperature=0,
                                             logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob < 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes or []).decode() == t.token
    chunks = await _chunks(await client.chat.completions.create(
        model="scripted", messages=MSGS, max_tokens=5, temperature=0, logprobs=True, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert [t.token for t in streamed] == [t.token for t in content]
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=2, top_logprobs=2)
    assert info.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=2, logprobs=True,
                                             top_logprobs=99)
    assert info.value.param == "top_logprobs" and "max_top_k" in info.value.message


async def test_chat_content_parts_are_joined_and_other_parts_refused(client: openai.AsyncOpenAI) -> None:
    joined = await client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "hello\nthere"}], max_tokens=3, temperature=0)
    parts = await client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": [{"type": "text", "text": "hello"},
                                                                 {"type": "text", "text": "there"}]}],
        max_tokens=3, temperature=0)
    assert parts.usage.prompt_tokens == joined.usage.prompt_tokens  # type: ignore[union-attr]
    assert parts.choices[0].message.content == joined.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="scripted", max_tokens=3,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert info.value.param == "messages[0].content[0].type" and "image_url" in info.value.message


async def test_chat_honours_top_p_and_top_k(client: openai.AsyncOpenAI, scripted_lm, merged_tokenizer) -> None:  # type: ignore[no-untyped-def]
    greedy = (await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=12,
                                                   temperature=0)).choices[0].message.content
    free = set()
    for seed in range(3):
        free.add((await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=12,
                                                       temperature=1.0, seed=seed)).choices[0].message.content)
    assert greedy not in free  # without a cut, sampling wanders off the script
    for seed in range(3):
        for extra in ({"top_p": 0.1}, {"extra_body": {"top_k": 1}}):
            r = await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=12,
                                                     temperature=1.0, seed=seed, **extra)  # type: ignore[arg-type]
            assert r.choices[0].message.content == greedy, extra
            chunks = await _chunks(await client.chat.completions.create(
                model="scripted", messages=MSGS, max_tokens=12, temperature=1.0, seed=seed, stream=True,
                **extra))  # type: ignore[arg-type]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy, extra
        r = await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=12, temperature=1.0,
                                                 seed=seed, response_format={"type": "json_object"},
                                                 extra_body={"top_k": 1})
        assert r.choices[0].finish_reason in ("stop", "length")


async def test_session_chat_honours_top_p_and_top_k(scripted_lm, merged_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The session API's chat (non-streamed and streamed) takes top_p and top_k too."""
    async with SessionManager(scripted_lm, tokenizer=merged_tokenizer, config=CloudConfig(batch_window_s=0.0)) as m:
        s = await m.open_session()
        greedy = (await s.chat(MSGS, max_tokens=10)).text
        for seed in range(3):
            assert (await s.chat(MSGS, max_tokens=10, temperature=1.0, top_k=1)).text == greedy
            assert (await s.chat(MSGS, max_tokens=10, temperature=1.0, top_p=0.1)).text == greedy
            streamed = [d async for d, _ in s.chat_stream(MSGS, max_tokens=10, temperature=1.0, top_k=1)]
            assert "".join(streamed) == greedy
        texts = {(await s.chat(MSGS, max_tokens=10, temperature=1.0)).text for _ in range(3)}
        assert greedy not in texts
        await s.close()


# -- completions ------------------------------------------------------------------------------


async def test_completions_echo_and_logprobs(client: openai.AsyncOpenAI, merged_tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompt = "the cat"
    r = await client.completions.create(model="scripted", prompt=prompt, max_tokens=4, temperature=0,
                                        echo=True, logprobs=2)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "scripted"
    choice = r.choices[0]
    assert choice.text.startswith(prompt) and choice.finish_reason == "length"
    n_prompt = len(merged_tokenizer.encode(prompt, add_special_tokens=False))
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == n_prompt + 4
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs is not None and lp.token_logprobs[0] is None
    assert all(isinstance(v, float) for v in lp.token_logprobs[1:])
    assert lp.top_logprobs is not None and lp.top_logprobs[0] is None
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])  # type: ignore[arg-type]
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 4)

    plain = await client.completions.create(model="scripted", prompt=prompt, max_tokens=4, temperature=0)
    assert plain.choices[0].text == choice.text[len(prompt):] and plain.choices[0].logprobs is None
    chunks = await _chunks(await client.completions.create(model="scripted", prompt=prompt, max_tokens=4,
                                                           temperature=0, stream=True, logprobs=1))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert sum(len(c.choices[0].logprobs.tokens or []) for c in chunks if c.choices[0].logprobs) == 4
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    chunks = await _chunks(await client.completions.create(model="scripted", prompt=prompt, max_tokens=4,
                                                           temperature=0, stream=True,
                                                           stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    chunks = await _chunks(await client.completions.create(model="scripted", prompt=prompt, max_tokens=4,
                                                           temperature=0, stream=True, echo=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text


async def test_context_overflow_is_a_400_even_when_streaming(client: openai.AsyncOpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model="scripted", prompt="the cat", max_tokens=510, stream=stream)
        assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x" * 600}],
                                                 stream=stream)
        assert info.value.code == "context_length_exceeded"


def _mid_token_stops(text: str, pieces: list[str]) -> tuple[str, str]:
    """Two stop strings spanning two tokens: one starting inside a merged token, one ending
    inside one, each first found in `text` at that place."""
    assert "".join(pieces) == text
    offsets = [0]
    for p in pieces:
        offsets.append(offsets[-1] + len(p))
    starts = [(pieces[k][1:] + pieces[k + 1], offsets[k] + 1) for k in range(2, len(pieces) - 1)
              if len(pieces[k]) == 2]
    ends = [(pieces[j - 1] + pieces[j][:1], offsets[j - 1]) for j in range(3, len(pieces)) if len(pieces[j]) == 2]
    starts_inside = next(stop for stop, at in starts if text.index(stop) == at)
    ends_inside = next(stop for stop, at in ends if text.index(stop) == at)
    return starts_inside, ends_inside


async def test_stop_strings_work_on_text_and_are_left_out(client: openai.AsyncOpenAI, merged_tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompt = "once"
    full, pieces = await _reference(client, prompt, 30)
    starts_inside, ends_inside = _mid_token_stops(full, pieces)
    multi = full[10:14]  # four characters: several tokens
    for stop in (multi, starts_inside, ends_inside, [ends_inside, multi]):
        first = min(full.index(s) for s in ([stop] if isinstance(stop, str) else stop))
        want = full[:first]
        r = await client.completions.create(model="scripted", prompt=prompt, max_tokens=30, temperature=0,
                                            stop=stop)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop"), stop
        chunks = await _chunks(await client.completions.create(model="scripted", prompt=prompt, max_tokens=30,
                                                               temperature=0, stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == want, stop
        assert chunks[-1].choices[0].finish_reason == "stop"


async def test_chat_honours_stop(client: openai.AsyncOpenAI, merged_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ref = await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=30, temperature=0,
                                               logprobs=True)
    full = ref.choices[0].message.content or ""
    starts_inside, _ = _mid_token_stops(full, [t.token for t in ref.choices[0].logprobs.content or []])  # type: ignore[union-attr]
    for stop in (full[8:12], starts_inside):
        want = full[: full.index(stop)]
        r = await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=30, temperature=0,
                                                 stop=stop)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop"), stop
        chunks = await _chunks(await client.chat.completions.create(
            model="scripted", messages=MSGS, max_tokens=30, temperature=0, stop=[stop], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


# -- bad requests -----------------------------------------------------------------------------


async def test_max_tokens_zero_is_refused(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=0)
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="scripted", messages=MSGS, max_completion_tokens=0)
    assert info.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="scripted", prompt="x", max_tokens=0)
    assert info.value.param == "max_tokens"
    # Scoring a prompt (echo with no new tokens) stays possible, as in OpenAI's legacy API.
    r = await client.completions.create(model="scripted", prompt="the cat", max_tokens=0, echo=True, logprobs=1)
    assert r.choices[0].text == "the cat" and r.usage.completion_tokens == 0  # type: ignore[union-attr]


WRONG_TYPES = [
    ("/v1/completions", {"prompt": "x", "stop_token_ids": ["x"]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"prompt": "x", "seed": "1"}, "seed"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "model": 7}, "model"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": 3}, "messages"),
    ("/v1/chat/completions", {"messages": [3]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": 1, "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": MSGS, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": MSGS, "stop_token_ids": ["x"]}, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": MSGS, "stop_token_ids": [10**9]}, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": MSGS, "top_k": "many"}, "top_k"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": "json"}, "response_format"),
    ("/v1/chat/completions", {"messages": MSGS, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": MSGS, "logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {"messages": MSGS, "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize(("path", "body", "param"), WRONG_TYPES, ids=[p for _, _, p in WRONG_TYPES])
async def test_wrong_fields_get_400_naming_the_field(port, path: str, body: dict[str, Any], param: str) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as c:
        r = await c.post(port[0] + path, json={"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["type"] == "invalid_request_error"


async def test_body_size_is_checked_while_reading(port) -> None:  # type: ignore[no-untyped-def]
    url, m, _ = port
    host, portno = url.removeprefix("http://").split(":")
    limit = m.config.max_request_bytes
    # Declared too long: refused before any of the body is read.
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as c:
        r = await c.post(url + "/v1/completions", content=b"x" * (limit + 1))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # Chunked with no declared length: refused as soon as the limit is passed, while the
    # client is still sending (it never finishes the body).
    reader, writer = await asyncio.open_connection(host, int(portno))
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"x" * 4096
    for _ in range(limit // len(chunk) + 2):
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    assert b" 413 " in status
    writer.close()


async def test_api_key_is_compared_in_constant_time(port, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import hmac

    from tether.cloud import _openai

    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(_openai.hmac, "compare_digest", spy)
    async with httpx.AsyncClient() as c:
        assert (await c.get(port[0] + "/v1/models", headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await c.get(port[0] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200
    assert len(seen) == 2 and all(KEY.encode() in pair for pair in seen)


# -- shutdown ---------------------------------------------------------------------------------


async def test_shutdown_ends_an_openai_stream_at_once(scripted_lm, merged_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """On close (SIGTERM) a protocol request may drain for the grace period; an OpenAI stream
    ends at once with an error event instead of running on."""
    from tether.cloud._server import CloudServer
    from tether.edge import RemoteCloud

    server_keys, client_keys = KeyPair.generate(), KeyPair.generate()
    config = CloudConfig(batch_window_s=0.0, max_chat_tokens=2000, max_tokens=4096)
    m = SessionManager(slow_model(scripted_lm, 0.02), tokenizer=merged_tokenizer, config=config)
    server = CloudServer(m, keys=server_keys, http_port=0, api_key=KEY)
    await server.start()
    closing: asyncio.Task[None] | None = None
    try:
        cloud = await RemoteCloud.connect(server.url, client_keys, server_public_key=server_keys.public)
        s = await cloud.new_session()
        await s.open()
        await s.append([1, 2, 3])

        async def protocol_request() -> int:
            n = 0
            async for chunk in s.generate(80):
                n += len(chunk.token_ids)
            return n

        in_flight = asyncio.ensure_future(protocol_request())
        async with openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key=KEY, max_retries=0) as c:
            stream = await c.chat.completions.create(model="scripted", messages=MSGS, max_tokens=1500,
                                                     stream=True)
            got = 0
            with pytest.raises(openai.APIError) as info:
                async for _ in stream:
                    got += 1
                    if got == 3:
                        closing = asyncio.ensure_future(server.close(grace=30))
                        started = time.monotonic()
            assert time.monotonic() - started < 2.0
        assert "shutting down" in info.value.message
        assert not in_flight.done()  # the protocol request drains meanwhile
        assert await asyncio.wait_for(in_flight, 30) == 80
        await cloud.aclose()
    finally:
        await (closing if closing is not None else server.close(grace=0))


async def test_completions_end_at_eos_unless_ignore_eos(scripted_lm, merged_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """As in vLLM: end-of-sequence ends a completion (its token counted, its text not shown);
    `ignore_eos` (which `HttpCloudSession.generate` sends) generates through it."""
    eos = merged_tokenizer.eos_token_id
    script = merged_tokenizer.encode("ab", add_special_tokens=False) + [eos]
    lm = ScriptedLM(scripted_lm.inner, script)
    async with SessionManager(lm, tokenizer=merged_tokenizer, config=CloudConfig(batch_window_s=0.0)) as m:
        app = OpenAIApp(m).app
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://port") as c:
            # Prompt of 3 tokens: positions 0..2, so the next tokens are script[0], script[1], eos.
            body = {"prompt": [97, 98, 99], "max_tokens": 6, "temperature": 0, "logprobs": 0,
                    "return_tokens_as_token_ids": True}
            r = (await c.post("/v1/completions", json=body)).json()
            assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == "ab"
            assert r["choices"][0]["logprobs"]["tokens"][-1] == f"token_id:{eos}"
            assert r["usage"]["completion_tokens"] == 3
            r = (await c.post("/v1/completions", json={**body, "ignore_eos": True})).json()
            assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 6
            assert r["choices"][0]["text"] == "abab"
