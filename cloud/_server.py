"""`CloudServer`: the session API on the encrypted protocol, plus the operator HTTP port.

What belongs here: dispatching each `tether.protocol` request message to a `CloudSession`
and its result back into the reply message; mapping `CloudError`s to `ErrorReply` codes;
the server's lifecycle (start, readiness, graceful drain on SIGTERM, stop). What does not:
session semantics (`_session.py`), the wire format (`tether.protocol`).

Which request calls which session method, and how arguments and results convert, is one
table read by this server and by the device (`tether.protocol.OPERATIONS`); this module
only finds the session a request names and runs the row. `Chat(stream=True)` is the one
request outside the contract: it streams `CloudSession.chat_stream` deltas.

Sessions belong to the connection that opened them and are closed when it goes away.
Error replies carry only the `CloudError` message (never prompt text or internals).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from tether.cloud._manager import SessionManager, current_client
from tether.cloud._openai import OpenAIApp
from tether.cloud._session import CloudSession
from tether.contract import CloudError, SamplingParams, SessionNotOpen
from tether.protocol import (
    Chat,
    ChatChunk,
    ErrorCode,
    Operation,
    RequestBounds,
    RequestFailed,
    capability_names,
    error_reply_fields,
    operation_for,
)

log = logging.getLogger("tether.cloud.server")

# Set per connection: whether its client announced the "cost" capability (its replies then
# carry forward passes and compute seconds; older clients reject unknown reply fields).
_wants_cost: contextvars.ContextVar[bool] = contextvars.ContextVar("tether_wants_cost", default=False)


def _failed(exc: CloudError) -> RequestFailed:
    """The ErrorReply for a contract error: its code, retry hint and eviction reason from the table."""
    code, retryable, reason = error_reply_fields(exc)
    return RequestFailed(code, str(exc)[:1000], retryable=retryable, reason=reason)


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
        self._openai: OpenAIApp | None = None
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
                                   capabilities=capability_names(self.manager.capabilities),
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

        self._openai = OpenAIApp(self.manager, api_key=self.api_key, ready=lambda: self._ready)
        config = uvicorn.Config(self._openai.app, host=self.http_host, port=self.http_port or 0, log_level="warning",
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
        """Graceful shutdown: refuse new work, let protocol requests in flight finish for up to
        `grace` seconds (default `CloudConfig.shutdown_grace_s`), then close connections and
        sessions. OpenAI-compatible requests end at once (a stream with an error event): an
        HTTP client retries elsewhere, and a long stream would otherwise hold the drain for the
        whole grace."""
        if self._stopped.is_set():
            return
        grace = self.manager.config.shutdown_grace_s if grace is None else grace
        self._ready = False
        if self._openai is not None:
            self._openai.shutdown()
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
        msg = request.message
        if isinstance(msg, Chat) and msg.stream:
            return self._chat_stream(msg, sessions)
        try:
            op = operation_for(msg)
        except CloudError as exc:  # a request type outside the session API: the client's mistake
            raise _failed(exc) from exc
        if op.streaming:
            return self._stream(op, msg, sessions)
        return self._call(op, msg, sessions)

    @property
    def _bounds(self) -> RequestBounds:
        return RequestBounds(max_draft=self.manager.config.max_draft, vocab_size=self.manager.model.info.vocab_size)

    def _session(self, sessions: dict[str, CloudSession], session_id: str) -> CloudSession:
        s = sessions.get(session_id)
        if s is None:
            raise SessionNotOpen(f"no session {session_id!r} on this connection")
        return s

    async def _call(self, op: Operation, msg: Any, sessions: dict[str, CloudSession]) -> Any:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.manager.config.request_timeout_s):
                return await self._run(op, msg, sessions)
        except CloudError as exc:
            raise _failed(exc) from exc
        except TimeoutError as exc:
            raise RequestFailed(ErrorCode.TIMEOUT, "request timed out on the server", retryable=True) from exc
        finally:
            log.debug("request done", extra={"op": op.method, "seconds": time.perf_counter() - started})

    async def _run(self, op: Operation, msg: Any, sessions: dict[str, CloudSession]) -> Any:
        args, kwargs = op.decode_request(msg, self._bounds)
        if op.method == "open":  # a new session, owned by this connection; then the optional prompt
            s = self.manager.session()
            info = await s.open(*args, **kwargs)
            sessions[s.id] = s
            if msg.prompt is not None and len(msg.prompt):
                try:
                    await s.append(msg.prompt.tolist())
                except BaseException:
                    sessions.pop(s.id, None)
                    await s.close()
                    raise
            return dataclasses.replace(op.encode_reply(s.id, info, msg, False), length=s.length)
        if op.method == "chat":  # a chat may name no session: it then runs on a temporary one
            s, owned = await self._chat_session(msg, sessions)
            try:
                result = await s.chat(*args, **kwargs)
            finally:
                if owned:
                    await s.close()
            return op.encode_reply(s.id, result, msg, _wants_cost.get())
        s = self._session(sessions, msg.session_id)
        if op.method == "close":
            sessions.pop(s.id, None)
        result = await getattr(s, op.method)(*args, **kwargs)
        return op.encode_reply(s.id, result, msg, _wants_cost.get())

    async def _chat_session(self, msg: Any, sessions: dict[str, CloudSession]) -> tuple[CloudSession, bool]:
        if msg.session_id is not None:
            return self._session(sessions, msg.session_id), False
        s = self.manager.session()
        await s.open(sampling=SamplingParams(seed=msg.seed), model=msg.model)
        return s, True

    async def _stream(self, op: Operation, msg: Any, sessions: dict[str, CloudSession]) -> AsyncIterator[Any]:
        try:
            args, kwargs = op.decode_request(msg, self._bounds)
            s = self._session(sessions, msg.session_id)
            async for chunk in getattr(s, op.method)(*args, **kwargs):
                yield op.encode_reply(s.id, chunk, msg, _wants_cost.get())
        except CloudError as exc:
            raise _failed(exc) from exc
        except TimeoutError as exc:
            raise RequestFailed(ErrorCode.TIMEOUT, "request timed out on the server", retryable=True) from exc

    async def _chat_stream(self, msg: Chat, sessions: dict[str, CloudSession]) -> AsyncIterator[Any]:
        try:
            s, owned = await self._chat_session(msg, sessions)
            try:
                async for delta, final in s.chat_stream(
                        msg.messages, max_tokens=msg.max_tokens, temperature=float(msg.sampling.temperature),
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
            raise _failed(exc) from exc
        except TimeoutError as exc:
            raise RequestFailed(ErrorCode.TIMEOUT, "request timed out on the server", retryable=True) from exc
