"""Requests of the OpenAI-compatible port: read, type-checked and range-checked into frozen values.

What belongs here: `OpenAIError` (the port's one error, in OpenAI's JSON shape) and the
parsers that turn a request body into a `CompletionRequest` or `ChatRequest`, answering a
wrong field with 400 naming it (``param``). What does not: running requests (`_openai.py`).

A field the port cannot honour (penalties, logit bias, tools, ``n > 1``...) is refused with
400 rather than ignored, so a client never gets an answer to a question it did not ask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tether.contract import CHAT_ROLES, MAX_TEMPERATURE, ChatMessage, SamplingParams

__all__ = ["ChatRequest", "CompletionRequest", "OpenAIError", "PortLimits", "parse_chat", "parse_completion"]

MAX_STOP_STRINGS = 16
"""Most stop strings one request may give (OpenAI allows 4; vLLM any number)."""

MAX_STOP_LENGTH = 512
"""Longest stop string, in characters (held-back text is at most this long)."""


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: the HTTP status.
        message: what went wrong and what to do (never prompt text or internals).
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``,
            ``server_error``...).
        param: the request field at fault, if one is.
        code: a machine-readable code (``model_not_found``, ``invalid_type``...).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response (or of a streamed error event)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _kind(value: Any) -> str:
    return "null" if value is None else {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                                         list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class PortLimits:
    """What the served model and the config allow (checked while parsing).

    Attributes:
        vocab_size: token ids must be below it.
        max_top_k: most alternatives per position (``logprobs``, ``top_logprobs``).
        max_chat_tokens: most tokens one chat completion may generate.
    """

    vocab_size: int
    max_top_k: int
    max_chat_tokens: int


class _Fields:
    """Typed reads of one JSON object's fields; every failure names the field."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def _get(self, name: str) -> Any:
        return self.body.get(name)

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _bad(name, f"'{name}' must be a boolean, got {_kind(value)}", "invalid_type")
        return value

    def integer(self, name: str, default: int | None, *, lo: int | None = None, hi: int | None = None,
                why: str = "") -> int | None:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, f"'{name}' must be an integer, got {_kind(value)}", "invalid_type")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise _bad(name, f"'{name}' must be in {bounds}{why}, got {value}")
        return value

    def number(self, name: str, default: float, *, lo: float, hi: float, lo_open: bool = False) -> float:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(name, f"'{name}' must be a number, got {_kind(value)}", "invalid_type")
        x = float(value)
        if not math.isfinite(x) or x > hi or x < lo or (lo_open and x == lo):
            raise _bad(name, f"'{name}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value}")
        return x

    def token_ids(self, name: str, vocab_size: int) -> tuple[int, ...]:
        value = self._get(name)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise _bad(name, f"'{name}' must be an array of token ids (integers)", "invalid_type")
        if any(not 0 <= t < vocab_size for t in value):
            raise _bad(name, f"'{name}' holds a token id outside the vocabulary [0, {vocab_size})")
        return tuple(value)

    def stops(self) -> tuple[str, ...]:
        value = self._get("stop")
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise _bad("stop", f"'stop' must be a string or an array of strings, got {_kind(value)}", "invalid_type")
        if len(items) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in items):
            raise _bad("stop", f"'stop' takes at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_LENGTH} "
                               "characters each")
        return tuple(items)

    def refuse(self, name: str, allowed: tuple[Any, ...], what: str) -> None:
        """Answer 400 when `name` is set to anything but one of `allowed` (its no-op values)."""
        value = self._get(name)
        if value is not None and value not in allowed:
            raise _bad(name, f"'{name}' is not supported by this server ({what})", "unsupported_parameter")


# Fields the port cannot honour, with the values that mean "off" (accepted and ignored).
_REFUSED: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("n", (1,), "only one choice per request"),
    ("best_of", (1,), "only one choice per request"),
    ("presence_penalty", (0, 0.0), "no penalties"),
    ("frequency_penalty", (0, 0.0), "no penalties"),
    ("repetition_penalty", (1, 1.0), "no penalties"),
    ("logit_bias", ({},), "no logit bias"),
    ("suffix", ("",), "no insertion"),
    ("tools", ([],), "no tool calls"),
    ("functions", ([],), "no function calls"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """The fields both endpoints share.

    Attributes:
        model: the model asked for (None: the served one).
        max_tokens: most tokens to generate (None: as many as the context and the config allow).
        sampling: temperature, top-p, top-k and seed.
        stop: stop strings, matched on the text; the text ends before the first found.
        stop_token_ids: tokens that end the generation (vLLM extension).
        ignore_eos: keep generating past end-of-sequence (vLLM extension).
        stream: answer with server-sent events.
        include_usage: with `stream`, a last event with ``choices: []`` and the usage.
        logprobs: alternatives to return per generated token (None: no logprobs).
    """

    model: str | None
    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    stream: bool
    include_usage: bool
    logprobs: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CompletionRequest(GenerationRequest):
    """`/v1/completions`: a text or token-id prompt.

    Attributes:
        prompt: the prompt text, or its token ids.
        echo: put the prompt (and with `logprobs` its tokens' logprobs) before the output.
        prompt_logprobs: per prompt token, this many alternatives (vLLM extension).
        tokens_as_ids: name tokens ``token_id:N`` in logprobs (vLLM extension).
    """

    prompt: str | tuple[int, ...]
    echo: bool
    prompt_logprobs: int | None
    tokens_as_ids: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatRequest(GenerationRequest):
    """`/v1/chat/completions`.

    Attributes:
        messages: the conversation (text parts of each message's content joined).
        json_mode: constrain the reply to one JSON object (``response_format``).
    """

    messages: tuple[ChatMessage, ...]
    json_mode: bool


def _common(f: _Fields, limits: PortLimits, *, max_tokens: int | None) -> dict[str, Any]:
    for name, allowed, what in _REFUSED:
        f.refuse(name, allowed, what)
    model = f.body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"'model' must be a string, got {_kind(model)}", "invalid_type")
    top_k = f.integer("top_k", 0, lo=-1)
    sampling = SamplingParams(
        temperature=f.number("temperature", 1.0, lo=0.0, hi=MAX_TEMPERATURE),
        top_p=f.number("top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
        top_k=max(0, top_k or 0),  # vLLM spells "off" -1
        seed=f.integer("seed", None, lo=0, hi=2**63 - 1),
    )
    stream = f.boolean("stream", False)
    options = f.body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(options, dict):
            raise _bad("stream_options", f"'stream_options' must be an object, got {_kind(options)}", "invalid_type")
        include_usage = _Fields(options).boolean("include_usage", False)
    return {"model": model, "max_tokens": max_tokens, "sampling": sampling, "stop": f.stops(),
            "stop_token_ids": f.token_ids("stop_token_ids", limits.vocab_size),
            "ignore_eos": f.boolean("ignore_eos", False), "stream": stream, "include_usage": include_usage}


def _object(body: Any) -> _Fields:
    if not isinstance(body, dict):
        raise _bad("", "the request body must be a JSON object", "invalid_type")
    return _Fields(body)


def parse_completion(body: Any, limits: PortLimits) -> CompletionRequest:
    """Read a `/v1/completions` body.

    Raises:
        OpenAIError: 400 naming the first wrong field.
    """
    f = _object(body)
    echo = f.boolean("echo", False)
    # Legacy OpenAI scores a prompt with echo and max_tokens=0; otherwise at least one token.
    max_tokens = f.integer("max_tokens", 16, lo=0 if echo else 1,
                           why="" if echo else " (0 only with echo, to score the prompt)")
    why = f" (the server's max_top_k is {limits.max_top_k})"
    logprobs = f.integer("logprobs", None, lo=0, hi=limits.max_top_k, why=why)
    prompt_logprobs = f.integer("prompt_logprobs", None, lo=0, hi=limits.max_top_k, why=why)
    return CompletionRequest(**_common(f, limits, max_tokens=max_tokens),
                             logprobs=logprobs, prompt=_prompt(f.body.get("prompt"), limits.vocab_size), echo=echo,
                             prompt_logprobs=prompt_logprobs,
                             tokens_as_ids=f.boolean("return_tokens_as_token_ids", False))


def _prompt(value: Any, vocab_size: int) -> str | tuple[int, ...]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        if not value:
            raise _bad("prompt", "'prompt' is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if any(not 0 <= t < vocab_size for t in value):
            raise _bad("prompt", f"'prompt' holds a token id outside the vocabulary [0, {vocab_size})")
        return tuple(value)
    raise _bad("prompt", "'prompt' must be a non-empty string or array of token ids (one prompt only)",
               "invalid_type")


def parse_chat(body: Any, limits: PortLimits) -> ChatRequest:
    """Read a `/v1/chat/completions` body.

    Raises:
        OpenAIError: 400 naming the first wrong field.
    """
    f = _object(body)
    for name in ("tool_choice", "function_call"):
        f.refuse(name, ("none",), "no tool calls")
    cap = f" (the server's max_chat_tokens is {limits.max_chat_tokens})"
    max_name = "max_completion_tokens" if f.body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = f.integer(max_name, None, lo=1, hi=limits.max_chat_tokens, why=cap)
    wants = f.boolean("logprobs", False)
    top = f.integer("top_logprobs", None, lo=0, hi=limits.max_top_k,
                    why=f" (the server's max_top_k is {limits.max_top_k})")
    if top is not None and not wants:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    fmt = f.body.get("response_format")
    json_mode = False
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise _bad("response_format", "'response_format' must be an object with 'type' text, json_object or "
                                          "json_schema", "invalid_type")
        json_mode = kind != "text"
    if json_mode and wants:
        raise _bad("logprobs", "'logprobs' is not supported together with a JSON 'response_format'",
                   "unsupported_parameter")
    return ChatRequest(**_common(f, limits, max_tokens=max_tokens),
                       logprobs=(top or 0) if wants else None, messages=_messages(f.body.get("messages")),
                       json_mode=json_mode)


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", f"'messages' must be a non-empty array of messages, got {_kind(value)}",
                   "invalid_type")
    out: list[ChatMessage] = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"{where} must be an object with 'role' and 'content', got {_kind(m)}", "invalid_type")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in CHAT_ROLES:
            raise _bad(f"{where}.role", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if "content" not in m:
            raise _bad(f"{where}.content", f"{where} has no 'content'")
        out.append(ChatMessage(role=role, content=_content(m["content"], f"{where}.content")))
    return tuple(out)


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a list joined by newlines (as vLLM does)."""
    if value is None:
        return ""  # an assistant turn that only called tools
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(where, f"{where} must be a string or an array of content parts, got {_kind(value)}",
                   "invalid_type")
    texts: list[str] = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise _bad(f"{where}[{j}].type", f"{where}[{j}] is a {kind!r} part; this server takes only text parts",
                       "unsupported_content")
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}[{j}].text", f"{where}[{j}].text must be a string, got {_kind(text)}",
                       "invalid_type")
        texts.append(text)
    return "\n".join(texts)
