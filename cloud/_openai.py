"""The OpenAI-compatible HTTP endpoint of the cloud model, plus health, readiness and metrics.

What belongs here: a Starlette app translating `/v1/models`, `/v1/completions` and
`/v1/chat/completions` (with streaming server-sent events) onto `SessionManager` sessions,
and the operator endpoints `/healthz`, `/readyz`, `/metrics`. What does not: model code,
the encrypted protocol.

Compatibility notes. Prompts may be text or token ids (vLLM style). `/v1/completions`
accepts the OpenAI fields (`echo`, `logprobs`, `max_tokens`, `temperature`, `top_p`,
`seed`, `stop`, `stream`) and the vLLM extensions `prompt_logprobs`, `top_k` and
`return_tokens_as_token_ids`, so `HttpCloudSession` (and any vLLM client) can verify drafts
against it. Only `n = 1` is served. Prompt text never goes to the logs.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tether.cloud._api import SamplingParams
from tether.cloud._errors import (
    CloudError,
    InvalidRequest,
    ServerOverloaded,
    SessionEvicted,
    SessionLimitExceeded,
    UnsupportedOperation,
)
from tether.cloud._manager import SessionManager
from tether.cloud._session import CloudSession

log = logging.getLogger("tether.cloud.http")

_STATUS = {
    InvalidRequest: 400,
    SessionLimitExceeded: 400,
    UnsupportedOperation: 400,
    ServerOverloaded: 503,
    SessionEvicted: 503,
}
_MAX_BODY = 8 * 1024 * 1024


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def _cloud_error(exc: CloudError) -> JSONResponse:
    status = next((v for k, v in _STATUS.items() if isinstance(exc, k)), 500)
    kind = "invalid_request_error" if status == 400 else "server_error"
    return _error(status, str(exc) if status != 500 else "internal error", kind, exc.code)


def _token_str(tokenizer: Any, token: int, as_ids: bool) -> str:
    if as_ids or tokenizer is None:
        return f"token_id:{token}"
    return str(tokenizer.decode([token]))


def _param(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidRequest(f"'{name}' has the wrong type")
    return value


class OpenAIApp:
    """Builds the Starlette app over a `SessionManager`.

    Args:
        manager: the sessions and model to serve.
        api_key: if set, requests to `/v1/*` need ``Authorization: Bearer <api_key>``.
        ready: returns False while the server is starting or draining (`/readyz` then 503).
    """

    def __init__(self, manager: SessionManager, *, api_key: str | None = None,
                 ready: Callable[[], bool] | None = None) -> None:
        self.manager = manager
        self.api_key = api_key
        self._ready = ready or (lambda: True)
        self.app = Starlette(routes=[
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ])

    # -- operator endpoints ---------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if not self._ready():
            return JSONResponse({"status": "not ready"}, status_code=503)
        m = self.manager
        return JSONResponse({"status": "ready", "model": m.model_name, "sessions": len(m.sessions),
                             "kv_bytes": m.kv_bytes(), "kv_budget_bytes": m.config.kv_budget_bytes})

    async def metrics(self, request: Request) -> Response:
        return Response(self.manager.metrics.render(), media_type=self.manager.metrics.content_type)

    # -- OpenAI endpoints -----------------------------------------------------------------

    def _auth(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            return _error(401, "missing or wrong API key", "authentication_error", "invalid_api_key")
        return None

    async def _body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > _MAX_BODY:
            raise InvalidRequest(f"request body of {len(raw)} bytes exceeds {_MAX_BODY}")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise InvalidRequest("request body is not valid JSON") from exc
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        model = body.get("model")
        if model is not None:
            self.manager.check_model_name(str(model))
        if body.get("n", 1) != 1:
            raise InvalidRequest("only n=1 is supported")
        return body

    async def models(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        m = self.manager
        return JSONResponse({"object": "list", "data": [
            {"id": m.model_name, "object": "model", "created": 0, "owned_by": "tether",
             "max_model_len": m.max_tokens}]})

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if isinstance(prompt, str):
            tok = self.manager.tokenizer
            if tok is None:
                raise UnsupportedOperation("this server has no tokenizer; send token ids as the prompt")
            return [int(t) for t in tok.encode(prompt, add_special_tokens=False)]
        raise InvalidRequest("'prompt' must be a string or a list of token ids (one prompt only)")

    def _stop_ids(self, body: dict[str, Any]) -> list[int]:
        stop = body.get("stop")
        tok = self.manager.tokenizer
        ids: list[int] = [int(t) for t in body.get("stop_token_ids") or []]
        if stop is None:
            return ids
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, list) or tok is None:
            raise InvalidRequest("'stop' must be a string or list of strings (and the server needs a tokenizer)")
        for s in items:
            enc = tok.encode(str(s), add_special_tokens=False)
            if len(enc) != 1:
                raise InvalidRequest("each 'stop' string must be a single token here; use 'stop_token_ids'")
            ids.append(int(enc[0]))
        return ids

    async def completions(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        m = self.manager
        try:
            body = await self._body(request)
            prompt = self._prompt_ids(body.get("prompt"))
            if not prompt:
                raise InvalidRequest("'prompt' is empty")
            max_tokens = _param(body, "max_tokens", int, 16)
            echo = _param(body, "echo", bool, False)
            logprobs = _param(body, "logprobs", int, None)
            prompt_logprobs = _param(body, "prompt_logprobs", int, None)
            as_ids = _param(body, "return_tokens_as_token_ids", bool, False)
            stream = _param(body, "stream", bool, False)
            sampling = SamplingParams(temperature=_param(body, "temperature", float, 1.0),
                                      top_p=_param(body, "top_p", float, 1.0),
                                      top_k=max(0, _param(body, "top_k", int, 0)),
                                      seed=_param(body, "seed", int, None))
            stop_ids = self._stop_ids(body)
            if max_tokens < 0:
                raise InvalidRequest("'max_tokens' must be >= 0")
            for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
                if value is not None and not 0 <= value <= m.config.max_top_k:
                    raise InvalidRequest(f"'{name}' must be in [0, {m.config.max_top_k}] (the server's max_top_k)")
            s = await m.open_session(sampling=sampling)
        except CloudError as exc:
            return _cloud_error(exc)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if stream:
            return StreamingResponse(self._stream_completion(s, rid, created, prompt, max_tokens, stop_ids,
                                                             logprobs=logprobs, as_ids=as_ids),
                                     media_type="text/event-stream")
        try:
            return JSONResponse(await self._completion(s, rid, created, prompt, max_tokens, stop_ids, echo=echo,
                                                       logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                                       as_ids=as_ids))
        except CloudError as exc:
            return _cloud_error(exc)
        finally:
            await s.close()

    async def _completion(self, s: CloudSession, rid: str, created: int, prompt: list[int], max_tokens: int,
                          stop_ids: list[int], *, echo: bool, logprobs: int | None, prompt_logprobs: int | None,
                          as_ids: bool) -> dict[str, Any]:
        m = self.manager
        tok = m.tokenizer
        k_prompt = max(logprobs or 0, prompt_logprobs or 0)
        want_prompt = echo and logprobs is not None or prompt_logprobs is not None
        top_k = min(k_prompt, m.config.max_top_k)
        await s.append(prompt[:1], prefill=False)
        p_lp: tuple[float, ...] = ()
        p_ids: tuple[tuple[int, ...], ...] = ()
        p_vals: tuple[tuple[float, ...], ...] = ()
        if want_prompt:
            scored = await s.score(prompt[1:], top_k=max(top_k, 1))
            p_lp, p_ids, p_vals = scored.token_logprobs, scored.top_ids, scored.top_logprobs
        else:
            await s.append(prompt[1:])
        out: list[int] = []
        out_lp: list[float] = []
        out_top: list[dict[str, float]] = []
        finish = "length"
        remaining = max_tokens
        if remaining > 0 and want_prompt and s.sampling.greedy and (logprobs or 0) <= top_k:
            # The scoring pass already predicted the first token: take its argmax, no second pass.
            t = p_ids[-1][0]
            out.append(t)
            remaining -= 1
            await s.append([t], prefill=False)
            if logprobs is not None:
                out_lp.append(p_vals[-1][0])
                out_top.append({_token_str(tok, i, as_ids): v
                                for i, v in list(zip(p_ids[-1], p_vals[-1]))[:logprobs]})
            if t in stop_ids:
                finish, remaining = "stop", 0
        if remaining > 0:
            k_out = None if logprobs is None else min(logprobs, m.config.max_top_k)
            async for chunk in s.generate(remaining, stop_ids=stop_ids, top_k=k_out):
                t = chunk.token_ids[0]
                out.append(t)
                if logprobs is not None:
                    out_lp.append(chunk.logprobs[0])
                    out_top.append({_token_str(tok, i, as_ids): v
                                    for i, v in zip(chunk.top_ids[0], chunk.top_logprobs[0])})
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
        text_ids = (prompt if echo else []) + out
        text = tok.decode(text_ids) if tok is not None else ""
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        if logprobs is not None:
            tokens: list[int] = (prompt if echo else []) + out
            token_lps: list[float | None] = []
            tops: list[dict[str, float] | None] = []
            if echo:
                token_lps = [None, *p_lp]
                tops = [None] + [{_token_str(tok, i, as_ids): v for i, v in list(zip(ids, vals))[:logprobs]}
                                 for ids, vals in zip(p_ids[:-1], p_vals[:-1])]
            token_lps += out_lp
            tops += out_top
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(_token_str(tok, t, False)) if tok is not None else 0
            choice["logprobs"] = {"tokens": [_token_str(tok, t, as_ids) for t in tokens], "token_logprobs": token_lps,
                                  "top_logprobs": tops, "text_offset": offsets}
        if prompt_logprobs is not None:
            rows: list[dict[str, dict[str, Any]] | None] = [None]
            for i, t in enumerate(prompt[1:]):
                entry: dict[str, dict[str, Any]] = {}
                ids, vals = p_ids[i], p_vals[i]
                for rank, (j, v) in enumerate(list(zip(ids, vals))[:prompt_logprobs], start=1):
                    entry[str(j)] = {"logprob": v, "rank": rank,
                                     "decoded_token": _token_str(tok, j, as_ids)}
                if str(t) not in entry:
                    actual_rank = (ids.index(t) + 1) if t in ids else None
                    entry[str(t)] = {"logprob": p_lp[i], "rank": actual_rank, "decoded_token": _token_str(tok, t, as_ids)}
                rows.append(entry)
            choice["prompt_logprobs"] = rows
        return {"id": rid, "object": "text_completion", "created": created, "model": m.model_name,
                "choices": [choice],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(out),
                          "total_tokens": len(prompt) + len(out)}}

    async def _stream_completion(self, s: CloudSession, rid: str, created: int, prompt: list[int],
                                 max_tokens: int, stop_ids: list[int], *, logprobs: int | None,
                                 as_ids: bool) -> AsyncIterator[bytes]:
        m = self.manager
        tok = m.tokenizer
        try:
            await s.append(prompt)
            out: list[int] = []
            sent = ""
            k_out = None if logprobs is None else min(logprobs, m.config.max_top_k)
            async for chunk in s.generate(max_tokens, stop_ids=stop_ids, top_k=k_out):
                out.extend(chunk.token_ids)
                text = tok.decode(out) if tok is not None else ""
                delta = text[len(sent):] if not text.endswith("\ufffd") else ""
                sent = text if delta else sent
                lp = None
                if logprobs is not None:
                    lp = {"tokens": [_token_str(tok, t, as_ids) for t in chunk.token_ids],
                          "token_logprobs": list(chunk.logprobs),
                          "top_logprobs": [{_token_str(tok, i, as_ids): v for i, v in zip(ids, vals)}
                                           for ids, vals in zip(chunk.top_ids, chunk.top_logprobs)]}
                if delta or chunk.finish_reason or lp is not None:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": m.model_name,
                                "choices": [{"index": 0, "text": delta, "logprobs": lp,
                                             "finish_reason": chunk.finish_reason}]})
            yield b"data: [DONE]\n\n"
        except CloudError as exc:
            yield _sse({"error": {"message": str(exc), "type": "server_error", "code": exc.code}})
        finally:
            await s.close()

    async def chat_completions(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        m = self.manager
        try:
            body = await self._body(request)
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise InvalidRequest("'messages' must be a list")
            max_tokens = _param(body, "max_tokens", int, None) or _param(body, "max_completion_tokens", int, 256)
            temperature = _param(body, "temperature", float, 1.0)
            top_p = _param(body, "top_p", float, 1.0)
            fmt = body.get("response_format") or {}
            json_mode = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
            stream = _param(body, "stream", bool, False)
            s = await m.open_session(sampling=SamplingParams(seed=_param(body, "seed", int, None)))
        except CloudError as exc:
            return _cloud_error(exc)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        gen = s.chat_stream(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            json_mode=json_mode)
        if stream:
            return StreamingResponse(self._stream_chat(s, gen, rid, created), media_type="text/event-stream")
        try:
            result = None
            async for _, final in gen:
                result = final or result
            assert result is not None
        except CloudError as exc:
            return _cloud_error(exc)
        finally:
            await s.close()
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": m.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        })

    async def _stream_chat(self, s: CloudSession, gen: AsyncIterator[tuple[str, Any]], rid: str,
                           created: int) -> AsyncIterator[bytes]:
        name = self.manager.model_name
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}
        try:
            yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
            async for delta, final in gen:
                if final is not None:
                    yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": final.finish_reason}],
                                "usage": {"prompt_tokens": final.prompt_tokens,
                                          "completion_tokens": final.completion_tokens,
                                          "total_tokens": final.prompt_tokens + final.completion_tokens}})
                elif delta:
                    yield _sse({**base, "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]})
            yield b"data: [DONE]\n\n"
        except CloudError as exc:
            yield _sse({"error": {"message": str(exc), "type": "server_error", "code": exc.code}})
        finally:
            await s.close()


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
