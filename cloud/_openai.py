"""The OpenAI-compatible HTTP endpoint of the cloud model, plus health, readiness and metrics.

What belongs here: a Starlette app translating `/v1/models`, `/v1/models/{id}`,
`/v1/completions` and `/v1/chat/completions` (with streaming server-sent events) onto
`SessionManager` sessions, and the operator endpoints `/healthz`, `/readyz`, `/metrics`.
What does not: reading request bodies into typed requests (`_openai_request.py`), model
code, the encrypted protocol.

Compatibility notes. Prompts may be text or token ids (vLLM style). `/v1/completions`
takes the OpenAI fields (`echo`, `logprobs`, `max_tokens`, `temperature`, `top_p`, `seed`,
`stop`, `stream`, `stream_options`) and the vLLM extensions `prompt_logprobs`, `top_k`,
`stop_token_ids`, `ignore_eos` and `return_tokens_as_token_ids`, so `HttpCloudSession`
(and any vLLM client) can verify drafts against it. Chat takes `stop`, `logprobs` /
`top_logprobs`, `top_p`, `top_k`, `seed` and `response_format` (JSON mode). Stop strings
are matched on the text (across and inside tokens) and left out of it; the tokens that
produced them still count in `usage`. Only `n = 1` is served. Every error has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. Prompt text never goes to the logs.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tether.cloud._manager import SessionManager
from tether.cloud._openai_request import (
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    OpenAIError,
    PortLimits,
    parse_chat,
    parse_completion,
)
from tether.cloud._session import CloudSession
from tether.contract import (
    CloudError,
    InvalidRequest,
    ServerOverloaded,
    SessionEvicted,
    SessionLimitExceeded,
    UnsupportedOperation,
)
from tether.text import IncrementalDetokenizer, StopStrings

log = logging.getLogger("tether.cloud.http")

_STATUS: tuple[tuple[type[CloudError], int], ...] = (
    (InvalidRequest, 400),
    (SessionLimitExceeded, 400),
    (UnsupportedOperation, 400),
    (ServerOverloaded, 503),
    (SessionEvicted, 503),
)


def _from_cloud(exc: CloudError) -> OpenAIError:
    status = next((v for k, v in _STATUS if isinstance(exc, k)), 500)
    if status == 500:
        log.error("request failed", exc_info=exc)
        return OpenAIError(500, "internal error", type="server_error", code=exc.code)
    code = exc.code
    if isinstance(exc, SessionLimitExceeded) and exc.limit_name == "max_tokens":
        code = "context_length_exceeded"
    return OpenAIError(status, str(exc), type="invalid_request_error" if status == 400 else "server_error",
                       code=code)


def _as_openai(exc: OpenAIError | CloudError) -> OpenAIError:
    """The OpenAI-shaped error for `exc`: a `CloudError` is translated by `_from_cloud`."""
    return exc if isinstance(exc, OpenAIError) else _from_cloud(exc)


def _error_response(exc: OpenAIError | CloudError) -> JSONResponse:
    """The JSON error response (status and OpenAI error body) for `exc`."""
    err = _as_openai(exc)
    return JSONResponse(err.body(), status_code=err.status)


def _shutting_down() -> OpenAIError:
    return OpenAIError(503, "the server is shutting down; retry the request", type="server_error",
                       code="server_shutting_down")


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass(frozen=True, slots=True)
class _Token:
    """One generated token with what logprobs need (empty when not asked)."""

    id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]
    finish: str | None  # set on the last token: "stop" (a stop token) or "length"


class _Text:
    """Generated tokens to the text to send: whole characters only, stop strings cut off.

    Text that could be the start of a stop string is held back until it cannot be (the
    kernel's `StopStrings`, the same matcher as the edge's decoding loop).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self._stops = StopStrings(stops) if stops else None
        self.text = ""
        self._sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text now safe to send (may be "")."""
        return self._feed(self._detok.push(token) if self._detok is not None else "", final=False)

    def finish(self) -> str:
        """The text still held back, once no token follows."""
        return self._feed(self._detok.flush() if self._detok is not None else "", final=True)

    def _feed(self, piece: str, *, final: bool) -> str:
        if self.stopped:
            return ""
        start = len(self.text)
        self.text += piece
        if self._stops is not None and piece:
            at = self._stops.find(self.text, start)
            if at is not None:
                # Never before `_sent`: text that could begin a stop string was held back.
                self.text, self.stopped, final = self.text[:at], True, True
        safe = len(self.text) if final or self._stops is None else self._stops.safe_length(self.text)
        delta = self.text[self._sent:safe]
        self._sent = max(self._sent, safe)
        return delta


class OpenAIApp:
    """Builds the Starlette app over a `SessionManager`.

    Args:
        manager: the sessions and model to serve.
        api_key: if set, requests to `/v1/*` need ``Authorization: Bearer <api_key>``
            (compared in constant time).
        ready: returns False while the server is starting or draining (`/readyz` then 503).

    Call `shutdown` when the server begins to drain: requests in flight end at their next
    token (a stream with an error event, others with 503), and new `/v1` requests get 503.
    """

    def __init__(self, manager: SessionManager, *, api_key: str | None = None,
                 ready: Callable[[], bool] | None = None) -> None:
        self.manager = manager
        self.api_key = api_key
        self._ready = ready or (lambda: True)
        self._closing = False
        tok = manager.tokenizer
        self._limits = PortLimits(vocab_size=manager.model.info.vocab_size, max_top_k=manager.config.max_top_k,
                                  max_chat_tokens=manager.config.max_chat_tokens)
        eos = set(manager.model.info.eos_token_ids)
        if isinstance(getattr(tok, "eos_token_id", None), int):
            eos.add(int(tok.eos_token_id))
        self._eos = frozenset(eos)
        self.app = Starlette(
            routes=[
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/readyz", self.readyz, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error},
        )

    def shutdown(self) -> None:
        """Refuse new `/v1` requests (503) and end those in flight at their next token."""
        self._closing = True

    # -- operator endpoints ---------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if not self._ready() or self._closing:
            return JSONResponse({"status": "not ready"}, status_code=503)
        m = self.manager
        return JSONResponse({"status": "ready", "model": m.model_name, "sessions": len(m.sessions),
                             "kv_bytes": m.kv_bytes(), "kv_budget_bytes": m.config.kv_budget_bytes})

    async def metrics(self, request: Request) -> Response:
        return Response(self.manager.metrics.render(), media_type=self.manager.metrics.content_type)

    # -- plumbing -------------------------------------------------------------------------

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            err = OpenAIError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = OpenAIError(405, f"{request.method} is not allowed on {request.url.path}",
                              code="method_not_allowed")
        else:
            err = OpenAIError(exc.status_code, str(exc.detail))
        return _error_response(err)

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("request failed", exc_info=exc)
        return _error_response(OpenAIError(500, "internal error", type="server_error"))

    def _auth(self, request: Request) -> None:
        if self._closing:
            raise _shutting_down()
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # Constant-time, so response timing says nothing about how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise OpenAIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                              type="authentication_error", code="invalid_api_key")

    async def _json(self, request: Request) -> Any:
        """The request body as JSON, refused (413) once it passes `max_request_bytes`."""
        limit = self.manager.config.max_request_bytes
        too_large = OpenAIError(413, f"request body exceeds {limit} bytes (the server's max_request_bytes)",
                                code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        raw = bytearray()
        async for chunk in request.stream():
            if len(raw) + len(chunk) > limit:
                raise too_large
            raw += chunk
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise OpenAIError(400, "request body is not valid JSON", code="invalid_json") from exc

    def _check_model(self, name: str | None) -> None:
        try:
            self.manager.check_model_name(name)
        except InvalidRequest as exc:
            raise OpenAIError(404, f"this server serves model {self.manager.model_name!r}, not {name!r}",
                              param="model", code="model_not_found") from exc

    def _entry(self) -> dict[str, Any]:
        m = self.manager
        return {"id": m.model_name, "object": "model", "created": 0, "owned_by": "tether",
                "max_model_len": m.max_tokens}

    # -- models ---------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
        except OpenAIError as exc:
            return _error_response(exc)
        return JSONResponse({"object": "list", "data": [self._entry()]})

    async def model(self, request: Request) -> Response:
        try:
            self._auth(request)
            self._check_model(request.path_params["model"])
        except OpenAIError as exc:
            return _error_response(exc)
        return JSONResponse(self._entry())

    # -- shared generation ----------------------------------------------------------------

    async def _open(self, req: GenerationRequest) -> CloudSession:
        self._check_model(req.model)
        if req.stop and self.manager.tokenizer is None:
            raise OpenAIError(400, "'stop' needs a tokenizer, which this server lacks; use 'stop_token_ids'",
                              param="stop", code="unsupported_parameter")
        return await self.manager.open_session(sampling=req.sampling)

    def _check_context(self, n_prompt: int, max_tokens: int, param: str) -> None:
        """Refuse up front (400) what the session would refuse mid-stream."""
        limit = self.manager.max_tokens
        if n_prompt + max_tokens > limit:
            raise OpenAIError(400, f"the prompt's {n_prompt} tokens plus {param}={max_tokens} exceed the context of "
                                   f"{limit} tokens; shorten the prompt or lower {param}", param=param,
                              code="context_length_exceeded")

    def _stops(self, req: GenerationRequest) -> set[int]:
        return set(req.stop_token_ids) | (set() if req.ignore_eos else set(self._eos))

    async def _tokens(self, s: CloudSession, req: GenerationRequest, n: int, *,
                      first: _Token | None = None) -> AsyncIterator[_Token]:
        """Generate up to `n` tokens on `s` (whose prompt is in), ending early on a stop token;
        `first`, when given, was already chosen by the prompt's scoring pass."""
        stops = self._stops(req)
        if first is not None:
            await s.append([first.id], prefill=False)
            done = "stop" if first.id in stops else ("length" if n == 1 else None)
            yield _Token(first.id, first.logprob, first.top, done)
            if done is not None:
                return
            n -= 1
        async with contextlib.aclosing(s.generate(n, stop_ids=sorted(stops), top_k=req.logprobs)) as chunks:
            async for chunk in chunks:
                for i, t in enumerate(chunk.token_ids):
                    last = i == len(chunk.token_ids) - 1
                    lp = chunk.logprobs[i] if chunk.logprobs else None
                    top = tuple(zip(chunk.top_ids[i], chunk.top_logprobs[i])) if chunk.top_ids else ()
                    yield _Token(t, lp, top, chunk.finish_reason if last else None)
                if self._closing:
                    raise _shutting_down()

    def _name(self, token: int, as_ids: bool = False) -> str:
        tok = self.manager.tokenizer
        if as_ids or tok is None:
            return f"token_id:{token}"
        return str(tok.decode([token]))

    # -- completions ----------------------------------------------------------------------

    def _prompt_ids(self, prompt: str | tuple[int, ...]) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        tok = self.manager.tokenizer
        if tok is None:
            raise OpenAIError(400, "this server has no tokenizer; send token ids as the prompt", param="prompt",
                              code="unsupported_parameter")
        ids = [int(t) for t in tok.encode(prompt, add_special_tokens=False)]
        if not ids:
            raise OpenAIError(400, "'prompt' encodes to no tokens", param="prompt")
        return ids

    async def completions(self, request: Request) -> Response:
        try:
            self._auth(request)
            req = parse_completion(await self._json(request), self._limits)
            if req.stream and req.echo and req.logprobs is not None:
                raise OpenAIError(400, "'echo' with 'logprobs' is not supported when streaming", param="echo",
                                  code="unsupported_parameter")
            prompt = self._prompt_ids(req.prompt)
            self._check_context(len(prompt), req.max_tokens or 0, "max_tokens")
            s = await self._open(req)
        except (OpenAIError, CloudError) as exc:
            return _error_response(exc)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            if req.stream:
                await s.append(prompt)
                return StreamingResponse(self._stream_completion(s, req, rid, created, prompt),
                                         media_type="text/event-stream")
            body = await self._completion(s, req, rid, created, prompt)
        except (OpenAIError, CloudError) as exc:
            await s.close()
            return _error_response(exc)
        await s.close()
        return JSONResponse(body)

    async def _completion(self, s: CloudSession, req: CompletionRequest, rid: str, created: int,
                          prompt: list[int]) -> dict[str, Any]:
        m = self.manager
        tok = m.tokenizer
        as_ids = req.tokens_as_ids
        k = max(req.logprobs or 0, req.prompt_logprobs or 0)
        want_prompt = (req.echo and req.logprobs is not None or req.prompt_logprobs is not None) and len(prompt) > 1
        await s.append(prompt[:1], prefill=False)
        p_lp: tuple[float, ...] = ()
        p_ids: tuple[tuple[int, ...], ...] = ()
        p_vals: tuple[tuple[float, ...], ...] = ()
        first: _Token | None = None
        if want_prompt:
            scored = await s.score(prompt[1:], top_k=max(k, 1))
            p_lp, p_ids, p_vals = scored.token_logprobs, scored.top_ids, scored.top_logprobs
            if req.max_tokens and req.sampling.greedy:
                # The scoring pass already predicted the first token: take its argmax, no second pass.
                top = tuple(zip(p_ids[-1], p_vals[-1]))
                first = _Token(p_ids[-1][0], p_vals[-1][0], top[: req.logprobs or 0], None)
        else:
            await s.append(prompt[1:])
        text = _Text(tok, req.stop)
        out: list[_Token] = []
        finish = "length"
        if req.max_tokens:
            async with contextlib.aclosing(self._tokens(s, req, req.max_tokens, first=first)) as tokens:
                async for t in tokens:
                    out.append(t)
                    text.push(t.id)
                    if text.stopped:
                        finish = "stop"
                        break
                    finish = t.finish or finish
        text.finish()
        echo_text = ""
        if req.echo:
            echo_text = req.prompt if isinstance(req.prompt, str) else (tok.decode(prompt) if tok is not None else "")
        choice: dict[str, Any] = {"index": 0, "text": echo_text + text.text, "finish_reason": finish, "logprobs": None}
        if req.logprobs is not None:
            names = [self._name(t, as_ids) for t in ((prompt if req.echo else []) + [t.id for t in out])]
            token_lps: list[float | None] = []
            tops: list[dict[str, float] | None] = []
            if req.echo:
                token_lps = [None, *p_lp]
                tops = [None] + [{self._name(i, as_ids): v for i, v in list(zip(ids, vals))[:req.logprobs]}
                                 for ids, vals in zip(p_ids[:-1], p_vals[:-1])]
            token_lps += [t.logprob for t in out]
            tops += [{self._name(i, as_ids): v for i, v in t.top} for t in out]
            offsets, pos = [], 0
            for t in (prompt if req.echo else []) + [t.id for t in out]:
                offsets.append(pos)
                pos += len(self._name(t))
            choice["logprobs"] = {"tokens": names, "token_logprobs": token_lps, "top_logprobs": tops,
                                  "text_offset": offsets}
        if req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs(prompt, p_lp, p_ids, p_vals, req.prompt_logprobs,
                                                              as_ids)
        return {"id": rid, "object": "text_completion", "created": created, "model": m.model_name,
                "choices": [choice], "usage": _usage(len(prompt), len(out))}

    def _prompt_logprobs(self, prompt: list[int], p_lp: tuple[float, ...], p_ids: tuple[tuple[int, ...], ...],
                         p_vals: tuple[tuple[float, ...], ...], k: int,
                         as_ids: bool) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's `prompt_logprobs`: per prompt token after the first, its top-k and itself."""
        rows: list[dict[str, dict[str, Any]] | None] = [None]
        for i, t in enumerate(prompt[1:] if p_lp else []):
            entry: dict[str, dict[str, Any]] = {}
            ids, vals = p_ids[i], p_vals[i]
            for rank, (j, v) in enumerate(list(zip(ids, vals))[:k], start=1):
                entry[str(j)] = {"logprob": v, "rank": rank, "decoded_token": self._name(j, as_ids)}
            if str(t) not in entry:
                entry[str(t)] = {"logprob": p_lp[i], "rank": (ids.index(t) + 1) if t in ids else None,
                                 "decoded_token": self._name(t, as_ids)}
            rows.append(entry)
        return rows

    async def _stream_completion(self, s: CloudSession, req: CompletionRequest, rid: str, created: int,
                                 prompt: list[int]) -> AsyncIterator[bytes]:
        tok = self.manager.tokenizer
        base: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                                "model": self.manager.model_name}
        if req.include_usage:
            base["usage"] = None
        text = _Text(tok, req.stop)
        produced, finish = 0, "length"
        try:
            if req.echo:
                echo = req.prompt if isinstance(req.prompt, str) else (tok.decode(prompt) if tok is not None else "")
                yield _sse({**base, "choices": [{"index": 0, "text": echo, "logprobs": None, "finish_reason": None}]})
            async with contextlib.aclosing(self._tokens(s, req, req.max_tokens or 0)) as tokens:
                async for t in tokens:
                    produced += 1
                    delta = text.push(t.id)
                    if text.stopped:
                        finish = "stop"
                    lp = None
                    if req.logprobs is not None:
                        lp = {"tokens": [self._name(t.id, req.tokens_as_ids)], "token_logprobs": [t.logprob],
                              "top_logprobs": [{self._name(i, req.tokens_as_ids): v for i, v in t.top}]}
                    if text.stopped:
                        # The stop-completing token's text is cut; its logprobs still go out below.
                        yield _sse({**base, "choices": [{"index": 0, "text": delta, "logprobs": lp,
                                                         "finish_reason": None}]})
                        break
                    finish = t.finish or finish
                    if delta or lp is not None:
                        yield _sse({**base, "choices": [{"index": 0, "text": delta, "logprobs": lp,
                                                         "finish_reason": None}]})
            yield _sse({**base, "choices": [{"index": 0, "text": text.finish(), "logprobs": None,
                                             "finish_reason": finish}]})
            if req.include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(len(prompt), produced)})
            yield b"data: [DONE]\n\n"
        except (OpenAIError, CloudError) as exc:
            yield _sse(_as_openai(exc).body())
        finally:
            await s.close()

    # -- chat -----------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        m = self.manager
        try:
            self._auth(request)
            req = parse_chat(await self._json(request), self._limits)
            if req.json_mode and req.stop:
                raise OpenAIError(400, "'stop' is not supported together with a JSON 'response_format' (it would "
                                       "cut the object)", param="stop", code="unsupported_parameter")
            prompt = m.chat_prompt_ids(req.messages)
            room = min(m.config.max_chat_tokens, m.max_tokens - len(prompt))
            if room < 1:
                raise OpenAIError(400, f"the chat prompt of {len(prompt)} tokens leaves no room to reply "
                                       f"(max_tokens={m.max_tokens})", param="messages", code="context_length_exceeded")
            max_tokens = req.max_tokens or room
            self._check_context(len(prompt), max_tokens, "max_tokens")
            s = await self._open(req)
        except (OpenAIError, CloudError) as exc:
            return _error_response(exc)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            if not req.json_mode:
                await s.append(prompt)
            if req.stream:
                return StreamingResponse(self._stream_chat(s, req, rid, created, len(prompt), max_tokens),
                                         media_type="text/event-stream")
            text, finish, produced, content = await self._chat(s, req, len(prompt), max_tokens)
        except (OpenAIError, CloudError) as exc:
            await s.close()
            return _error_response(exc)
        await s.close()
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": m.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish,
                         "logprobs": None if req.logprobs is None else {"content": content, "refusal": None}}],
            "usage": _usage(len(prompt), produced),
        })

    def _logprob_entry(self, t: _Token) -> dict[str, Any]:
        # `bytes` is the UTF-8 of the token's decoded text, so a token holding only part of a
        # character shows U+FFFD there (as in its `token`).
        def one(token: int, lp: float | None) -> dict[str, Any]:
            name = self._name(token)
            return {"token": name, "logprob": lp, "bytes": list(name.encode("utf-8"))}

        return {**one(t.id, t.logprob), "top_logprobs": [one(i, v) for i, v in t.top]}

    async def _chat_tokens(self, s: CloudSession, req: ChatRequest, n_prompt: int,
                           max_tokens: int) -> AsyncIterator[tuple[str, dict[str, Any] | None, str | None, int]]:
        """``(text delta, logprobs entry, finish reason, tokens so far)`` per generated token; the
        finish reason is set on the last item, whose delta is the held-back rest of the text."""
        if req.json_mode:
            # The JSON constraint needs the logits, so JSON mode runs the session's chat loop.
            gen = s.chat_stream(req.messages, max_tokens=max_tokens, temperature=req.sampling.temperature,
                                top_p=req.sampling.top_p, top_k=req.sampling.top_k, json_mode=True)
            async with contextlib.aclosing(gen) as deltas:
                async for delta, final in deltas:
                    if final is not None:
                        yield "", None, final.finish_reason, final.completion_tokens
                    elif delta:
                        yield delta, None, None, 0
                    if self._closing:
                        raise _shutting_down()
            return
        text = _Text(self.manager.tokenizer, req.stop)
        produced, finish = 0, "length"
        async with contextlib.aclosing(self._tokens(s, req, max_tokens)) as tokens:
            async for t in tokens:
                produced += 1
                delta = text.push(t.id)
                # A token that ends the reply (end-of-sequence, a stop token) is not content.
                entry = None if req.logprobs is None or t.finish == "stop" else self._logprob_entry(t)
                if text.stopped:
                    finish = "stop"
                    yield delta, entry, None, produced
                    break
                finish = t.finish or finish
                yield delta, entry, None, produced
        yield text.finish(), None, finish, produced

    async def _chat(self, s: CloudSession, req: ChatRequest, n_prompt: int,
                    max_tokens: int) -> tuple[str, str, int, list[dict[str, Any]]]:
        parts: list[str] = []
        content: list[dict[str, Any]] = []
        finish, produced = "length", 0
        async with contextlib.aclosing(self._chat_tokens(s, req, n_prompt, max_tokens)) as items:
            async for delta, entry, done, count in items:
                parts.append(delta)
                if entry is not None:
                    content.append(entry)
                if done is not None:
                    finish, produced = done, count
        return "".join(parts), finish, produced, content

    async def _stream_chat(self, s: CloudSession, req: ChatRequest, rid: str, created: int, n_prompt: int,
                           max_tokens: int) -> AsyncIterator[bytes]:
        base: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": self.manager.model_name}
        if req.include_usage:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish: str | None = None, entry: dict[str, Any] | None = None) -> bytes:
            lp = None if entry is None else {"content": [entry], "refusal": None}
            return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            async with contextlib.aclosing(self._chat_tokens(s, req, n_prompt, max_tokens)) as items:
                async for delta, entry, done, count in items:
                    if delta or entry is not None:
                        yield chunk({"content": delta} if delta else {}, entry=entry)
                    if done is not None:
                        yield chunk({}, done)
                        if req.include_usage:
                            yield _sse({**base, "choices": [], "usage": _usage(n_prompt, count)})
            yield b"data: [DONE]\n\n"
        except (OpenAIError, CloudError) as exc:
            yield _sse(_as_openai(exc).body())
        finally:
            await s.close()
