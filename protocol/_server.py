"""The server side of the asyncio adapter: `serve()`, `Server`, `ServerConnection`, `Request`.

What belongs here: accepting connections (handshake, admission and its `AdmissionLimits`:
connection counts, per-client request rate), handing authenticated
connections and their requests to the service, cancellation, error replies and graceful
shutdown. A handler's failure is logged and answered with ErrorReply(INTERNAL); nothing
escapes into the websocket server loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl as ssl_module
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

from tether.protocol._driver import _Driver, _DriverConnection, _raise_ws_limit
from tether.protocol._errors import (
    ChannelError,
    CloseCode,
    HandshakeTimeout,
    PeerClosed,
    ProtocolError,
    ServerBusy,
    TooManyConnections,
    UsageError,
)
from tether.protocol._keys import Allowlist, KeyPair, PublicKey
from tether.protocol._limits import AdmissionLimits, Limits, RateLimiter, RekeyPolicy
from tether.protocol._link import LinkEmulator
from tether.protocol._messages import ErrorCode, ErrorReply, Hello, Message
from tether.protocol._replay import ReplayGuard
from tether.protocol._session import (
    CancelReceived,
    GoodbyeReceived,
    PongReceived,
    RequestReceived,
    ServerProtocol,
    State,
)
from tether.protocol._ws import ConnectionClosed, WebSocketServer, serve_websockets
from tether.protocol._ws import ServerConnection as WsServerConnection

__all__ = ["Request", "RequestFailed", "Server", "ServerConnection", "serve"]

log = logging.getLogger("tether.protocol")


class RequestFailed(ChannelError):
    """Raise from a request handler to end the request with ErrorReply(code, message).

    `message` goes to the client as is: write it for the client, never from exception text.
    """

    def __init__(self, code: ErrorCode, message: str = "", *, retryable: bool = False,
                 reason: str | None = None) -> None:
        super().__init__(f"{ErrorCode(code).name}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.retryable = retryable
        self.reason = reason  # ErrorReply.reason (why a session was evicted)


class Request:
    """One request received by the server. Answer it exactly once with `reply` or `fail`
    (or several `send` calls followed by `reply` for a streaming request).

    Attributes:
        id: the request id (unique per connection).
        message: the request message.
        connection: the ServerConnection it came on (peer key, hello).
    """

    def __init__(self, connection: ServerConnection, request_id: int, message: Message) -> None:
        self.connection = connection
        self.id = request_id
        self.message = message
        self._cancelled = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Request {self.id} {type(self.message).__name__} from {self.peer.fingerprint}>"

    @property
    def peer(self) -> PublicKey:
        return self.connection.peer_public_key

    @property
    def cancelled(self) -> bool:
        """True once the client cancelled it (the server already sent ErrorReply(CANCELLED))."""
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        """True once the request has its final reply (or cannot get one any more)."""
        protocol = self.connection._protocol
        return protocol.state is State.CLOSED or not protocol.is_active(self.id) or self.connection.closed

    async def wait_cancelled(self) -> None:
        await self._cancelled.wait()

    async def _send(self, message: Message, end: bool) -> bool:
        conn = self.connection
        if self.done:
            return False
        conn._protocol.send_reply(self.id, message, end=end)
        if end:
            conn._requests.pop(self.id, None)
        try:
            await conn._driver.flush()
        except ConnectionClosed:
            return False
        return True

    async def reply(self, message: Message) -> bool:
        """Send the final reply. Returns False (and sends nothing) if the request is already
        finished: cancelled by the client, or the connection closed.

        Raises:
            UsageError: the message does not answer this request, or is over the client's
                frame limit (the request stays open: send `fail` instead).
        """
        return await self._send(message, True)

    async def send(self, message: Message) -> bool:
        """Send a non-final reply of a streaming request (Generate, Chat)."""
        return await self._send(message, False)

    async def fail(self, code: ErrorCode, message: str = "", *, retryable: bool = False,
                   reason: str | None = None) -> bool:
        """End the request with ErrorReply(code, message, reason). `message` must be safe to show."""
        return await self._send(ErrorReply(code=code, message=message, retryable=retryable, reason=reason), True)

    async def _stream_from(self, replies: AsyncIterator[Message]) -> None:
        previous: Message | None = None
        async for item in replies:
            if previous is not None and not await self.send(previous):
                return
            previous = item
        if previous is None:
            raise UsageError("a streaming handler produced no reply")
        await self.reply(previous)

    def _on_cancel(self) -> None:
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        conn = self.connection
        if conn._protocol.is_active(self.id):
            conn._protocol.send_error(self.id, ErrorCode.CANCELLED, "cancelled by the client")
            conn._requests.pop(self.id, None)
            conn._driver.flush_soon()
        if self._task is not None and not self._task.done():
            self._task.cancel()


RequestHandler = Callable[[Request], "Awaitable[Message | None] | AsyncIterator[Message]"]


class ServerConnection(_DriverConnection):
    """One authenticated client connection, handed to the `serve` handler.

    Iterate it for requests (`async for request in conn`), or let `serve_requests(fn)`
    run a handler per request with cancellation and error replies taken care of.

    Attributes:
        peer_public_key: the client's authenticated static key (on the allowlist).
        hello: the client's Hello (client name, capabilities; token removed).
        remote_address: (host, port) of the TCP peer.
    """

    def __init__(self, server: Server, driver: _Driver, protocol: ServerProtocol, remote_address: Any) -> None:
        self.server = server
        self._protocol = protocol
        assert protocol.hello is not None
        hello = protocol.hello
        self.hello: Hello = Hello(client=hello.client, capabilities=hello.capabilities, max_frame_bytes=hello.max_frame_bytes)
        self.remote_address = remote_address
        self._requests: dict[int, Request] = {}
        self._incoming: asyncio.Queue[Request | None] = asyncio.Queue()
        self._pings: dict[int, tuple[float, asyncio.Future[float]]] = {}
        super().__init__(driver, protocol)

    def __repr__(self) -> str:
        return f"<tether ServerConnection client={self.peer_public_key.fingerprint} from {self.remote_address}>"

    def _on_events(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, RequestReceived):
                if not self._admit_request(event.request_id):
                    continue
                request = Request(self, event.request_id, event.message)
                self._requests[event.request_id] = request
                self._incoming.put_nowait(request)
            elif isinstance(event, CancelReceived):
                cancelled = self._requests.get(event.request_id)
                if cancelled is not None:
                    cancelled._on_cancel()
            elif isinstance(event, PongReceived):
                entry = self._pings.pop(event.ping_id, None)
                if entry is not None and not entry[1].done():
                    entry[1].set_result(time.monotonic() - entry[0])
            elif isinstance(event, GoodbyeReceived):
                pass

    def _admit_request(self, request_id: int) -> bool:
        """The per-client rate limit: over it, the request ends at once with a retryable
        ErrorReply(OVERLOADED) saying when to retry; the connection stays open."""
        retry_in = self.server._rate.acquire(self.peer_public_key.raw, time.monotonic())
        if retry_in <= 0.0:
            return True
        admission = self.server.admission
        self.server.rate_limited += 1
        self._protocol.send_error(
            request_id,
            ErrorCode.OVERLOADED,
            f"rate limit: over {admission.requests_per_second:g} requests/s (burst {admission.burst}) "
            f"for this client; retry in {retry_in:.3f} s",
            retryable=True,
        )
        self._driver.flush_soon()
        return False

    def _on_closed(self, exc: ChannelError) -> None:
        self._incoming.put_nowait(None)
        for request in self._requests.values():
            request._cancelled.set()
            if request._task is not None and not request._task.done():
                request._task.cancel()
        self._requests.clear()
        for _, future in self._pings.values():
            if not future.done():
                future.set_exception(exc)

    def _stop_iteration(self) -> None:
        self._incoming.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[Request]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Request]:
        while True:
            request = await self._incoming.get()
            if request is None:
                self._incoming.put_nowait(None)  # every iterator ends
                return
            if request.cancelled:
                continue
            yield request

    async def serve_requests(self, handler: RequestHandler, *, concurrency: int | None = None) -> None:
        """Run `handler(request)` for each request, concurrently, until the connection closes.

        The handler returns the reply message, or is an async generator yielding the replies
        of a streaming request (the last one is sent as final), or replies itself and
        returns None. Raise RequestFailed(code, message) to send an ErrorReply; any other
        exception is logged and answered with ErrorReply(INTERNAL, "internal error").
        A client Cancel cancels the handler's task.
        """
        semaphore = asyncio.Semaphore(concurrency) if concurrency else None
        tasks: set[asyncio.Task[None]] = set()
        async for request in self:
            if semaphore is not None:
                await semaphore.acquire()
            task = asyncio.create_task(self._run(handler, request, semaphore))
            request._task = task
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, handler: RequestHandler, request: Request, semaphore: asyncio.Semaphore | None) -> None:
        try:
            result: Any = handler(request)
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, Message):
                await request.reply(result)
            elif result is not None and hasattr(result, "__aiter__"):
                await request._stream_from(result)
            elif not request.done:
                raise UsageError(f"handler returned {type(result).__name__} and did not reply")
        except asyncio.CancelledError:
            if not request.cancelled and not self.closed:
                await _quiet(request.fail(ErrorCode.CANCELLED, "cancelled by the server"))
        except RequestFailed as exc:
            await _quiet(request.fail(exc.code, exc.message, retryable=exc.retryable, reason=exc.reason))
        except (PeerClosed, ConnectionClosed):
            pass
        except Exception:
            log.exception("request %d (%s) from %s failed", request.id, type(request.message).__name__, self.peer_public_key.fingerprint)
            await _quiet(request.fail(ErrorCode.INTERNAL, "internal error"))
        finally:
            if semaphore is not None:
                semaphore.release()

    async def ping(self, *, timeout: float | None = 10.0) -> float:
        """Round-trip time of an encrypted Ping/Pong, in seconds.

        Raises:
            PeerClosed, KeepaliveTimeout, ProtocolError...: the connection is closed, or
                closed while waiting.
            UsageError: the connection is not open.
            TimeoutError: no Pong within `timeout` seconds (the connection stays open).
        """
        if self.closed:
            assert self._driver.close_exc is not None
            raise self._driver.close_exc
        ping_id = self._protocol.send_ping()
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = (time.monotonic(), future)
        try:
            await self._driver.flush_checked()
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pings.pop(ping_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved here, so asyncio never warns about it

    async def close(self, code: int = CloseCode.NORMAL) -> None:
        """Close gracefully (Goodbye, then the websocket close)."""
        await self._driver.close(code)

    async def wait_closed(self) -> None:
        await self._driver.wait_closed()


async def _quiet(awaitable: Awaitable[Any]) -> None:
    with contextlib.suppress(ChannelError, ConnectionClosed):
        await awaitable


ConnectionHandler = Callable[[ServerConnection], Awaitable[None]]


class Server:
    """A listening tether server (from `serve`). Use `async with` or `close()`.

    Attributes:
        host, port: where it listens (port resolved when 0 was asked).
        public_key: the server's static public key (what clients pin).
    """

    def __init__(
        self,
        handler: ConnectionHandler,
        *,
        server_keys: KeyPair,
        allowlist: Allowlist | None,
        token: str | None,
        limits: Limits,
        admission: AdmissionLimits,
        rekey: RekeyPolicy | None,
        link: LinkEmulator | None,
        patterns: tuple[str, ...],
        server_name: str,
        capabilities: Collection[str],
        models: Collection[str],
        keepalive_interval: float | None,
        keepalive_timeout: float,
        handshake_timeout: float,
        padding_block: int,
    ) -> None:
        self._handler = handler
        self.server_keys = server_keys
        self.public_key = server_keys.public
        self.allowlist = allowlist
        self._token = token
        self.limits = limits
        self.admission = admission
        self._rate = RateLimiter(admission.requests_per_second, admission.burst)
        self._sockets = 0  # websockets open now, handshakes included
        self._per_client: dict[bytes, int] = {}  # admitted connections per client key
        # IK timestamps per client key; with an allowlist it holds at most its keys.
        self._replay_guard = ReplayGuard()
        self._rekey = rekey
        self._link = link
        self._patterns = patterns
        self._server_name = server_name
        self._capabilities = tuple(capabilities)
        self._models = tuple(models)
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._handshake_timeout = handshake_timeout
        self._padding_block = padding_block
        self._ws_server: WebSocketServer | None = None
        self.connections: set[ServerConnection] = set()
        self.host = ""
        self.port = 0
        self._draining = False
        self.refused = 0  # connections closed during the handshake
        self.failed = 0  # connections closed for a protocol error after the handshake
        self.busy = 0  # connections refused by an admission limit (ServerBusy, TooManyConnections)
        self.rate_limited = 0  # requests refused by the per-client rate limit

    def __repr__(self) -> str:
        return f"<tether Server {self.host}:{self.port} key={self.public_key.fingerprint}>"

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def _ws_handler(self, ws: WsServerConnection) -> None:
        """One websocket: admission, handshake, then the user's handler. Never raises."""
        remote = ws.remote_address
        describe = f"client {remote[0]}:{remote[1]}" if remote else "client"
        if self._sockets >= self.admission.max_connections:
            # Refused before any cryptography, so a flood of dials stays cheap to turn away.
            self.busy += 1
            refusal = ServerBusy(f"server holds its maximum of {self.admission.max_connections} connections",
                                 limit=self.admission.max_connections)
            log.warning("%s: closing with TRY_AGAIN_LATER (1013): %s", describe, refusal)
            with contextlib.suppress(Exception):
                await ws.close(int(CloseCode.TRY_AGAIN_LATER), CloseCode.TRY_AGAIN_LATER.name)
            return
        self._sockets += 1
        try:
            await self._serve_socket(ws, describe, remote)
        finally:
            self._sockets -= 1

    async def _serve_socket(self, ws: WsServerConnection, describe: str, remote: Any) -> None:
        admitted: list[bytes] = []  # the client key, once this connection counts toward its limit

        def admit(peer: PublicKey) -> None:
            # Runs when the client's Hello arrives: only a client that proved it holds the
            # session keys is counted (a replayed IK message 1 never gets this far).
            held = self._per_client.get(peer.raw, 0)
            limit = self.admission.max_connections_per_client
            if held >= limit:
                self.busy += 1
                raise TooManyConnections(
                    f"client {peer.fingerprint} already holds its maximum of {limit} connections", limit=limit
                )
            self._per_client[peer.raw] = held + 1
            admitted.append(peer.raw)

        protocol = ServerProtocol(
            self.server_keys,
            allowlist=self.allowlist,
            token=self._token,
            patterns=self._patterns,
            server_name=self._server_name,
            capabilities=self._capabilities,
            models=self._models,
            limits=self.limits,
            rekey=self._rekey,
            keepalive_interval=self._keepalive_interval,
            keepalive_timeout=self._keepalive_timeout,
            handshake_timeout=self._handshake_timeout,
            padding_block=self._padding_block,
            replay_guard=self._replay_guard,
            admit=admit,
        )
        shapers = self._link.shapers(client_side=False) if self._link is not None else (None, None)
        driver = _Driver(ws, protocol, shapers=shapers, describe=describe)
        try:
            try:
                if not await self._handshake(driver, protocol):
                    self.refused += 1
                    return
                assert protocol.peer is not None
                driver.describe = f"{describe} ({protocol.peer.fingerprint})"
                await self._run_connection(driver, protocol, remote)
            finally:
                for client in admitted:
                    left = self._per_client.pop(client) - 1
                    if left:
                        self._per_client[client] = left
        except asyncio.CancelledError:
            raise
        except Exception:  # last line of defence: nothing escapes into websockets' server loop
            log.exception("%s: unexpected failure", describe)
            with contextlib.suppress(Exception):
                await ws.close(int(CloseCode.INTERNAL_ERROR), CloseCode.INTERNAL_ERROR.name)

    async def _run_connection(self, driver: _Driver, protocol: ServerProtocol, remote: Any) -> None:
        """An admitted connection: the user's handler until it returns or the link ends."""
        _raise_ws_limit(driver.ws, self.limits)
        connection = ServerConnection(self, driver, protocol, remote)
        self.connections.add(connection)
        driver.start()
        if self._draining:
            protocol.start_draining()
            connection._stop_iteration()
        try:
            await self._handler(connection)
        except Exception:
            log.exception("%s: connection handler failed", driver.describe)
            await driver.abort(ChannelError("connection handler failed"), code=CloseCode.INTERNAL_ERROR)
        else:
            if not driver.closed.is_set():
                await driver.close(CloseCode.GOING_AWAY if self._draining else CloseCode.NORMAL)
        finally:
            self.connections.discard(connection)
        if driver.close_exc is not None and isinstance(driver.close_exc, ProtocolError):
            self.failed += 1

    async def _handshake(self, driver: _Driver, protocol: ServerProtocol) -> bool:
        try:
            async with asyncio.timeout(self._handshake_timeout):
                while protocol.state is State.HANDSHAKE:
                    data = await driver.recv_handshake()
                    protocol.receive_data(data)
                    await driver.flush()
            return True
        except ChannelError as exc:
            await driver.abort(exc, already_failed=True)
        except TimeoutError:
            await driver.abort(HandshakeTimeout(f"handshake not complete after {self._handshake_timeout:g} s"))
        except ConnectionClosed:
            log.info("%s: closed during the handshake", driver.describe)
        return False

    async def close(self, *, grace: float = 5.0) -> None:
        """Graceful shutdown: stop accepting, refuse new requests (SHUTTING_DOWN), let requests
        in flight finish for up to `grace` seconds, then close every connection (1001)."""
        self._draining = True
        if self._ws_server is not None:
            self._ws_server.close(close_connections=False)
        for connection in list(self.connections):
            connection._protocol.start_draining()
            connection._stop_iteration()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
            c._protocol.active_requests and not c.closed for c in self.connections
        ):
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            for request in list(connection._requests.values()):
                if request._task is not None and not request._task.done():
                    request._task.cancel()
                if not request.done:
                    await _quiet(request.fail(ErrorCode.SHUTTING_DOWN, "server is shutting down", retryable=True))
            await _quiet(connection.close(CloseCode.GOING_AWAY))
        if self._ws_server is not None:
            await self._ws_server.wait_closed()

    async def wait_closed(self) -> None:
        if self._ws_server is not None:
            await self._ws_server.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def serve(
    handler: ConnectionHandler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    server_keys: KeyPair,
    allowlist: Allowlist | Collection[PublicKey] | str | None = None,
    token: str | None = None,
    limits: Limits | None = None,
    admission: AdmissionLimits | None = None,
    rekey: RekeyPolicy | None = None,
    ssl: ssl_module.SSLContext | None = None,
    link: LinkEmulator | None = None,
    patterns: tuple[str, ...] = ("XX", "IK"),
    server_name: str = "",
    capabilities: Collection[str] = (),
    models: Collection[str] = (),
    keepalive_interval: float | None = 20.0,
    keepalive_timeout: float = 20.0,
    handshake_timeout: float = 10.0,
    padding_block: int = 0,
) -> Server:
    """Start a tether server; `handler(conn)` runs for each admitted client.

    Args:
        handler: ``async def handler(conn: ServerConnection)``; when it returns the
            connection is closed gracefully. Typical body: ``await conn.serve_requests(fn)``.
        host, port: where to listen (port 0: pick a free one, see `Server.port`).
        server_keys: the server's static key pair.
        allowlist: admitted client keys: an Allowlist, a collection of PublicKey, or a path
            to an allowlist file (reloaded on change). None admits any client key.
        token: bearer token clients must present (compared in constant time), or None.
        limits: what the server accepts (frame, metadata, tensor sizes, requests in flight).
        admission: connection limits (server-wide and per client key) and the per-client
            request rate; see `AdmissionLimits` for the close codes and errors.
        rekey: when the server rekeys its sending key.
        ssl: TLS context to serve ``wss://``.
        link: emulate link conditions on every connection (server side).
        patterns: handshake patterns accepted.
        server_name, capabilities, models: announced in the Welcome.
        keepalive_interval, keepalive_timeout: encrypted keepalive (half-open detection).
        handshake_timeout: seconds a client has to finish the handshake.
        padding_block: pad every frame to a multiple of this many bytes (0: off).
    """
    limits = limits or Limits()
    if isinstance(allowlist, (str, bytes)) or hasattr(allowlist, "__fspath__"):
        allowlist = Allowlist.from_file(allowlist)  # type: ignore[arg-type]
    elif allowlist is not None and not isinstance(allowlist, Allowlist):
        allowlist = Allowlist(allowlist)
    if allowlist is None:
        log.warning("tether server: no allowlist, any client key is admitted%s", "" if token else " (and no token)")
    server = Server(
        handler,
        server_keys=server_keys,
        allowlist=allowlist,
        token=token,
        limits=limits,
        admission=admission or AdmissionLimits(),
        rekey=rekey,
        link=link,
        patterns=patterns,
        server_name=server_name,
        capabilities=capabilities,
        models=models,
        keepalive_interval=keepalive_interval,
        keepalive_timeout=keepalive_timeout,
        handshake_timeout=handshake_timeout,
        padding_block=padding_block,
    )
    ws_server = await serve_websockets(server._ws_handler, host, port, ssl=ssl, open_timeout=handshake_timeout)
    server._ws_server = ws_server
    sockname = next(iter(ws_server.sockets)).getsockname()
    server.host, server.port = sockname[0], sockname[1]
    log.info("tether server listening on %s:%d, key %s", server.host, server.port, server.public_key.fingerprint)
    return server

