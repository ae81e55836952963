"""The client side of the asyncio adapter: `connect()` and the `Connection` it returns.

What belongs here: opening a connection (websocket, handshake, the IK key probe) and
correlating requests with replies for the caller; the protocol rules are in `_session.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ssl as ssl_module
import time
from collections.abc import Collection
from typing import Any

from tether.protocol._driver import _Driver, _DriverConnection, _raise_ws_limit
from tether.protocol._errors import (
    ChannelError,
    CloseCode,
    HandshakeError,
    HandshakeReplayed,
    HandshakeTimeout,
    RemoteError,
    ServerKeyMismatch,
    UsageError,
)
from tether.protocol._handshake import probe_server_key
from tether.protocol._keys import KeyPair, PublicKey, load_public_key
from tether.protocol._limits import Limits, RekeyPolicy
from tether.protocol._link import LinkEmulator
from tether.protocol._messages import ErrorReply, Message, Welcome
from tether.protocol._session import ClientProtocol, PongReceived, ReplyReceived, State, _refusal
from tether.protocol._ws import (
    ClientConnection,
    ConnectionClosed,
    InvalidHandshake,
    InvalidURI,
    close_info,
    open_websocket,
)

__all__ = ["Connection", "ReplyStream", "connect"]


class Connection(_DriverConnection):
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
        self._protocol = protocol
        self.url = url
        assert protocol.welcome is not None
        self.welcome: Welcome = protocol.welcome
        self._waiters: dict[int, asyncio.Future[Message] | asyncio.Queue[Any]] = {}
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._ping_started: dict[int, float] = {}
        limit = protocol.peer_max_in_flight or 1 << 30
        self._slots = asyncio.Semaphore(limit)
        super().__init__(driver, protocol)

    def __repr__(self) -> str:
        return f"<tether Connection {self.url} server={self.peer_public_key.fingerprint} pattern={self.pattern}>"

    @property
    def in_flight(self) -> int:
        return self._protocol.in_flight

    @property
    def bytes_sent(self) -> int:
        """Bytes of the websocket messages this connection sent (encrypted records)."""
        return self._driver.bytes_sent

    @property
    def bytes_received(self) -> int:
        """Bytes of the websocket messages this connection received after the handshake."""
        return self._driver.bytes_received

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

    async def _flush(self) -> None:
        """Send what is queued; if the websocket is already closed, raise the connection's
        typed error (PeerClosed with the server's close code...), never a websockets one."""
        await self._driver.flush_checked()

    async def _start(self, message: Message, waiter: asyncio.Future[Message] | asyncio.Queue[Any]) -> int:
        self._check_open()
        request_id = self._protocol.send_request(message)
        self._waiters[request_id] = waiter
        await self._flush()
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
        """Round-trip time of an encrypted Ping/Pong, in seconds.

        Raises:
            PeerClosed, KeepaliveTimeout, ProtocolError...: the connection is closed, or
                closed while waiting (the same error its requests see).
            UsageError: this side is closing the connection.
            TimeoutError: no Pong within `timeout` seconds (the connection stays open).
        """
        self._check_open()
        ping_id = self._protocol.send_ping()
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = future
        self._ping_started[ping_id] = time.monotonic()
        try:
            await self._flush()
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pings.pop(ping_id, None)
            self._ping_started.pop(ping_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved here, so asyncio never warns about it

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
    return RemoteError(int(reply.code), reply.message, retryable=reply.retryable, request_id=event.request_id,
                       reason=reply.reason)


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
        server_public_key: the pinned server key (PublicKey, base64 text or a key file),
            or its fingerprint (``SHA256:...``, as `tether serve` and `tether keys show`
            print it): the key is then learnt from the server with the first two XX
            messages (our own key is not sent), checked against the fingerprint, and the
            handshake proceeds pinned to it. Any other key is refused with
            ServerKeyMismatch naming both fingerprints.
        token: bearer token, sent only inside the encrypted channel.
        pattern: "IK" (the server's key is never sent; message 1 carries a timestamp the
            server checks for replays) or "XX" (the server's key travels encrypted). Both
            take two round trips: the Welcome answers the client's Hello record.
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
        TooManyConnections: this client key already holds the server's
            `max_connections_per_client` connections (refused before the Welcome).
        HandshakeError, VersionMismatch, HandshakeTimeout: the handshake failed
            (HandshakeReplayed only if three fresh IK timestamps in a row were refused).
        PeerClosed: the server closed the connection during the handshake.
        OSError: the server could not be reached.
    """
    limits = limits or Limits()
    if pattern not in ("IK", "XX"):
        raise UsageError(f"pattern must be 'IK' or 'XX', not {pattern!r}")
    try:
        async with asyncio.timeout(open_timeout):
            if _is_fingerprint(server_public_key):
                server_key = await _key_for_fingerprint(url, str(server_public_key), limits=limits, ssl=ssl, proxy=proxy)
            else:
                server_key = load_public_key(server_public_key)
            for attempt in range(_REPLAY_RETRIES + 1):
                try:
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
                except HandshakeReplayed:
                    # Two IK handshakes of this key crossed on the way (the later timestamp
                    # arrived first): a fresh, newer timestamp goes through.
                    if attempt == _REPLAY_RETRIES:
                        raise
            raise AssertionError("unreachable")
    except TimeoutError as exc:
        raise HandshakeTimeout(f"could not open {url} within {open_timeout:g} s") from exc


_REPLAY_RETRIES = 2


async def _open_ws(url: str, *, limits: Limits, ssl: ssl_module.SSLContext | None, proxy: str | None) -> ClientConnection:
    try:
        return await open_websocket(url, ssl=ssl, proxy=proxy)
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

    async def send_queued() -> None:
        try:
            await driver.flush()
        except ConnectionClosed as exc:  # refused on arrival (e.g. 1013: the server is full), or closed
            code, _ = close_info(exc)
            raise _refusal(code, keys.public) from None

    try:
        await send_queued()
        while protocol.state is State.HANDSHAKE:
            try:
                data = await driver.recv_handshake()
            except ConnectionClosed as exc:
                code, _ = close_info(exc)
                raise _refusal(code, keys.public) from None
            try:
                protocol.receive_data(data)
            except ChannelError:
                with contextlib.suppress(ConnectionClosed):
                    await driver.flush()  # our Goodbye, if the peer is still there to read it
                with contextlib.suppress(Exception):
                    await ws.close(protocol.close_code or int(CloseCode.PROTOCOL_ERROR))
                raise
            await send_queued()  # message 3 and the Hello (XX), or the Hello (IK)
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


FINGERPRINT_PREFIX = "SHA256:"


def _is_fingerprint(value: object) -> bool:
    return isinstance(value, str) and value.startswith(FINGERPRINT_PREFIX)


async def _key_for_fingerprint(
    url: str, fingerprint: str, *, limits: Limits, ssl: ssl_module.SSLContext | None, proxy: str | None
) -> PublicKey:
    """The server's static key, learnt by a probe and accepted only if it has `fingerprint`."""
    actual = await _probe(url, limits=limits, ssl=ssl, proxy=proxy)
    if actual is None:
        raise HandshakeError(f"could not learn the server key of {url} to check fingerprint {fingerprint}")
    # Fingerprints are public, but compare in constant time anyway: it costs nothing.
    if not hmac.compare_digest(actual.fingerprint.encode(), fingerprint.strip().encode()):
        raise ServerKeyMismatch(fingerprint.strip(), actual.fingerprint)
    return actual


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


