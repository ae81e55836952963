"""`HttpCloudSession`: `CloudSessionAPI` over any OpenAI-compatible engine, with httpx.

What belongs here: mapping session operations onto `/v1/completions` and
`/v1/chat/completions` requests and their replies back. What does not: serving (see
`_openai.py`), acceptance rules (shared with the in-process backend).

The engine keeps no per-session state here: the committed sequence lives in this object and
every verify / score sends it in full as a token-id prompt (the engine's prefix cache, where
it has one and where prompt logprobs do not bypass it, saves the recomputation).

Engines (``engine=``):
- ``"vllm"`` (also Tether's own endpoint): prompt scoring with ``prompt_logprobs`` and token
  ids in replies (``return_tokens_as_token_ids``), so verify, score and generate work. Greedy
  verification is exact; sampling verification is exact when the session's ``top_k`` is set
  and at most ``max_logprobs`` (the engine then returns the whole support of p).
- ``"generic"`` (llama.cpp server, Ollama, hosted APIs): chat and text generation only;
  `capabilities` says so and verify / score raise `UnsupportedOperation`.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import torch

from tether.cloud._acceptance import greedy_accept, speculative_accept, target_probs
from tether.contract import (
    Capabilities,
    ChatMessage,
    ChatResult,
    GenerateChunk,
    HiddenResult,
    SamplingParams,
    ScoreResult,
    SessionInfo,
    SparseProbs,
    VerifyResult,
    as_messages,
)
from tether.contract import (
    BackendError,
    InvalidRequest,
    ServerOverloaded,
    SessionLimitExceeded,
    SessionNotOpen,
    UnsupportedOperation,
    error_from_code,
)

ENGINES = ("vllm", "tether", "generic")


def _token_id(text: str) -> int:
    if not text.startswith("token_id:"):
        raise BackendError("the engine did not return token ids (needs return_tokens_as_token_ids)")
    return int(text.split(":", 1)[1])


class HttpCloudSession:
    """A cloud session served by an OpenAI-compatible engine over HTTP.

    Args:
        base_url: the engine's root, e.g. ``http://vllm:8000`` (``/v1/...`` is appended).
        model: the served model name; None takes the first one `/v1/models` lists.
        engine: ``"vllm"``, ``"tether"`` or ``"generic"`` (see the module docstring).
        api_key: sent as ``Authorization: Bearer``.
        vocab_size: the model's vocabulary size (needed for sampling verification);
            defaults to the tokenizer's length.
        tokenizer: optional HF tokenizer (the generic engine needs it to return token ids
            from `generate`).
        max_logprobs: the engine's ``--max-logprobs``; caps top-k requests.
        max_tokens: the context length to enforce locally (None: ask `/v1/models`).
        timeout: per-request timeout in seconds.
        client: an `httpx.AsyncClient` to share; by default one is created and closed here.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        engine: str = "vllm",
        api_key: str | None = None,
        vocab_size: int | None = None,
        tokenizer: Any = None,
        max_logprobs: int = 20,
        max_tokens: int | None = None,
        timeout: float = 60.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise InvalidRequest(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        self._base = base_url.rstrip("/")
        self._model = model
        self._engine = engine
        self._tokenizer = tokenizer
        self._vocab = vocab_size or (len(tokenizer) if tokenizer is not None else None)
        self._max_logprobs = max_logprobs
        self._max_tokens = max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout, headers=headers)
        if client is not None and headers:
            self._client.headers.update(headers)
        self._tokens: list[int] = []
        self._sampling = SamplingParams()
        self._gen = torch.Generator()
        self._open = False
        self._closed = False
        self._id = uuid.uuid4().hex[:16]
        scoring = engine in ("vllm", "tether")
        self._caps = Capabilities(verify=scoring, sampling_verify=scoring, score=scoring, generate=True,
                                  hidden=False, chat=True, json_mode=True, rollback=True,
                                  max_draft=32, max_top_k=max_logprobs)

    # -- plumbing -------------------------------------------------------------------------

    @property
    def length(self) -> int:
        return len(self._tokens)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def _check_open(self) -> None:
        if not self._open:
            raise SessionNotOpen("session is closed" if self._closed else "session is not open; call open() first")

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = await self._client.post(f"{self._base}{path}", json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"engine request to {path} failed: {type(exc).__name__}") from exc
        return self._reply(r, path)

    def _reply(self, r: httpx.Response, path: str) -> dict[str, Any]:
        try:
            data = r.json()
        except ValueError as exc:
            raise BackendError(f"engine replied to {path} with status {r.status_code} and no JSON") from exc
        if r.status_code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            message = str(err.get("message", "")) if isinstance(err, dict) else str(err)
            code = err.get("code") if isinstance(err, dict) else None
            if isinstance(code, str) and code in ("invalid_request", "limit_exceeded", "unsupported", "evicted",
                                                  "overloaded"):
                reason = err.get("reason") if isinstance(err, dict) else None  # an eviction's reason field
                raise error_from_code(code, message, reason=reason if isinstance(reason, str) else None)
            if r.status_code in (429, 503):
                raise ServerOverloaded(f"engine is overloaded ({r.status_code}): {message}")
            if 400 <= r.status_code < 500:
                raise InvalidRequest(f"engine rejected the request ({r.status_code}): {message}")
            raise BackendError(f"engine failed ({r.status_code}) on {path}")
        if not isinstance(data, dict):
            raise BackendError(f"engine replied to {path} with an unexpected body")
        return data

    def _check_room(self, extra: int) -> None:
        limit = self._max_tokens
        if limit is not None and len(self._tokens) + extra > limit:
            raise SessionLimitExceeded(
                f"session would hold {len(self._tokens) + extra} tokens (max_tokens={limit})",
                limit_name="max_tokens", value=len(self._tokens) + extra, limit=limit)

    def _require_scoring(self, op: str) -> None:
        if not self._caps.score:
            raise UnsupportedOperation(f"engine {self._engine!r} cannot score prompts, so {op} is unavailable")
        if not self._tokens:
            raise InvalidRequest(f"{op} needs at least one committed token; append the prompt first")

    async def _score_prompt(self, new: list[int], k: int) -> tuple[list[dict[int, float]], dict[int, float], int]:
        """Score ``committed + new``: per new token the engine's top-k (plus the token itself),
        the top-k of the position after them, and the greedy next token."""
        body = {"model": self._model, "prompt": self._tokens + new, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": k, "logprobs": k, "return_tokens_as_token_ids": True, "echo": False}
        data = await self._post("/v1/completions", body)
        try:
            choice = data["choices"][0]
            prompt_lp = choice["prompt_logprobs"]
            start = len(self._tokens)
            rows = [{int(t): float(v["logprob"]) for t, v in prompt_lp[start + i].items()} for i in range(len(new))]
            lp = choice["logprobs"]
            nxt = {_token_id(t): float(v) for t, v in lp["top_logprobs"][0].items()}
            greedy = _token_id(lp["tokens"][0])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise BackendError("engine reply lacks prompt_logprobs/logprobs (is it vLLM-compatible?)") from exc
        return rows, nxt, greedy

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self, *, sampling: SamplingParams = SamplingParams(), model: str | None = None) -> SessionInfo:
        if self._open or self._closed:
            raise InvalidRequest("session was already opened")
        try:
            r = await self._client.get(f"{self._base}/v1/models")
        except httpx.HTTPError as exc:
            raise BackendError(f"engine unreachable: {type(exc).__name__}") from exc
        data = self._reply(r, "/v1/models")
        served = [m for m in data.get("data", []) if isinstance(m, dict)]
        names = [str(m.get("id")) for m in served]
        want = model or self._model
        if want is None:
            if not names:
                raise BackendError("engine serves no model")
            want = names[0]
        elif want not in names:
            raise InvalidRequest(f"engine serves {names}, not {want!r}")
        self._model = want
        entry = served[names.index(want)]
        if self._max_tokens is None and isinstance(entry.get("max_model_len"), int):
            self._max_tokens = int(entry["max_model_len"])
        self._sampling = sampling
        if sampling.seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(sampling.seed)
        exact_sampling = self._caps.score and 0 < sampling.top_k <= self._max_logprobs and self._vocab is not None
        self._caps = Capabilities(**{**{f: getattr(self._caps, f) for f in Capabilities.__dataclass_fields__},
                                     "sampling_verify": bool(exact_sampling)})
        self._open = True
        eos = getattr(self._tokenizer, "eos_token_id", None)
        return SessionInfo(session_id=self._id, model=want, vocab_size=self._vocab or 0, num_layers=0,
                           hidden_size=0, eos_token_ids=(eos,) if isinstance(eos, int) else (),
                           max_tokens=self._max_tokens or 0, capabilities=self._caps)

    async def close(self) -> None:
        if self._closed:
            return
        self._open = False
        self._closed = True
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> HttpCloudSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- operations -----------------------------------------------------------------------

    async def append(self, token_ids: Sequence[int], *, prefill: bool = True) -> int:
        self._check_open()
        ids = [int(t) for t in token_ids]
        self._check_room(len(ids))
        self._tokens.extend(ids)
        return len(self._tokens)

    async def rollback(self, length: int) -> int:
        self._check_open()
        if not 0 <= length <= len(self._tokens):
            raise InvalidRequest(f"cannot roll back to length {length}; the session holds {len(self._tokens)}")
        del self._tokens[length:]
        return length

    async def verify(self, draft_ids: Sequence[int], draft_probs: SparseProbs | None = None) -> VerifyResult:
        self._check_open()
        self._require_scoring("verify")
        draft = [int(t) for t in draft_ids]
        k = len(draft)
        if k > self._caps.max_draft:
            raise SessionLimitExceeded(f"draft of {k} tokens exceeds max_draft={self._caps.max_draft}",
                                       limit_name="max_draft", value=k, limit=self._caps.max_draft)
        if draft_probs is not None and len(draft_probs) != k:
            raise InvalidRequest(f"draft_probs has {len(draft_probs)} rows for a draft of {k} tokens")
        self._check_room(k + 1)
        greedy = self._sampling.greedy
        if not greedy and not self._caps.sampling_verify:
            raise UnsupportedOperation(
                "exact sampling verification over HTTP needs the session's top_k in [1, max_logprobs] "
                f"({self._max_logprobs}) and a known vocabulary size")
        kk = 1 if greedy else self._sampling.top_k
        rows, nxt, greedy_next = await self._score_prompt(draft, kk)
        if greedy:
            argmax = [max(r.items(), key=lambda kv: kv[1])[0] for r in rows] + [greedy_next]
            n = 0
            while n < k and argmax[n] == draft[n]:
                n += 1
            accepted, token, bonus = n, argmax[n], n == k
        else:
            vocab = self._vocab
            assert vocab is not None
            logits = torch.full((k + 1, vocab), -math.inf, dtype=torch.float64)
            for i, r in enumerate([*rows, nxt]):
                for t, v in r.items():
                    logits[i, t] = v
            p = target_probs(logits, self._sampling)
            acc = speculative_accept(draft, p, draft_probs, self._gen)
            accepted, token, bonus = acc.accepted, acc.next_token, acc.is_bonus
        self._tokens.extend(draft[:accepted])
        self._tokens.append(token)
        return VerifyResult(accepted=accepted, next_token=token, is_bonus=bonus, length=len(self._tokens),
                            forward_passes=1)

    async def score(self, token_ids: Sequence[int], *, top_k: int = 5, commit: bool = True) -> ScoreResult:
        self._check_open()
        self._require_scoring("score")
        ids = [int(t) for t in token_ids]
        if not 0 <= top_k <= self._max_logprobs:
            raise SessionLimitExceeded(f"top_k={top_k} is outside [0, {self._max_logprobs}] (max_top_k)",
                                       limit_name="max_top_k", value=top_k, limit=self._max_logprobs)
        self._check_room(len(ids))
        rows, nxt, _ = await self._score_prompt(ids, max(top_k, 1))

        def top(r: dict[int, float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
            best = sorted(r.items(), key=lambda kv: -kv[1])[:top_k]
            return tuple(t for t, _ in best), tuple(v for _, v in best)

        tops = [top(r) for r in [*rows, nxt]]
        if commit:
            self._tokens.extend(ids)
        return ScoreResult(token_logprobs=tuple(rows[i][t] for i, t in enumerate(ids)),
                           top_ids=tuple(t for t, _ in tops), top_logprobs=tuple(v for _, v in tops),
                           length=len(self._tokens), forward_passes=1)

    async def generate(self, n: int, *, stop_ids: Sequence[int] = ()) -> AsyncIterator[GenerateChunk]:
        self._check_open()
        if not self._tokens:
            raise InvalidRequest("generate needs at least one committed token; append the prompt first")
        if n < 0:
            raise InvalidRequest(f"generate needs n >= 0, got {n}")
        if self._max_tokens is not None:  # up to the context limit, as the in-process session does
            n = min(n, max(0, self._max_tokens - len(self._tokens)))
        if n == 0:
            yield GenerateChunk(token_ids=(), finish_reason="length", length=len(self._tokens), forward_passes=0)
            return
        s = self._sampling
        body: dict[str, Any] = {"model": self._model, "prompt": list(self._tokens), "max_tokens": n,
                                "temperature": s.temperature, "top_p": s.top_p, "stream": True}
        if s.seed is not None:
            body["seed"] = s.seed
        stops = [int(t) for t in stop_ids]
        if self._engine == "generic":
            async for chunk in self._generate_generic(body, stops):
                yield chunk
            return
        # The contract generates `n` tokens unless a stop id comes; vLLM and Tether's own port
        # end at end-of-sequence unless told otherwise.
        body.update({"logprobs": 0, "return_tokens_as_token_ids": True, "stop_token_ids": stops,
                     "ignore_eos": True})
        if s.top_k:
            body["top_k"] = s.top_k
        try:
            async with self._client.stream("POST", f"{self._base}/v1/completions", json=body) as r:
                if r.status_code >= 400:
                    await r.aread()
                    self._reply(r, "/v1/completions")
                produced = 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[6:]
                    if payload == "[DONE]":
                        break
                    event = json.loads(payload)
                    if "error" in event:
                        raise BackendError("engine failed while streaming")
                    choice = event["choices"][0]
                    lp = choice.get("logprobs") or {}
                    ids = tuple(_token_id(t) for t in lp.get("tokens") or [])
                    finish = choice.get("finish_reason")
                    if not ids and finish is None:
                        continue
                    self._tokens.extend(ids)
                    produced += len(ids)
                    reason: Any = None
                    if finish is not None:
                        reason = "stop" if finish == "stop" or (ids and ids[-1] in stops) else "length"
                    yield GenerateChunk(token_ids=ids, finish_reason=reason, length=len(self._tokens),
                                        forward_passes=len(ids))
        except httpx.HTTPError as exc:
            raise BackendError(f"engine stream failed: {type(exc).__name__}") from exc

    async def _generate_generic(self, body: dict[str, Any], stops: list[int]) -> AsyncIterator[GenerateChunk]:
        tok = self._tokenizer
        if tok is None:
            raise UnsupportedOperation("generate on a generic engine needs a tokenizer to return token ids")
        # Send the committed sequence as text: llama.cpp's server (like many generic engines)
        # accepts only string prompts and rejects a token-id list. Special tokens stay in
        # the text; llama.cpp parses them back when tokenizing the prompt.
        prompt = tok.decode(body["prompt"], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        body = {**body, "stream": False, "prompt": prompt}
        data = await self._post("/v1/completions", body)
        try:
            text = data["choices"][0]["text"]
            finish = data["choices"][0].get("finish_reason")
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError("engine reply has no completion text") from exc
        ids = [int(t) for t in tok.encode(text, add_special_tokens=False)]
        for i, t in enumerate(ids):
            if t in stops:
                ids = ids[: i + 1]
                finish = "stop"
                break
        self._tokens.extend(ids)
        yield GenerateChunk(token_ids=tuple(ids), finish_reason="stop" if finish == "stop" else "length",
                            length=len(self._tokens), forward_passes=len(ids))

    async def continue_hidden(
        self, hidden: npt.NDArray[np.floating[Any]], *, layer: int, top_k: int = 0
    ) -> HiddenResult:
        raise UnsupportedOperation("OpenAI-compatible engines cannot continue from hidden states")

    async def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        json_mode: bool = False,
    ) -> ChatResult:
        self._check_open()
        msgs = as_messages(messages)
        body: dict[str, Any] = {"model": self._model, "max_tokens": max_tokens, "temperature": temperature,
                                "messages": [{"role": m.role, "content": m.content} for m in msgs]}
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        if self._sampling.seed is not None:
            body["seed"] = self._sampling.seed
        data = await self._post("/v1/chat/completions", body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            usage = data.get("usage") or {}
            finish: Any = "length" if choice.get("finish_reason") == "length" else "stop"
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError("engine reply has no chat message") from exc
        return ChatResult(text=text, prompt_tokens=int(usage.get("prompt_tokens", 0)),
                          completion_tokens=int(usage.get("completion_tokens", 0)), finish_reason=finish)
