"""The remote model of Minion and MinionS: a chat operation, from the Tether cloud or any OpenAI-compatible API.

What belongs here: `ChatModel` (the one operation the protocols need), `SessionChat` over a
Tether cloud session (in-process or over the encrypted protocol) and `OpenAIChat` over httpx
(a frontier API, vLLM, llama.cpp's server...), with error translation at the boundary.
What does not: prompts or protocol logic.

Only what the protocols put in `messages` is sent: see docs/minions.md for exactly what that is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import httpx

from tether.contract import ChatResult, CloudSessionAPI, InvalidRequest, SessionLimitExceeded, UnsupportedOperation
from tether.edge._errors import CloudUnavailableError
from tether.edge.minions._plan import MinionsError
from tether.edge._remote import CloudConnector
from tether.errors import ConfigurationError


class RemoteChatError(MinionsError):
    """The remote model refused a chat request (an HTTP 4xx, or the cloud's `InvalidRequest`).

    Attributes:
        status: the HTTP status, or None for a Tether cloud.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@runtime_checkable
class ChatModel(Protocol):
    """The remote (planner) model: chat completions. Implementations must be safe to call in sequence."""

    name: str

    async def chat(
        self, messages: Sequence[Mapping[str, str]], *, max_tokens: int, temperature: float = 0.0,
        json_mode: bool = False,
    ) -> ChatResult:
        """One chat completion.

        Raises:
            CloudUnavailableError: the remote could not be reached or failed.
            RemoteChatError: the remote refused the request itself.
        """
        ...

    async def aclose(self) -> None:
        """Release the connection or session."""
        ...


class SessionChat:
    """Chat through a Tether cloud session (the cloud's own model; default of `EdgeClient.ask`).

    The session is opened on first use and kept for the whole `ask` (one session, in order).
    JSON mode is asked for when the cloud reports the capability.

    Args:
        connector: where the session comes from (`InProcessCloud`, the remote client, a link emulator).
    """

    def __init__(self, connector: CloudConnector) -> None:
        self.connector = connector
        self.name = "tether-cloud"
        self._session: CloudSessionAPI | None = None
        self._json = False

    async def _get(self) -> CloudSessionAPI:
        if self._session is None:
            try:
                session = await self.connector.new_session()
                info = await session.open()
            except (InvalidRequest, UnsupportedOperation) as exc:
                raise RemoteChatError(f"the cloud refused to open a session: {exc}") from exc
            except Exception as exc:
                raise CloudUnavailableError("could not open a cloud session for the planner", cause=exc) from exc
            if not info.capabilities.chat:
                raise RemoteChatError(f"the cloud model {info.model!r} does not support chat")
            self.name = info.model
            self._json = info.capabilities.json_mode
            self._session = session
        return self._session

    async def chat(
        self, messages: Sequence[Mapping[str, str]], *, max_tokens: int, temperature: float = 0.0,
        json_mode: bool = False,
    ) -> ChatResult:
        session = await self._get()
        try:
            return await session.chat([dict(m) for m in messages], max_tokens=max_tokens, temperature=temperature,
                                      json_mode=json_mode and self._json)
        except (InvalidRequest, UnsupportedOperation, SessionLimitExceeded) as exc:
            raise RemoteChatError(f"the cloud refused the chat request: {exc}") from exc
        except MinionsError:
            raise
        except Exception as exc:
            self._session = None  # a failed session is never reused
            raise CloudUnavailableError(f"the cloud chat request failed ({type(exc).__name__})", cause=exc) from exc

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                await session.close()
            except Exception:  # closing is best effort; the server evicts idle sessions anyway
                pass


class OpenAIChat:
    """Chat through any OpenAI-compatible ``/chat/completions`` endpoint, with httpx.

    Args:
        base_url: the API root, e.g. ``"https://api.example.com/v1"`` or ``"http://gpu-box:8000/v1"``.
        model: the model name the endpoint expects.
        api_key: sent as ``Authorization: Bearer ...`` when given.
        json_mode: ask for ``response_format={"type": "json_object"}``; when the server
            rejects it (HTTP 400 naming response_format) the request is retried once
            without it and JSON mode stays off for this client.
        timeout: seconds per request.
        max_response_bytes: larger responses are refused before decoding.
        transport: an httpx transport (tests use an in-memory one).
        headers: extra headers.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        json_mode: bool = True,
        timeout: float = 120.0,
        max_response_bytes: int = 1 << 20,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ConfigurationError("model must be a non-empty string")
        hdrs = dict(headers or {})
        if api_key:
            hdrs["Authorization"] = f"Bearer {api_key}"
        self.name = model
        self.json_mode = json_mode
        self.max_response_bytes = max_response_bytes
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._client = httpx.AsyncClient(timeout=timeout, transport=transport, headers=hdrs)

    async def chat(
        self, messages: Sequence[Mapping[str, str]], *, max_tokens: int, temperature: float = 0.0,
        json_mode: bool = False,
    ) -> ChatResult:
        body: dict[str, Any] = {
            "model": self.name,
            "messages": [{"role": str(m["role"]), "content": str(m["content"])} for m in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        use_json = json_mode and self.json_mode
        if use_json:
            body["response_format"] = {"type": "json_object"}
        response = await self._post(body)
        if use_json and response.status_code == 400 and b"response_format" in response.content[:4096]:
            self.json_mode = False
            body.pop("response_format")
            response = await self._post(body)
        return self._result(response, body)

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self._client.post(self._url, json=body)
        except httpx.HTTPError as exc:
            raise CloudUnavailableError(f"could not reach {self._url}: {type(exc).__name__}", cause=exc) from exc

    def _result(self, response: httpx.Response, body: dict[str, Any]) -> ChatResult:
        status = response.status_code
        if len(response.content) > self.max_response_bytes:
            raise RemoteChatError(f"response of {len(response.content)} bytes exceeds {self.max_response_bytes}",
                                  status=status)
        if status >= 500 or status == 429:
            raise CloudUnavailableError(f"{self._url} answered HTTP {status}")
        if status >= 400:
            raise RemoteChatError(f"{self._url} refused the request: HTTP {status}{_api_error(response)}",
                                  status=status)
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RemoteChatError(f"{self._url} sent a malformed completion", status=status) from exc
        usage = data.get("usage") if isinstance(data, dict) else None
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if not isinstance(prompt, int):  # no usage reported: estimate at ~4 characters a token
            prompt = len(json.dumps(body["messages"])) // 4
        if not isinstance(completion, int):
            completion = max(1, len(text) // 4)
        length = choice.get("finish_reason") == "length"
        return ChatResult(text=text, prompt_tokens=prompt, completion_tokens=completion,
                          finish_reason="length" if length else "stop")

    async def aclose(self) -> None:
        await self._client.aclose()


def _api_error(response: httpx.Response) -> str:
    """The ``error.message`` of an OpenAI-style error body, cut short ("" when there is none)."""
    try:
        err = response.json().get("error")
        message = err.get("message") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        return ""
    return f" ({message[:200]})" if isinstance(message, str) and message else ""
