"""The asyncio driver of one connection: feeds a websocket into a sans-I/O protocol.

What belongs here: tasks, timers and futures around one ClientProtocol or
ServerProtocol; nothing the protocol decides. Peer misbehaviour never escapes as an
exception: it closes the connection with the error's close code and logs one line, without
the error text going on the wire.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from tether.protocol._errors import ChannelError, CloseCode, ProtocolError, UsageError
from tether.protocol._frames import EncodedFrame
from tether.protocol._keys import PublicKey
from tether.protocol._limits import Limits
from tether.protocol._link import Shaper
from tether.protocol._session import ClientProtocol, ServerProtocol, State
from tether.protocol._transport import message_size
from tether.protocol._ws import (
    FRAGMENT_BYTES,
    ConnectionClosed,
    WebSocket,
    close_info,
    fragments,
    raise_message_limit,
)

log = logging.getLogger("tether.protocol")

_OVERSIZE_SLACK = 1024 * 1024


def _ws_max_size(limits: Limits) -> int:
    """The websocket message limit once authenticated: the frame limit plus the record
    overhead plus slack, so that a moderately oversized record reaches the record layer and
    closes with FRAME_TOO_LARGE (4030); anything larger is refused by the websocket layer
    itself with 1009 before it is buffered."""
    return message_size(limits.max_frame_bytes) + _OVERSIZE_SLACK


def _raise_ws_limit(ws: WebSocket, limits: Limits) -> None:
    """Lift the handshake-time message limit to the transport limit (authenticated peers only)."""
    raise_message_limit(ws, _ws_max_size(limits))


def _code_name(code: int | None) -> str:
    try:
        return CloseCode(code or 0).name
    except ValueError:
        return str(code)


_CLOSE_FLUSH_S = 5.0  # how long a closing connection may take to send its last records
# Messages larger than this are sealed and opened in a worker thread. `cryptography`'s AEAD
# holds the GIL for each call, but a large message is many 64 KiB records, and between them
# the event loop runs: a 32 MiB frame (tens of ms of decryption plus page faults on its fresh
# buffer) no longer stalls every other connection's keepalive and handshake.
OFFLOAD_BYTES = 1024 * 1024


class _Driver:
    """Pumps one websocket through one sans-I/O protocol: sending, receiving, timers."""

    def __init__(
        self,
        ws: WebSocket,
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
        self._tasks: set[asyncio.Task[None]] = set()
        self._lost_exc: ConnectionClosed | None = None
        self.on_events: Callable[[list[Any]], None] = lambda events: None
        self.on_closed: Callable[[ChannelError], None] = lambda exc: None
        self.closed = asyncio.Event()
        self.close_exc: ChannelError | None = None
        self.close_code: int | None = None
        # Websocket message payload bytes (records; websocket framing excluded), for statistics.
        self.bytes_sent = 0
        self.bytes_received = 0

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

    async def flush_checked(self) -> None:
        """`flush()`, raising the connection's typed error (`close_exc`: PeerClosed with the
        peer's close code, KeepaliveTimeout...) if it is over, never a websockets exception."""
        try:
            await self.flush()
        except ConnectionClosed:
            await self.closed.wait()  # the reader turns the close into that error
        if self.closed.is_set():
            assert self.close_exc is not None
            raise self.close_exc

    def flush_soon(self) -> None:
        """Start sending what is queued without waiting (for callers that must not await)."""
        if self.closed.is_set():
            return
        if self._sender_task is None:
            self._sender_task = asyncio.get_running_loop().create_task(self._sender())
        self._kick.set()

    async def _sender(self) -> None:
        """Seal and send queued output in order, forever (cancelled when the connection ends).

        Frames up to OFFLOAD_BYTES are sealed on the event loop (a hand-off would cost more
        than the encryption); larger ones in a worker thread, so the loop keeps running.
        """
        while True:
            waiters: list[asyncio.Future[None]] = []
            error: BaseException | None = None
            try:
                await self._kick.wait()
                self._kick.clear()
                waiters, self._flush_waiters = self._flush_waiters, []
                for item in self.protocol.pending_output():
                    if not isinstance(item, EncodedFrame):
                        records = [item]
                    elif item.size > OFFLOAD_BYTES:
                        records = await asyncio.to_thread(self.protocol.seal, item)
                    else:
                        records = self.protocol.seal(item)
                    for record in records:
                        await self._send_record(record)
            except ConnectionClosed as exc:
                error = exc
            except asyncio.CancelledError:
                # Only `_finish` cancels the sender: the connection is over, so release every
                # flush() caller (they learn the outcome from their own reply waiters).
                self._release_flush_waiters(waiters)
                raise
            for waiter in waiters:
                if not waiter.done():
                    if error is None:
                        waiter.set_result(None)
                    else:
                        waiter.set_exception(error)

    def _release_flush_waiters(self, taken: Sequence[asyncio.Future[None]] = ()) -> None:
        pending, self._flush_waiters = [*taken, *self._flush_waiters], []
        for waiter in pending:
            if not waiter.done():
                waiter.set_result(None)

    async def _send_record(self, record: bytes | bytearray) -> None:
        self.bytes_sent += len(record)
        if self._out_shaper is None:
            await self._ws_send(record)
            return
        if self._out_queue is None:
            self._out_queue = asyncio.Queue()
            self._out_task = asyncio.get_running_loop().create_task(self._out_pump())
        self._out_queue.put_nowait((self._out_shaper.schedule(len(record), time.monotonic()), record))

    async def _ws_send(self, record: bytes | bytearray) -> None:
        """One record as one websocket message, fragmented when large (see FRAGMENT_BYTES)."""
        await self.ws.send(record if len(record) <= FRAGMENT_BYTES else fragments(record))

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
                await self._ws_send(record)

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
        """Start the background reader and the timer (after the handshake)."""
        if self._in_shaper is not None:
            self._in_queue = asyncio.Queue()
            self._spawn(self._deliver())
        self._spawn(self._reader())
        self._spawn(self._timer())

    async def _reader(self) -> None:
        try:
            while True:
                data = await self.ws.recv(decode=False)
                if isinstance(data, str):
                    await self.abort(ProtocolError("text message on a binary protocol"))
                    return
                self.bytes_received += len(data)
                if self._in_queue is not None:
                    assert self._in_shaper is not None
                    self._in_queue.put_nowait((self._in_shaper.schedule(len(data), time.monotonic()), data))
                elif not await self._ingest(data):
                    return
        except ConnectionClosed as exc:
            self._lost_exc = exc
            if self._in_queue is not None:
                self._in_queue.put_nowait(None)  # the deliverer ends the connection after queued records
            else:
                self._lost()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the server down
            log.exception("%s: reader failed", self.describe)
            await self.abort(ChannelError(f"internal error: {type(exc).__name__}"), code=CloseCode.INTERNAL_ERROR)

    async def _deliver(self) -> None:
        """Emulated downlink: hand records on at their arrival time."""
        assert self._in_queue is not None
        try:
            while True:
                item = await self._in_queue.get()
                if item is None:
                    self._lost()
                    return
                at, data = item
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not await self._ingest(data):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: delivery failed", self.describe)
            await self.abort(ChannelError(f"internal error: {type(exc).__name__}"), code=CloseCode.INTERNAL_ERROR)

    async def _ingest(self, data: bytes) -> bool:
        """Decrypt and handle one message, in arrival order; False once the connection is over."""
        protocol = self.protocol
        try:
            if len(data) > OFFLOAD_BYTES and protocol.state is not State.HANDSHAKE:
                events = protocol.receive_opened(await asyncio.to_thread(protocol.open_record, data))
            else:
                events = protocol.receive_data(data)
        except ChannelError as exc:
            protocol.fail(exc)  # (a no-op when receive_data already failed it)
            await self.abort(exc, already_failed=True)
            return False
        if events:
            self.on_events(events)
        if protocol.has_data_to_send():
            # Waiting here backpressures a peer whose requests produce replies faster than
            # it reads them.
            with contextlib.suppress(ConnectionClosed):
                await self.flush()
        if protocol.state is State.CLOSED:
            # The peer said Goodbye: echo its code on the websocket and finish.
            code = protocol.close_code or int(CloseCode.NORMAL)
            self._finish(protocol.connection_lost(code, _code_name(code)), code)
            with contextlib.suppress(Exception):
                await self.ws.close(code, _code_name(code))
            return False
        return True

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
            # Never wait here for the send: a peer that stops reading would stop the clock,
            # and with it the keepalive that is meant to detect it.
            self.flush_soon()

    # ---- closing

    async def abort(self, exc: ChannelError, *, already_failed: bool = False, code: int | None = None) -> None:
        """Close because of `exc`: log it, send the Goodbye the protocol queued, close with its code."""
        if not already_failed:
            self.protocol.fail(exc)
        close_code = int(code or self.protocol.close_code or exc.close_code or CloseCode.INTERNAL_ERROR)
        log.warning("%s: closing with %s (%d): %s", self.describe, _code_name(close_code), close_code, exc)
        await self._flush_before_close()
        self._finish(exc, close_code)
        with contextlib.suppress(Exception):
            await self.ws.close(close_code, _code_name(close_code))

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Graceful close: Goodbye inside the channel, then the websocket close."""
        if self.closed.is_set():
            return
        self.protocol.send_goodbye(code, reason)
        await self._flush_before_close()
        self._finish(UsageError("the connection was closed by this side"), int(code))
        with contextlib.suppress(Exception):
            await self.ws.close(int(code), _code_name(code))

    async def _flush_before_close(self) -> None:
        """Send what is queued (the Goodbye last), for at most `_CLOSE_FLUSH_S`: a peer that
        stops reading must not keep a closing connection, and its memory, alive."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_FLUSH_S):
                await self.flush()
                await self._drain_out()

    def _lost(self) -> None:
        code, reason = close_info(self._lost_exc) if self._lost_exc is not None else (int(CloseCode.ABNORMAL), "")
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
        # a sender cancelled before it first ran never reaches its own cleanup
        self._release_flush_waiters()

    async def wait_closed(self) -> None:
        await self.closed.wait()




class _DriverConnection(abc.ABC):
    """What the client's and the server's connection objects share: one driver, the
    authenticated peer and the handshake's outcome; each end handles the events itself.

    Subclasses set up their own state first and call this last, because the driver may hand
    them events as soon as its hooks point at them.
    """

    def __init__(self, driver: _Driver, protocol: ClientProtocol | ServerProtocol) -> None:
        self._driver = driver
        assert protocol.peer is not None
        self.peer_public_key: PublicKey = protocol.peer
        self.pattern = protocol.pattern
        self.handshake_hash = protocol.handshake_hash
        driver.on_events = self._on_events
        driver.on_closed = self._on_closed

    @property
    def closed(self) -> bool:
        return self._driver.closed.is_set()

    @property
    def close_code(self) -> int | None:
        return self._driver.close_code

    @abc.abstractmethod
    def _on_events(self, events: list[Any]) -> None:
        """Handle the events the protocol produced from one received websocket message."""

    @abc.abstractmethod
    def _on_closed(self, exc: ChannelError) -> None:
        """Fail whatever is still waiting: the connection closed with `exc`."""
