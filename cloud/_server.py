"""`CloudServer`: the session API on the encrypted protocol, plus the operator HTTP port.

What belongs here: dispatching each `tether.protocol` request message to a `CloudSession`
and its result back into the reply message; mapping `CloudError`s to `ErrorReply` codes;
the server's lifecycle (start, readiness, graceful drain on SIGTERM, stop). What does not:
session semantics (`_session.py`), the wire format (`tether.protocol`).

Message mapping (request -> session call -> reply):

    OpenSession    -> open (+ append of `prompt`)  -> SessionOpened
    AppendTokens   -> append                       -> Appended
    VerifyDraft    -> verify                       -> VerifyResult
    ScoreTokens    -> score                        -> Scores
    Generate       -> generate (streamed)          -> GenerateChunk...
    ContinueHidden -> continue_hidden              -> HiddenResult
    Chat           -> chat / chat_stream           -> ChatChunk (one, or streamed deltas)
    Rollback       -> rollback                     -> RolledBack
    CloseSession   -> close                        -> SessionClosed

Sessions belong to the connection that opened them and are closed when it goes away.
Error replies carry only the `CloudError` message (never prompt text or internals).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from tether.cloud._api import SamplingParams, SparseProbs
from tether.cloud._errors import (
    BackendError,
    CloudError,
    InvalidRequest,
    ServerOverloaded,
    SessionEvicted,
    SessionLimitExceeded,
    SessionNotOpen,
    UnsupportedOperation,
)
from tether.cloud._manager import SessionManager, current_client
from tether.cloud._openai import OpenAIApp
from tether.cloud._session import CloudSession

log = logging.getLogger("tether.cloud.server")

# Set per connection: whether its client announced the "cost" capability (its replies then
# carry forward passes and compute seconds; older clients reject unknown reply fields).
_wants_cost: contextvars.ContextVar[bool] = contextvars.ContextVar("tether_wants_cost", default=False)


def _cost(result: Any) -> dict[str, Any]:
    """The optional cost fields of a reply, for clients that asked for them."""
    if not _wants_cost.get():
        return {}
    return {"forward_passes": int(result.forward_passes), "compute_s": float(result.compute_s),
            "queue_s": float(getattr(result, "queue_s", 0.0))}


_CAPABILITY_NAMES = ("verify", "sampling_verify", "score", "generate", "hidden", "chat", "json_mode", "rollback")


def capability_names(manager: SessionManager) -> tuple[str, ...]:
    """The capabilities of the manager's backend as the strings the protocol announces."""
    caps = manager.capabilities
    return tuple(n for n in _CAPABILITY_NAMES if getattr(caps, n))


def _error_code(exc: CloudError) -> tuple[Any, bool]:
    from tether.protocol import ErrorCode

    table: list[tuple[type[CloudError], Any, bool]] = [
        (InvalidRequest, ErrorCode.BAD_REQUEST, False),
        (UnsupportedOperation, ErrorCode.UNSUPPORTED, False),
        (SessionNotOpen, ErrorCode.NOT_FOUND, False),
        (SessionEvicted, ErrorCode.SESSION_EVICTED, False),
        (SessionLimitExceeded, ErrorCode.LIMIT_EXCEEDED, False),
        (ServerOverloaded, ErrorCode.OVERLOADED, True),
        (BackendError, ErrorCode.INTERNAL, True),
    ]
    for cls, code, retry in table:
        if isinstance(exc, cls):
            return code, retry
    return ErrorCode.INTERNAL, False


def _sampling(msg_sampling: Any, seed: int | None) -> SamplingParams:
    return SamplingParams(temperature=float(msg_sampling.temperature), top_p=float(msg_sampling.top_p),
                          top_k=int(msg_sampling.top_k), seed=seed)


def _draft_probs(indices: np.ndarray | None, probs: np.ndarray | None) -> SparseProbs | None:
    """Rows of (m ids, m probs); entries with probability 0 are padding and dropped."""
    if indices is None or probs is None:
        return None
    ids_rows: list[tuple[int, ...]] = []
    p_rows: list[tuple[float, ...]] = []
    for ids, ps in zip(indices.tolist(), probs.tolist(), strict=True):
        keep = [(int(i), float(p)) for i, p in zip(ids, ps, strict=True) if p > 0.0]
        ids_rows.append(tuple(i for i, _ in keep))
        p_rows.append(tuple(p for _, p in keep))
    return SparseProbs(ids=tuple(ids_rows), probs=tuple(p_rows))


class CloudServer:
    """The cloud service: encrypted protocol endpoint, optional HTTP port, one model.

    Args:
        manager: the model's sessions (started and closed by this server).
        keys: the server's static key pair (`tether.protocol.KeyPair`).
        host, port: where the encrypted protocol listens (port 0 picks a free one).
        allowlist: client public keys admitted (a path, an `Allowlist`, or None for any).
        token: optional bearer token clients must present inside the encrypted channel.
        http_host, http_port: the HTTP port (health, readiness, metrics and the
            OpenAI-compatible API); None disables it.
        api_key: bearer key for the OpenAI-compatible API.
        protocol_options: extra keyword arguments for `tether.protocol.serve`
            (limits, link emulation, keepalive...).
    """

    def __init__(
        self,
        manager: SessionManager,
        *,
        keys: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        allowlist: Any = None,
        token: str | None = None,
        http_host: str = "127.0.0.1",
        http_port: int | None = None,
        api_key: str | None = None,
        protocol_options: dict[str, Any] | None = None,
    ) -> None:
        self.manager = manager
        self.keys = keys
        self.host = host
        self.port = port
        self.allowlist = allowlist
        self.token = token
        self.http_host = http_host
        self.http_port = http_port
        self.api_key = api_key
        self._options = protocol_options or {}
        self._server: Any = None
        self._http: Any = None
        self._http_task: asyncio.Task[None] | None = None
        self._ready = False
        self._stopped = asyncio.Event()
        self.connections = 0

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while the server accepts new work (False while starting or draining)."""
        return self._ready

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        return str(self._server.url)

    @property
    def http_url(self) -> str | None:
        return None if self.http_port is None else f"http://{self.http_host}:{self.http_port}"

    @property
    def fingerprint(self) -> str:
        return str(self.keys.public.fingerprint)

    async def start(self) -> None:
        """Start the model worker, the protocol listener and the HTTP port."""
        from tether.protocol import serve

        await self.manager.start()
        self._server = await serve(self._handle, self.host, self.port, server_keys=self.keys,
                                   allowlist=self.allowlist, token=self.token, server_name="tether-cloud",
                                   capabilities=capability_names(self.manager),
                                   models=(self.manager.model_name,),
                                   **{"admission": self.manager.config.admission(), **self._options})
        self.port = int(self._server.port)
        if self.http_port is not None:
            await self._start_http()
        self._ready = True
        log.info("cloud server listening", extra={"url": self.url, "fingerprint": self.fingerprint,
                                                  "http": self.http_url})

    async def _start_http(self) -> None:
        import uvicorn

        app = OpenAIApp(self.manager, api_key=self.api_key, ready=lambda: self._ready).app
        config = uvicorn.Config(app, host=self.http_host, port=self.http_port or 0, log_level="warning",
                                lifespan="off", access_log=False)
        self._http = uvicorn.Server(config)
        self._http.install_signal_handlers = lambda: None  # we own the signals
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.01)
        self.http_port = int(self._http.servers[0].sockets[0].getsockname()[1])

    async def close(self, *, grace: float | None = None) -> None:
        """Graceful shutdown: refuse new work, let requests in flight finish for up to `grace`
        seconds (default `CloudConfig.shutdown_grace_s`), then close connections and sessions."""
        if self._stopped.is_set():
            return
        grace = self.manager.config.shutdown_grace_s if grace is None else grace
        self._ready = False
        log.info("cloud server draining", extra={"grace_s": grace})
        if self._server is not None:
            await self._server.close(grace=grace)
        await self.manager.aclose()
        if self._http is not None:
            self._http.should_exit = True
            if self._http_task is not None:
                with contextlib.suppress(Exception):
                    await self._http_task
        self._stopped.set()
        log.info("cloud server stopped")

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> CloudServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests -------------------------------------------------------------------------

    async def _handle(self, conn: Any) -> None:
        sessions: dict[str, CloudSession] = {}
        self.connections += 1
        client = conn.peer_public_key.fingerprint
        current_client.set(client)  # this connection's requests open sessions charged to it
        _wants_cost.set("cost" in conn.hello.capabilities)
        log.info("client connected", extra={"client": client})
        try:
            await conn.serve_requests(lambda request: self._dispatch(request, sessions))
        finally:
            self.connections -= 1
            for s in list(sessions.values()):
                with contextlib.suppress(Exception):
                    await s.close()
            log.info("client disconnected", extra={"client": client, "sessions_closed": len(sessions)})

    def _dispatch(self, request: Any, sessions: dict[str, CloudSession]) -> Any:
        from tether.protocol import Chat, Generate

        msg = request.message
        if isinstance(msg, Generate) or (isinstance(msg, Chat) and msg.stream):
            return self._stream(msg, sessions)
        return self._call(msg, sessions)

    def _session(self, sessions: dict[str, CloudSession], session_id: str) -> CloudSession:
        s = sessions.get(session_id)
        if s is None:
            raise SessionNotOpen(f"no session {session_id!r} on this connection")
        return s

    async def _call(self, msg: Any, sessions: dict[str, CloudSession]) -> Any:
        from tether.protocol import RequestFailed

        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.manager.config.request_timeout_s):
                return await self._run(msg, sessions)
        except CloudError as exc:
            code, retry = _error_code(exc)
            raise RequestFailed(code, str(exc)[:1000], retryable=retry) from exc
        except TimeoutError as exc:
            from tether.protocol import ErrorCode

            raise RequestFailed(ErrorCode.TIMEOUT, "request timed out on the server", retryable=True) from exc
        finally:
            log.debug("request done", extra={"op": type(msg).__name__, "seconds": time.perf_counter() - started})

    async def _run(self, msg: Any, sessions: dict[str, CloudSession]) -> Any:  # noqa: C901 - one branch per type
        from tether.protocol import (
            Appended,
            AppendTokens,
            Chat,
            ChatChunk,
            CloseSession,
            ContinueHidden,
            HiddenResult,
            OpenSession,
            Rollback,
            RolledBack,
            ScoreTokens,
            Scores,
            SessionClosed,
            SessionOpened,
            VerifyDraft,
            VerifyResult,
        )

        if isinstance(msg, OpenSession):
            s = self.manager.session()
            info = await s.open(sampling=_sampling(msg.sampling, msg.seed), model=msg.model,
                                max_tokens=msg.max_tokens)
            sessions[s.id] = s
            if msg.prompt is not None and len(msg.prompt):
                try:
                    await s.append(msg.prompt.tolist())
                except BaseException:
                    sessions.pop(s.id, None)
                    await s.close()
                    raise
            return SessionOpened(session_id=s.id, model=info.model, vocab_size=info.vocab_size,
                                 max_context=info.max_tokens, length=s.length,
                                 capabilities=capability_names(self.manager),
                                 eos_token_ids=tuple(info.eos_token_ids))
        if isinstance(msg, AppendTokens):
            s = self._session(sessions, msg.session_id)
            return Appended(session_id=s.id, length=await s.append(msg.tokens.tolist()))
        if isinstance(msg, VerifyDraft):
            s = self._session(sessions, msg.session_id)
            r = await s.verify(msg.tokens.tolist(), _draft_probs(msg.draft_indices, msg.draft_probs))
            return VerifyResult(session_id=s.id, accepted=r.accepted, next_token=r.next_token, length=r.length,
                                **_cost(r))
        if isinstance(msg, ScoreTokens):
            s = self._session(sessions, msg.session_id)
            tokens = msg.tokens.tolist()
            res = await s.score(tokens, top_k=msg.top_k, commit=msg.append)
            rows = len(tokens) + (1 if msg.include_next else 0)
            top_i = top_l = None
            if msg.top_k > 0 and rows > 0:
                top_i = np.asarray(res.top_ids[:rows], dtype=np.int64).reshape(rows, msg.top_k)
                top_l = np.asarray(res.top_logprobs[:rows], dtype=np.float32).reshape(rows, msg.top_k)
            return Scores(session_id=s.id, length=res.length,
                          token_logprobs=np.asarray(res.token_logprobs, dtype=np.float32),
                          top_indices=top_i, top_logprobs=top_l, **_cost(res))
        if isinstance(msg, ContinueHidden):
            s = self._session(sessions, msg.session_id)
            h = await s.continue_hidden(msg.hidden.numpy(), layer=msg.layer, top_k=msg.top_k)
            ti = tl = None
            if msg.top_k > 0:
                ti = np.asarray(h.top_ids, dtype=np.int64)
                tl = np.asarray(h.top_logprobs, dtype=np.float32)
            return HiddenResult(session_id=s.id, next_token=h.next_token, length=h.length,
                                top_indices=ti, top_logprobs=tl, **_cost(h))
        if isinstance(msg, Chat):
            s, owned = await self._chat_session(msg, sessions)
            try:
                chat = await s.chat([{"role": m.role, "content": m.content} for m in msg.messages],
                                    max_tokens=msg.max_tokens, temperature=float(msg.sampling.temperature),
                                    json_mode=bool(msg.json_mode))
            finally:
                if owned:
                    await s.close()
            return ChatChunk(text=chat.text, finish_reason=chat.finish_reason, prompt_tokens=chat.prompt_tokens,
                             completion_tokens=chat.completion_tokens, session_id=msg.session_id)
        if isinstance(msg, Rollback):
            s = self._session(sessions, msg.session_id)
            return RolledBack(session_id=s.id, length=await s.rollback(msg.length))
        if isinstance(msg, CloseSession):
            s = self._session(sessions, msg.session_id)
            sessions.pop(s.id, None)
            await s.close()
            return SessionClosed(session_id=s.id)
        raise InvalidRequest(f"{type(msg).__name__} is not a request this server handles")

    async def _chat_session(self, msg: Any, sessions: dict[str, CloudSession]) -> tuple[CloudSession, bool]:
        if msg.session_id is not None:
            return self._session(sessions, msg.session_id), False
        s = self.manager.session()
        await s.open(sampling=SamplingParams(seed=msg.seed), model=msg.model)
        return s, True

    async def _stream(self, msg: Any, sessions: dict[str, CloudSession]) -> AsyncIterator[Any]:
        from tether.protocol import ChatChunk, ErrorCode, Generate, GenerateChunk, RequestFailed

        try:
            if isinstance(msg, Generate):
                s = self._session(sessions, msg.session_id)
                sampling = None
                if msg.sampling is not None:
                    sampling = _sampling(msg.sampling, None)
                async for c in s.generate(msg.max_new_tokens, stop_ids=msg.stop_tokens, sampling=sampling):
                    yield GenerateChunk(session_id=s.id, length=c.length, finish_reason=c.finish_reason,
                                        tokens=np.asarray(c.token_ids, dtype=np.int64), **_cost(c))
                return
            s, owned = await self._chat_session(msg, sessions)
            try:
                async for delta, final in s.chat_stream(
                        [{"role": m.role, "content": m.content} for m in msg.messages],
                        max_tokens=msg.max_tokens, temperature=float(msg.sampling.temperature),
                        top_p=float(msg.sampling.top_p), json_mode=bool(msg.json_mode)):
                    if final is not None:
                        yield ChatChunk(text="", finish_reason=final.finish_reason,
                                        prompt_tokens=final.prompt_tokens,
                                        completion_tokens=final.completion_tokens, session_id=msg.session_id)
                    elif delta:
                        yield ChatChunk(text=delta, session_id=msg.session_id)
            finally:
                if owned:
                    await s.close()
        except CloudError as exc:
            code, retry = _error_code(exc)
            raise RequestFailed(code, str(exc)[:1000], retryable=retry) from exc
        except TimeoutError as exc:
            raise RequestFailed(ErrorCode.TIMEOUT, "request timed out on the server", retryable=True) from exc
