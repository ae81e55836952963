"""Remote models: `OpenAIChat` over an in-memory transport and the cloud's own HTTP app; `SessionChat`."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tether.edge import CloudUnavailableError, OpenAIChat, RemoteChatError, SessionChat
from tether.errors import ConfigurationError

MSGS = [{"role": "user", "content": "hi"}]


def completion(text: str, usage: dict[str, int] | None = None, finish: str = "stop") -> dict[str, Any]:
    body: dict[str, Any] = {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return body


class Endpoint:
    """An in-memory OpenAI-compatible server: records requests, replies from a function."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        result = self.reply(json.loads(request.content))
        return result if isinstance(result, httpx.Response) else httpx.Response(200, json=result)

    def client(self, **kwargs: Any) -> OpenAIChat:
        return OpenAIChat("http://planner.test/v1", "big-model", transport=httpx.MockTransport(self), **kwargs)


async def test_request_shape_usage_and_auth() -> None:
    ep = Endpoint(lambda body: completion('{"a": 1}', {"prompt_tokens": 11, "completion_tokens": 3}))
    chat = ep.client(api_key="sk-test")
    res = await chat.chat(MSGS, max_tokens=50, json_mode=True)
    assert (res.text, res.prompt_tokens, res.completion_tokens, res.finish_reason) == ('{"a": 1}', 11, 3, "stop")
    req = ep.requests[0]
    assert str(req.url) == "http://planner.test/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-test"
    assert json.loads(req.content) == {"model": "big-model", "messages": MSGS, "max_tokens": 50, "temperature": 0.0,
                                       "response_format": {"type": "json_object"}}
    await chat.aclose()


async def test_json_mode_falls_back_when_the_engine_lacks_it() -> None:
    def reply(body: dict[str, Any]) -> Any:
        if "response_format" in body:
            return httpx.Response(400, json={"error": {"message": "response_format is not supported"}})
        return completion("ok", finish="length")

    ep = Endpoint(reply)
    chat = ep.client()
    res = await chat.chat(MSGS, max_tokens=5, json_mode=True)
    assert res.text == "ok" and res.finish_reason == "length" and not chat.json_mode
    await chat.chat(MSGS, max_tokens=5, json_mode=True)
    assert len(ep.requests) == 3  # no second probe of response_format
    # No usage reported: estimated, never zero.
    assert res.prompt_tokens > 0 and res.completion_tokens > 0


@pytest.mark.parametrize(("status", "error"), [(500, CloudUnavailableError), (429, CloudUnavailableError),
                                               (401, RemoteChatError), (404, RemoteChatError)])
async def test_http_errors_are_typed(status: int, error: type) -> None:
    chat = Endpoint(lambda body: httpx.Response(status, text="secret internal detail")).client()
    with pytest.raises(error) as info:
        await chat.chat(MSGS, max_tokens=5)
    assert "secret internal detail" not in str(info.value)


async def test_malformed_and_oversized_responses() -> None:
    chat = Endpoint(lambda body: {"choices": []}).client()
    with pytest.raises(RemoteChatError, match="malformed completion"):
        await chat.chat(MSGS, max_tokens=5)
    big = Endpoint(lambda body: completion("x" * 5000)).client(max_response_bytes=1000)
    with pytest.raises(RemoteChatError, match="exceeds 1000"):
        await big.chat(MSGS, max_tokens=5)


async def test_transport_failure_is_cloud_unavailable() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    chat = OpenAIChat("http://planner.test/v1", "m", transport=httpx.MockTransport(fail))
    with pytest.raises(CloudUnavailableError, match="could not reach"):
        await chat.chat(MSGS, max_tokens=5)


def test_configuration_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="base_url must start with http"):
        OpenAIChat("planner.test", "m")
    with pytest.raises(ConfigurationError, match="model must be a non-empty string"):
        OpenAIChat("http://x", "")


# -- against Tether's own cloud: its OpenAI-compatible app, and a session ----------------------


@pytest.fixture
async def byte_manager(tiny_byte_hf: Any, byte_tokenizer: Any) -> Any:
    from tether.cloud import CloudConfig, SessionManager
    from tether.runtime import TorchCausalLM

    manager = SessionManager(TorchCausalLM(tiny_byte_hf, name="tiny-byte-cloud"), tokenizer=byte_tokenizer,
                             config=CloudConfig(batch_window_s=0.0))
    await manager.start()
    yield manager
    await manager.aclose()


async def test_openai_chat_against_the_cloud_http_app(byte_manager: Any) -> None:
    from tether.cloud._openai import OpenAIApp

    app = OpenAIApp(byte_manager, api_key="k").app
    wrong = OpenAIChat("http://cloud.test/v1", "gpt-9", api_key="k", transport=httpx.ASGITransport(app=app))
    with pytest.raises(RemoteChatError, match=r"HTTP 404 \(this server serves model .*, not 'gpt-9'\)"):
        await wrong.chat(MSGS, max_tokens=4)
    chat = OpenAIChat("http://cloud.test/v1", byte_manager.model_name, api_key="k",
                      transport=httpx.ASGITransport(app=app))
    res = await chat.chat(MSGS, max_tokens=24, json_mode=True)
    json.loads(res.text)  # the cloud's JSON mode: a single JSON object
    assert res.prompt_tokens > 0 and 0 < res.completion_tokens <= 24
    await chat.aclose()


async def test_session_chat_over_the_in_process_cloud(byte_manager: Any) -> None:
    from tether.edge import InProcessCloud

    chat = SessionChat(InProcessCloud(byte_manager))
    res = await chat.chat(MSGS, max_tokens=16, json_mode=True)
    json.loads(res.text)
    assert res.prompt_tokens > 0
    await chat.aclose()
    await chat.aclose()  # idempotent
