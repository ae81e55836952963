"""asyncio adapter: feeds websockets connections into the sans-I/O protocol.

What belongs here: sockets, tasks, timers and futures, and nothing the protocol decides.
This is the only module that imports `websockets`; everything above it (cloud service,
edge client) uses `connect` and `serve`. Peer misbehaviour never escapes as an exception
into the server loop: it closes that connection with the error's close code and logs one
line, without the error text going on the wire.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import ssl as ssl_module
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection as WsServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from tether.protocol._errors import (
    ChannelError,
    CloseCode,
    HandshakeError,
    HandshakeTimeout,
    PeerClosed,
    ProtocolError,
    RemoteError,
    ServerKeyMismatch,
    UsageError,
)
from tether.protocol._frames import EncodedFrame
from tether.protocol._handshake import probe_server_key
from tether.protocol._keys import Allowlist, KeyPair, PublicKey, load_public_key
from tether.protocol._limits import Limits, RekeyPolicy
from tether.protocol._link import LinkEmulator, Shaper
from tether.protocol._messages import ErrorCode, ErrorReply, Hello, Message, Welcome
from tether.protocol._session import (
    CancelReceived,
    ClientProtocol,
    GoodbyeReceived,
    HandshakeComplete,
    PongReceived,
    ReplyReceived,
    RequestReceived,
    ServerProtocol,
    State,
    _refusal,
)
from tether.protocol._transport import RECORD_OVERHEAD, Transport

__all__ = ["Connection", "ReplyStream", "Request", "RequestFailed", "Server", "ServerConnection", "connect", "serve"]

log = logging.getLogger("tether.protocol")

_HANDSHAKE_MAX = 65535 + 64  # unauthenticated peers: one Noise message at most
_OVERSIZE_SLACK = 1024 * 1024


class RequestFailed(ChannelError):
    """Raise from a request handler to end the request with ErrorReply(code, message).

    `message` goes to the client as is: write it for the client, never from exception text.
    """

    def __init__(self, code: ErrorCode, message: str = "", *, retryable: bool = False) -> None:
        super().__init__(f"{ErrorCode(code).name}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.retryable = retryable


def _ws_max_size(limits: Limits) -> int:
    """The websocket message limit once authenticated: the frame limit plus the record
    overhead plus slack, so that a moderately oversized record reaches the record layer and
    closes with FRAME_TOO_LARGE (4030); anything larger is refused by the websocket layer
    itself with 1009 before it is buffered."""
    return limits.max_frame_bytes + RECORD_OVERHEAD + _OVERSIZE_SLACK


def _raise_ws_limit(ws: ClientConnection | WsServerConnection, limits: Limits) -> None:
    """Lift the handshake-time message limit to the transport limit (authenticated peers only)."""
    protocol = ws.protocol
    if hasattr(protocol, "max_message_size"):
        protocol.max_message_size = _ws_max_size(limits)


def _code_name(code: int | None) -> str:
    try:
        return CloseCode(code or 0).name
    except ValueError:
        return str(code)


def _close_info(exc: ConnectionClosed) -> tuple[int, str]:
    frame = exc.rcvd
    if frame is None:
        return int(CloseCode.ABNORMAL), ""
    return int(frame.code), frame.reason


_OFFLOAD_BYTES = 256 * 1024  # records at least this large are encrypted/decrypted off the loop
_PIPELINE_DEPTH = 8  # received records checked and being decrypted ahead of the consumer
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _crypto_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for ChaCha20-Poly1305 on large records (`cryptography` releases the GIL there)."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 2), thread_name_prefix="tether-crypto"
        )
    return _POOL


class _Driver:
    """Pumps one websocket through one sans-I/O protocol: sending, receiving, timers."""

    def __init__(
        self,
        ws: ClientConnection | WsServerConnection,
        protocol: ClientProtocol | ServerProtocol,
        *,
        shapers: tuple[Shaper | None, Shaper | None],
        describe: str,
    ) -> None:
        self.ws = ws
        self.protocol = protocol
        self.describe = describe
        self._out_shaper, self._in_shaper = shapers
        self._sender_task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self._flush_waiters: list[asyncio.Future[None]] = []
        self._out_queue: asyncio.Queue[tuple[float, bytes | bytearray] | None] | None = None
        self._out_task: asyncio.Task[None] | None = None
        self._in_queue: asyncio.Queue[tuple[float, bytes] | None] | None = None
        self._pipeline: asyncio.Queue[Any] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lost_exc: ConnectionClosed | None = None
        self.on_events: Callable[[list[Any]], None] = lambda events: None
        self.on_closed: Callable[[ChannelError], None] = lambda exc: None
        self.closed = asyncio.Event()
        self.close_exc: ChannelError | None = None
        self.close_code: int | None = None

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- sending

    async def flush(self) -> None:
        """Wait until everything the protocol has queued so far is sealed and sent.

        The work is done by one sender task per connection, so a caller cancelled while
        waiting never leaves a sealed record unsent (which would break the counter order).

        Raises:
            ConnectionClosed: the websocket closed before the data was sent.
        """
        if self.closed.is_set() or (self._sender_task is not None and self._sender_task.done()):
            return  # the connection is over: callers learn it from their own waiters
        if self._sender_task is None:
            self._sender_task = asyncio.get_running_loop().create_task(self._sender())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(waiter)
        self._kick.set()
        await waiter

    def flush_soon(self) -> None:
        """Start sending what is queued without waiting (for callers that must not await)."""
        if self.closed.is_set():
            return
        if self._sender_task is None:
            self._sender_task = asyncio.get_running_loop().create_task(self._sender())
        self._kick.set()

    async def _sender(self) -> None:
        """Seal and send queued output in order, forever (cancelled when the connection ends).

        Large frames are sealed in a worker thread (`cryptography` releases the GIL), and the
        next frame is sealed while the previous record is being written, so encryption
        overlaps the websocket's own work. Sealing stays sequential (nonce order).
        """
        loop = asyncio.get_running_loop()
        while True:
            await self._kick.wait()
            self._kick.clear()
            waiters, self._flush_waiters = self._flush_waiters, []
            error: BaseException | None = None
            sending: asyncio.Future[None] | None = None
            try:
                for item in self.protocol.pending_output():
                    if not isinstance(item, EncodedFrame):
                        records: list[Any] = [item]
                    elif item.size >= _OFFLOAD_BYTES:
                        records = await loop.run_in_executor(_crypto_pool(), self.protocol.seal, item)
                    else:
                        records = self.protocol.seal(item)
                    if sending is not None:
                        await sending
                    sending = asyncio.ensure_future(self._send_records(records))
                if sending is not None:
                    await sending
            except ConnectionClosed as exc:
                error = exc
            except asyncio.CancelledError:
                if sending is not None:
                    sending.cancel()
                for waiter in waiters + self._flush_waiters:
                    if not waiter.done():
                        waiter.cancel()
                raise
            for waiter in waiters:
                if not waiter.done():
                    if error is None:
                        waiter.set_result(None)
                    else:
                        waiter.set_exception(error)

    async def _send_records(self, records: list[Any]) -> None:
        for record in records:
            await self._send_record(record)

    async def _send_record(self, record: bytes | bytearray) -> None:
        if self._out_shaper is None:
            await self.ws.send(record)
            return
        if self._out_queue is None:
            self._out_queue = asyncio.Queue()
            self._out_task = asyncio.get_running_loop().create_task(self._out_pump())
        self._out_queue.put_nowait((self._out_shaper.schedule(len(record), time.monotonic()), record))

    async def _out_pump(self) -> None:
        assert self._out_queue is not None
        with contextlib.suppress(ConnectionClosed):
            while True:
                item = await self._out_queue.get()
                if item is None:
                    return
                at, record = item
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.ws.send(record)

    async def _drain_out(self, timeout: float = 10.0) -> None:
        """Wait until emulated-link sends are on the wire (before closing)."""
        if self._out_queue is not None and self._out_task is not None:
            self._out_queue.put_nowait(None)
            await asyncio.wait([self._out_task], timeout=timeout)

    # ---- receiving

    async def recv_handshake(self) -> bytes:
        """One message during the handshake (link delay applied)."""
        data = await self.ws.recv(decode=False)
        if isinstance(data, str):
            raise ProtocolError("text message on a binary protocol")
        if self._in_shaper is not None:
            delay = self._in_shaper.schedule(len(data), time.monotonic()) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return data

    def start(self) -> None:
        """Start the background reader, the in-order consumer and the timer (after the handshake).

        Receiving is a pipeline: the reader checks each record's header as it arrives and
        starts decrypting large ones in a worker thread; the consumer finishes records in
        arrival order. Several large records are decrypted at once while the event loop
        keeps reading.
        """
        self._pipeline = asyncio.Queue(maxsize=_PIPELINE_DEPTH)
        if self._in_shaper is not None:
            self._in_queue = asyncio.Queue()
            self._spawn(self._deliver())
        self._spawn(self._reader())
        self._spawn(self._consumer())
        self._spawn(self._timer())

    async def _reader(self) -> None:
        try:
            while True:
                data = await self.ws.recv(decode=False)
                if isinstance(data, str):
                    await self.abort(ProtocolError("text message on a binary protocol"))
                    return
                if self._in_queue is not None:
                    assert self._in_shaper is not None
                    self._in_queue.put_nowait((self._in_shaper.schedule(len(data), time.monotonic()), data))
                elif not await self._ingest(data):
                    return
        except ConnectionClosed as exc:
            self._lost_exc = exc
            if self._in_queue is not None:
                self._in_queue.put_nowait(None)  # the deliverer forwards the end after queued messages
            else:
                await self._pipeline.put(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the server down
            log.exception("%s: reader failed", self.describe)
            await self.abort(ChannelError(f"internal error: {type(exc).__name__}"), code=CloseCode.INTERNAL_ERROR)

    async def _deliver(self) -> None:
        """Emulated downlink: hand records on at their arrival time."""
        assert self._in_queue is not None
        while True:
            item = await self._in_queue.get()
            if item is None:
                await self._pipeline.put(None)
                return
            at, data = item
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not await self._ingest(data):
                return

    async def _ingest(self, data: bytes) -> bool:
        """Check a record's header now and start decrypting it; the consumer finishes it."""
        try:
            prepared = self.protocol.prepare_record(data)
        except ChannelError as exc:
            await self.abort(exc, already_failed=True)
            return False
        future: asyncio.Future[Any] | None = None
        if len(data) >= _OFFLOAD_BYTES:
            future = asyncio.get_running_loop().run_in_executor(_crypto_pool(), Transport.decrypt_prepared, prepared)
        await self._pipeline.put((prepared, future))
        return True

    async def _consumer(self) -> None:
        protocol = self.protocol
        try:
            while True:
                item = await self._pipeline.get()
                if item is None:
                    self._lost()
                    return
                prepared, future = item
                outcome = await future if future is not None else Transport.decrypt_prepared(prepared)
                try:
                    events = protocol.receive_prepared(prepared, outcome)
                except ChannelError as exc:
                    await self.abort(exc, already_failed=True)
                    return
                if events:
                    self.on_events(events)
                if protocol.has_data_to_send():
                    with contextlib.suppress(ConnectionClosed):
                        await self.flush()
                if protocol.state is State.CLOSED:
                    # The peer said Goodbye: echo its code on the websocket and finish.
                    code = protocol.close_code or int(CloseCode.NORMAL)
                    self._finish(protocol.connection_lost(code, _code_name(code)), code)
                    with contextlib.suppress(Exception):
                        await self.ws.close(code, _code_name(code))
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: consumer failed", self.describe)
            await self.abort(ChannelError(f"internal error: {type(exc).__name__}"), code=CloseCode.INTERNAL_ERROR)

    async def _timer(self) -> None:
        protocol = self.protocol
        while protocol.state is State.OPEN:
            deadline = protocol.next_deadline()
            await asyncio.sleep(1.0 if deadline is None else max(0.0, deadline - protocol.clock()))
            if protocol.state is not State.OPEN:
                return
            try:
                protocol.poll()
            except ChannelError as exc:
                await self.abort(exc, already_failed=True)
                return
            with contextlib.suppress(ConnectionClosed):
                await self.flush()

    # ---- closing

    async def abort(self, exc: ChannelError, *, already_failed: bool = False, code: int | None = None) -> None:
        """Close because of `exc`: log it, send the Goodbye the protocol queued, close with its code."""
        if not already_failed:
            self.protocol._fail(exc)
        close_code = int(code or self.protocol.close_code or exc.close_code or CloseCode.INTERNAL_ERROR)
        log.warning("%s: closing with %s (%d): %s", self.describe, _code_name(close_code), close_code, exc)
        with contextlib.suppress(Exception):
            await self.flush()
            await self._drain_out()
        self._finish(exc, close_code)
        with contextlib.suppress(Exception):
            await self.ws.close(close_code, _code_name(close_code))

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Graceful close: Goodbye inside the channel, then the websocket close."""
        if self.closed.is_set():
            return
        self.protocol.send_goodbye(code, reason)
        with contextlib.suppress(Exception):
            await self.flush()
            await self._drain_out()
        self._finish(UsageError("the connection was closed by this side"), int(code))
        with contextlib.suppress(Exception):
            await self.ws.close(int(code), _code_name(code))

    def _lost(self) -> None:
        code, reason = _close_info(self._lost_exc) if self._lost_exc is not None else (int(CloseCode.ABNORMAL), "")
        self._finish(self.protocol.connection_lost(code, reason), code)

    def _finish(self, exc: ChannelError, code: int) -> None:
        if self.closed.is_set():
            return
        self.close_exc = exc
        self.close_code = code
        self.closed.set()
        self.on_closed(exc)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current and not task.done():
                task.cancel()
        if self._out_task is not None and self._out_task is not current and not self._out_task.done():
            self._out_task.cancel()
        if self._sender_task is not None and self._sender_task is not current and not self._sender_task.done():
            self._sender_task.cancel()

    async def wait_closed(self) -> None:
        await self.closed.wait()


# --------------------------------------------------------------------------- client


class Connection:
    """An open, authenticated client connection (from `connect`).

    Several requests may be in flight at once; each gets its own request id. Use
    `request()` for one reply, `stream()` for streamed replies; cancel by cancelling the
    awaiting task or leaving the `stream()` loop early. Close with `close()` or `async with`.

    Attributes:
        peer_public_key: the server's authenticated static key (the pinned one).
        welcome: the server's Welcome (capabilities, limits).
        handshake_hash: the Noise handshake hash (channel binding).
    """

    def __init__(self, driver: _Driver, protocol: ClientProtocol, url: str) -> None:
        self._driver = driver
        self._protocol = protocol
        self.url = url
        assert protocol.welcome is not None and protocol.peer is not None
        self.welcome: Welcome = protocol.welcome
        self.peer_public_key: PublicKey = protocol.peer
        self.handshake_hash = protocol.handshake_hash
        self.pattern = protocol.pattern
        self._waiters: dict[int, asyncio.Future[Message] | asyncio.Queue[Any]] = {}
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._ping_started: dict[int, float] = {}
        limit = protocol.peer_max_in_flight or 1 << 30
        self._slots = asyncio.Semaphore(limit)
        driver.on_events = self._on_events
        driver.on_closed = self._on_closed

    def __repr__(self) -> str:
        return f"<tether Connection {self.url} server={self.peer_public_key.fingerprint} pattern={self.pattern}>"

    @property
    def closed(self) -> bool:
        return self._driver.closed.is_set()

    @property
    def close_code(self) -> int | None:
        return self._driver.close_code

    @property
    def in_flight(self) -> int:
        return self._protocol.in_flight

    @property
    def transport_stats(self) -> dict[str, int]:
        t = self._protocol.transport
        assert t is not None
        return {
            "records_sent": t.records_sent,
            "records_received": t.records_received,
            "rekeys_sent": t.rekeys_sent,
            "rekeys_received": t.rekeys_received,
        }

    def _on_events(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, ReplyReceived):
                waiter = self._waiters.get(event.request_id)
                if event.end:
                    self._waiters.pop(event.request_id, None)
                if waiter is None:
                    continue
                if isinstance(waiter, asyncio.Queue):
                    waiter.put_nowait(event)
                elif not waiter.done():
                    if isinstance(event.message, ErrorReply):
                        waiter.set_exception(_remote_error(event))
                    else:
                        waiter.set_result(event.message)
            elif isinstance(event, PongReceived):
                future = self._pings.pop(event.ping_id, None)
                started = self._ping_started.pop(event.ping_id, None)
                if future is not None and not future.done() and started is not None:
                    future.set_result(time.monotonic() - started)

    def _on_closed(self, exc: ChannelError) -> None:
        for waiter in self._waiters.values():
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait(exc)
            elif not waiter.done():
                waiter.set_exception(exc)
        self._waiters.clear()
        for future in self._pings.values():
            if not future.done():
                future.set_exception(exc)
        self._pings.clear()

    def _check_open(self) -> None:
        if self._driver.closed.is_set():
            assert self._driver.close_exc is not None
            raise self._driver.close_exc

    async def _start(self, message: Message, waiter: asyncio.Future[Message] | asyncio.Queue[Any]) -> int:
        self._check_open()
        request_id = self._protocol.send_request(message)
        self._waiters[request_id] = waiter
        await self._driver.flush()
        return request_id

    def _cancel(self, request_id: int) -> None:
        self._waiters.pop(request_id, None)
        if not self._driver.closed.is_set() and self._protocol.cancel(request_id):
            self._driver.flush_soon()

    async def request(self, message: Message, *, timeout: float | None = None) -> Message:
        """Send a request and return its reply.

        Args:
            message: a request message (OpenSession, VerifyDraft, ...). For types that
                stream (Generate, Chat with stream=True) use `stream()`.
            timeout: seconds to wait; on expiry the request is cancelled on the server.

        Returns:
            The reply message (its type is `type(message).REPLY`).

        Raises:
            RemoteError: the server answered with an ErrorReply (code, safe message).
            UsageError: not a request, or the frame is over the server's limits.
            PeerClosed, KeepaliveTimeout, ProtocolError...: the connection failed; it is closed.
            TimeoutError: `timeout` expired (the request was cancelled).
        """
        if _streams(message):
            raise UsageError(f"{type(message).__name__} streams its replies: use stream()")
        async with self._slots:
            future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            request_id = await self._start(message, future)
            try:
                if timeout is None:
                    return await future
                return await asyncio.wait_for(future, timeout)
            except BaseException:
                if not future.done() or future.cancelled():
                    self._cancel(request_id)
                raise

    def stream(self, message: Message) -> ReplyStream:
        """Send a streaming request; iterate the result for its replies (the last one ends it).

        Leaving the loop early (break, exception, task cancellation) cancels the request on
        the server; so does `aclose()` or leaving `async with conn.stream(...) as replies`.

        Raises (while iterating):
            RemoteError: the server ended the stream with an ErrorReply.
            PeerClosed, ...: the connection failed.
        """
        return ReplyStream(self, message)

    async def ping(self, *, timeout: float | None = 10.0) -> float:
        """Round-trip time of an encrypted Ping/Pong, in seconds."""
        self._check_open()
        ping_id = self._protocol.send_ping()
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = future
        self._ping_started[ping_id] = time.monotonic()
        await self._driver.flush()
        return await asyncio.wait_for(future, timeout)

    async def close(self, code: int = CloseCode.NORMAL, *, drain: float | None = 5.0) -> None:
        """Graceful close: wait up to `drain` seconds for requests in flight, then Goodbye.

        Requests still open afterwards fail with UsageError("... closed by this side").
        """
        if drain and self._waiters and not self.closed:
            deadline = time.monotonic() + drain
            while self._waiters and not self.closed and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        await self._driver.close(code)

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (by either side)."""
        await self._driver.wait_closed()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class ReplyStream:
    """The replies to one streaming request (from `Connection.stream`).

    An async iterator and an async context manager. Replies received but not yet consumed
    are buffered; abandoning the stream (break, aclose, garbage collection) cancels the
    request on the server at once.
    """

    def __init__(self, connection: Connection, message: Message) -> None:
        self._connection = connection
        self._message = message
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._request_id: int | None = None
        self._slot_held = False
        self._finished = False

    def __aiter__(self) -> ReplyStream:
        return self

    async def __anext__(self) -> Message:
        if self._finished:
            raise StopAsyncIteration
        conn = self._connection
        if self._request_id is None:
            await conn._slots.acquire()
            self._slot_held = True
            try:
                self._request_id = await conn._start(self._message, self._queue)
            except BaseException:
                self._done()
                raise
        try:
            item = await self._queue.get()
        except BaseException:
            self._abandon()
            raise
        if isinstance(item, BaseException):
            self._done()
            raise item
        assert isinstance(item, ReplyReceived)
        if isinstance(item.message, ErrorReply):
            self._done()
            raise _remote_error(item)
        if item.end:
            self._done()
        return item.message

    def _done(self) -> None:
        self._finished = True
        if self._slot_held:
            self._slot_held = False
            self._connection._slots.release()

    def _abandon(self) -> None:
        if not self._finished:
            if self._request_id is not None:
                self._connection._cancel(self._request_id)
            self._done()

    async def aclose(self) -> None:
        """Stop reading; cancels the request on the server if it has not ended."""
        self._abandon()

    async def __aenter__(self) -> ReplyStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._abandon()

    def __del__(self) -> None:
        if not self._finished and self._request_id is not None:
            with contextlib.suppress(Exception):
                self._abandon()


def _streams(message: Message) -> bool:
    if not type(message).STREAMING:
        return False
    return bool(getattr(message, "stream", True))


def _remote_error(event: ReplyReceived) -> RemoteError:
    reply = event.message
    assert isinstance(reply, ErrorReply)
    return RemoteError(int(reply.code), reply.message, retryable=reply.retryable, request_id=event.request_id)


async def connect(
    url: str,
    client_keys: KeyPair,
    *,
    server_public_key: PublicKey | str,
    token: str | None = None,
    pattern: str = "IK",
    limits: Limits | None = None,
    rekey: RekeyPolicy | None = None,
    ssl: ssl_module.SSLContext | None = None,
    link: LinkEmulator | None = None,
    capabilities: Collection[str] = (),
    keepalive_interval: float | None = 20.0,
    keepalive_timeout: float = 20.0,
    open_timeout: float = 10.0,
    padding_block: int = 0,
    proxy: str | None = None,
) -> Connection:
    """Open an encrypted, authenticated connection to a tether server.

    Args:
        url: ``ws://host:port`` or ``wss://host:port`` (TLS outside, Noise inside).
        client_keys: this client's static key pair (its identity on the allowlist).
        server_public_key: the pinned server key (PublicKey, base64 text or a key file);
            any other key is refused with ServerKeyMismatch naming both fingerprints.
        token: bearer token, sent only inside the encrypted channel.
        pattern: "IK" (one round trip) or "XX" (the server's key travels encrypted).
        limits: limits for what this client accepts.
        rekey: when this client rekeys its sending key.
        ssl: TLS context for ``wss://`` (default: system trust store).
        link: emulate delay/jitter/bandwidth on this connection (both directions).
        capabilities: strings announced in the Hello.
        keepalive_interval: idle seconds before an encrypted Ping (None: never).
        keepalive_timeout: seconds without any answer after a Ping before the link is
            declared half-open (KeepaliveTimeout).
        open_timeout: seconds for TCP + TLS + websocket + Noise handshakes together.
        padding_block: pad every frame to a multiple of this many bytes (0: off).
        proxy: HTTP/SOCKS proxy URL for the websocket (None: direct).

    Raises:
        ServerKeyMismatch, UnknownClientKey, BadToken: refused identity or credential.
        HandshakeError, VersionMismatch, HandshakeTimeout: the handshake failed.
        PeerClosed: the server closed the connection during the handshake.
        OSError: the server could not be reached.
    """
    server_key = load_public_key(server_public_key)
    limits = limits or Limits()
    if pattern not in ("IK", "XX"):
        raise UsageError(f"pattern must be 'IK' or 'XX', not {pattern!r}")
    try:
        async with asyncio.timeout(open_timeout):
            return await _connect(
                url,
                client_keys,
                server_key,
                token=token,
                pattern=pattern,
                limits=limits,
                rekey=rekey,
                ssl=ssl,
                link=link,
                capabilities=capabilities,
                keepalive_interval=keepalive_interval,
                keepalive_timeout=keepalive_timeout,
                open_timeout=open_timeout,
                padding_block=padding_block,
                proxy=proxy,
            )
    except TimeoutError as exc:
        raise HandshakeTimeout(f"could not open {url} within {open_timeout:g} s") from exc


async def _open_ws(url: str, *, limits: Limits, ssl: ssl_module.SSLContext | None, proxy: str | None) -> ClientConnection:
    kwargs: dict[str, Any] = {}
    if ssl is not None:
        kwargs["ssl"] = ssl
    try:
        return await ws_connect(
            url,
            compression=None,
            max_size=_HANDSHAKE_MAX,
            ping_interval=None,
            ping_timeout=None,
            open_timeout=None,
            close_timeout=5,
            user_agent_header=None,
            proxy=proxy,
            **kwargs,
        )
    except InvalidURI as exc:
        raise UsageError(f"not a websocket URL: {url!r}") from exc
    except InvalidHandshake as exc:
        raise HandshakeError(f"websocket handshake with {url} failed: {exc}") from exc


async def _connect(
    url: str,
    keys: KeyPair,
    server_key: PublicKey,
    *,
    token: str | None,
    pattern: str,
    limits: Limits,
    rekey: RekeyPolicy | None,
    ssl: ssl_module.SSLContext | None,
    link: LinkEmulator | None,
    capabilities: Collection[str],
    keepalive_interval: float | None,
    keepalive_timeout: float,
    open_timeout: float,
    padding_block: int,
    proxy: str | None,
) -> Connection:
    ws = await _open_ws(url, limits=limits, ssl=ssl, proxy=proxy)
    protocol = ClientProtocol(
        keys,
        server_key,
        pattern=pattern,
        token=token,
        capabilities=capabilities,
        limits=limits,
        rekey=rekey,
        keepalive_interval=keepalive_interval,
        keepalive_timeout=keepalive_timeout,
        handshake_timeout=open_timeout,
        padding_block=padding_block,
    )
    shapers = link.shapers(client_side=True) if link is not None else (None, None)
    driver = _Driver(ws, protocol, shapers=shapers, describe=f"connection to {url}")
    try:
        await driver.flush()
        while protocol.state is State.HANDSHAKE:
            try:
                data = await driver.recv_handshake()
            except ConnectionClosed as exc:
                code, _ = _close_info(exc)
                raise _refusal(code, keys.public) from None
            try:
                protocol.receive_data(data)
            except ChannelError:
                await driver.flush()
                with contextlib.suppress(Exception):
                    await ws.close(protocol.close_code or int(CloseCode.PROTOCOL_ERROR))
                raise
            await driver.flush()
    except HandshakeError as exc:
        with contextlib.suppress(Exception):
            await ws.close(int(exc.close_code or CloseCode.HANDSHAKE_FAILED))
        if pattern == "IK" and type(exc) is HandshakeError:
            # The server could not decrypt our first message: most likely it holds a
            # different key than the pinned one. Find out which, without revealing ours.
            actual = await _probe(url, limits=limits, ssl=ssl, proxy=proxy)
            if actual is not None and actual != server_key:
                raise ServerKeyMismatch(server_key.fingerprint, actual.fingerprint) from exc
        raise
    except BaseException:
        with contextlib.suppress(Exception):
            await ws.close(int(CloseCode.GOING_AWAY))
        raise
    _raise_ws_limit(ws, limits)
    driver.start()
    return Connection(driver, protocol, url)


async def _probe(url: str, *, limits: Limits, ssl: ssl_module.SSLContext | None, proxy: str | None) -> PublicKey | None:
    """The server's static key via the first two XX messages (our static key is never sent)."""
    try:
        ws = await _open_ws(url, limits=limits, ssl=ssl, proxy=proxy)
    except (OSError, ChannelError):
        return None
    try:
        flow = probe_server_key()
        first = next(flow)
        assert first is not None
        await ws.send(first)
        if next(flow) is not None:  # the flow now waits for message 2
            return None
        reply = await asyncio.wait_for(ws.recv(decode=False), 10)
        try:
            flow.send(bytes(reply))
        except StopIteration as stop:
            key: PublicKey = stop.value
            return key
        return None
    except (ConnectionClosed, TimeoutError, ChannelError, ValueError):
        return None
    finally:
        with contextlib.suppress(Exception):
            await ws.close(int(CloseCode.SERVER_KEY_MISMATCH), CloseCode.SERVER_KEY_MISMATCH.name)


# --------------------------------------------------------------------------- server


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

    async def fail(self, code: ErrorCode, message: str = "", *, retryable: bool = False) -> bool:
        """End the request with ErrorReply(code, message). `message` must be safe to show."""
        return await self._send(ErrorReply(code=code, message=message, retryable=retryable), True)

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


class ServerConnection:
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
        self._driver = driver
        self._protocol = protocol
        assert protocol.peer is not None and protocol.hello is not None
        self.peer_public_key: PublicKey = protocol.peer
        hello = protocol.hello
        self.hello: Hello = Hello(client=hello.client, capabilities=hello.capabilities, max_frame_bytes=hello.max_frame_bytes)
        self.pattern = protocol.pattern
        self.handshake_hash = protocol.handshake_hash
        self.remote_address = remote_address
        self._requests: dict[int, Request] = {}
        self._incoming: asyncio.Queue[Request | None] = asyncio.Queue()
        self._pings: dict[int, tuple[float, asyncio.Future[float]]] = {}
        driver.on_events = self._on_events
        driver.on_closed = self._on_closed

    def __repr__(self) -> str:
        return f"<tether ServerConnection client={self.peer_public_key.fingerprint} from {self.remote_address}>"

    @property
    def closed(self) -> bool:
        return self._driver.closed.is_set()

    @property
    def close_code(self) -> int | None:
        return self._driver.close_code

    def _on_events(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, RequestReceived):
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
            await _quiet(request.fail(exc.code, exc.message, retryable=exc.retryable))
        except (PeerClosed, ConnectionClosed):
            pass
        except Exception:
            log.exception("request %d (%s) from %s failed", request.id, type(request.message).__name__, self.peer_public_key.fingerprint)
            await _quiet(request.fail(ErrorCode.INTERNAL, "internal error"))
        finally:
            if semaphore is not None:
                semaphore.release()

    async def ping(self, *, timeout: float | None = 10.0) -> float:
        """Round-trip time of an encrypted Ping/Pong, in seconds."""
        ping_id = self._protocol.send_ping()
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = (time.monotonic(), future)
        await self._driver.flush()
        return await asyncio.wait_for(future, timeout)

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
        self._ws_server: WsServer | None = None
        self.connections: set[ServerConnection] = set()
        self.host = ""
        self.port = 0
        self._draining = False
        self.refused = 0  # connections closed during the handshake
        self.failed = 0  # connections closed for a protocol error after the handshake

    def __repr__(self) -> str:
        return f"<tether Server {self.host}:{self.port} key={self.public_key.fingerprint}>"

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def _ws_handler(self, ws: WsServerConnection) -> None:
        """One websocket: handshake, admission, then the user's handler. Never raises."""
        remote = ws.remote_address
        describe = f"client {remote[0]}:{remote[1]}" if remote else "client"
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
        )
        shapers = self._link.shapers(client_side=False) if self._link is not None else (None, None)
        driver = _Driver(ws, protocol, shapers=shapers, describe=describe)
        try:
            if not await self._handshake(driver, protocol):
                self.refused += 1
                return
            assert protocol.peer is not None
            _raise_ws_limit(ws, self.limits)
            driver.describe = f"{describe} ({protocol.peer.fingerprint})"
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
        except asyncio.CancelledError:
            raise
        except Exception:  # last line of defence: nothing escapes into websockets' server loop
            log.exception("%s: unexpected failure", describe)
            with contextlib.suppress(Exception):
                await ws.close(int(CloseCode.INTERNAL_ERROR), CloseCode.INTERNAL_ERROR.name)

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
    kwargs: dict[str, Any] = {}
    if ssl is not None:
        kwargs["ssl"] = ssl
    ws_server = await ws_serve(
        server._ws_handler,
        host,
        port,
        compression=None,
        max_size=_HANDSHAKE_MAX,
        ping_interval=None,
        ping_timeout=None,
        close_timeout=5,
        open_timeout=handshake_timeout,
        server_header=None,
        **kwargs,
    )
    server._ws_server = ws_server
    sockname = next(iter(ws_server.sockets)).getsockname()
    server.host, server.port = sockname[0], sockname[1]
    log.info("tether server listening on %s:%d, key %s", server.host, server.port, server.public_key.fingerprint)
    return server

