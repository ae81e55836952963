"""Sans-I/O connection state: handshake, admission, requests in flight, keepalive, close.

What belongs here: every decision about what a connection may send or accept, as a
state machine that takes websocket messages in (`receive_data`) and hands records out
(`data_to_send`) and events back. It never awaits and never touches a socket; time comes
from an injected clock. After `receive_data` raises, the state is CLOSED, `close_code`
says how to close the websocket and `data_to_send()` may still hold an encrypted Goodbye.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import IntEnum

import tether
from tether.protocol._errors import (
    AuthenticationError,
    BadToken,
    ChannelError,
    CloseCode,
    HandshakeError,
    HandshakeReplayed,
    HandshakeTimeout,
    KeepaliveTimeout,
    PeerClosed,
    ProtocolError,
    TooManyConnections,
    UnexpectedMessage,
    UnknownClientKey,
    UsageError,
    VersionMismatch,
)
from tether.protocol._frames import FLAG_END, EncodedFrame, Frame, encode_frame
from tether.protocol._handshake import HELLO_LIMITS, Flow, HandshakeResult, client_handshake, server_handshake
from tether.protocol._keys import Allowlist, KeyPair, PublicKey
from tether.protocol._limits import Limits, RekeyPolicy
from tether.protocol._messages import (
    Cancel,
    ErrorCode,
    ErrorReply,
    Goodbye,
    Hello,
    Kind,
    Message,
    Ping,
    Pong,
    Welcome,
)
from tether.protocol._replay import ReplayGuard
from tether.protocol._transport import Transport

__all__ = [
    "CancelReceived",
    "ClientProtocol",
    "Event",
    "GoodbyeReceived",
    "HandshakeComplete",
    "PongReceived",
    "ReplyReceived",
    "RequestReceived",
    "ServerProtocol",
    "State",
]


class State(IntEnum):
    HANDSHAKE = 1  # Noise messages (and, on the client, waiting for Welcome)
    OPEN = 2  # requests and replies flow
    CLOSING = 3  # this side sent Goodbye; only the websocket close remains
    CLOSED = 4  # failed, or the peer said Goodbye


# Allowed transitions: (from, to). Anything else is a bug in this module.
TRANSITIONS: frozenset[tuple[State, State]] = frozenset(
    {
        (State.HANDSHAKE, State.OPEN),
        (State.HANDSHAKE, State.CLOSED),
        (State.OPEN, State.CLOSING),
        (State.OPEN, State.CLOSED),
        (State.CLOSING, State.CLOSED),
    }
)


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The channel is open. peer: the authenticated static key of the other side."""

    peer: PublicKey
    pattern: str
    handshake_hash: bytes
    hello: Hello | None = None  # on the server
    welcome: Welcome | None = None  # on the client


@dataclass(frozen=True, slots=True)
class RequestReceived:
    request_id: int
    message: Message


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    request_id: int
    message: Message
    end: bool


@dataclass(frozen=True, slots=True)
class CancelReceived:
    request_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    ping_id: int


@dataclass(frozen=True, slots=True)
class GoodbyeReceived:
    code: int
    reason: str


Event = HandshakeComplete | RequestReceived | ReplyReceived | CancelReceived | PongReceived | GoodbyeReceived


def _close_name(code: int) -> str:
    try:
        return CloseCode(code).name
    except ValueError:
        return ""


class _ProtocolBase:
    """What client and server share: records out, events in, keepalive, Goodbye."""

    role = "?"

    def __init__(
        self,
        *,
        limits: Limits | None,
        rekey: RekeyPolicy | None,
        keepalive_interval: float | None,
        keepalive_timeout: float,
        handshake_timeout: float,
        padding_block: int,
        clock: Callable[[], float],
    ) -> None:
        self.limits = limits or Limits()
        self.rekey_policy = rekey or RekeyPolicy()
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.handshake_timeout = handshake_timeout
        self.padding_block = padding_block
        self.clock = clock
        self.state = State.HANDSHAKE
        self.close_code: int | None = None
        self.error: ChannelError | None = None
        self.peer: PublicKey | None = None
        self.peer_goodbye: Goodbye | None = None
        self.handshake_hash: bytes = b""
        self.transport: Transport | None = None
        self.peer_max_frame_bytes = 0  # 0 = not announced
        # Handshake messages (bytes) and transport frames not yet sealed (EncodedFrame): sealing
        # happens when the output is taken, in order, so an adapter may seal large frames
        # off the event loop (`pending_output` + `seal`).
        self._outbox: list[bytes | bytearray | EncodedFrame] = []
        self._events: list[Event] = []
        self._flow: Flow | None = None
        self._started = clock()
        self._last_received = self._started
        self._ping_sent_at: float | None = None
        self._next_ping_id = 1

    # -- state machine helpers

    def _set_state(self, new: State) -> None:
        if (self.state, new) not in TRANSITIONS:
            raise AssertionError(f"illegal transition {self.state.name} -> {new.name}")
        self.state = new

    def has_data_to_send(self) -> bool:
        return bool(self._outbox)

    def data_to_send(self) -> list[bytes | bytearray]:
        """Records to write to the websocket, in order (each is one binary message)."""
        out: list[bytes | bytearray] = []
        for item in self.pending_output():
            if isinstance(item, EncodedFrame):
                out.extend(self.seal(item))
            else:
                out.append(item)
        return out

    def pending_output(self) -> list[bytes | bytearray | EncodedFrame]:
        """Output in order: ready records, and frames to pass through `seal()` in this order.

        For adapters that seal each frame just before writing it (no sealed copy of the
        whole backlog in memory); `data_to_send()` is the simple alternative. The caller
        must seal every frame, in order, before taking more.
        """
        out, self._outbox = self._outbox, []
        return out

    def seal(self, frame: EncodedFrame) -> list[bytearray]:
        """Encrypt one queued frame into its record(s) (a Rekey record may follow)."""
        assert self.transport is not None
        return self.transport.seal(frame)

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _fail(self, exc: ChannelError) -> None:
        if self.state is State.CLOSED:
            return
        self.error = exc
        self.close_code = int(exc.close_code or CloseCode.INTERNAL_ERROR)
        if self.transport is not None and self.state is not State.CLOSING and self.peer_goodbye is None:
            # Tell the peer why, authenticated; the websocket close code says it too.
            self._send_control(Goodbye(code=self.close_code, reason=_close_name(self.close_code)))
        self._set_state(State.CLOSED)

    # -- input

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed one received websocket message; returns the events it produced.

        Raises:
            ChannelError: the peer broke the protocol or was refused; the state is CLOSED
                and `close_code` is set. Nothing raised here is the caller's fault.
        """
        if self.state is State.CLOSED:
            return []
        try:
            if self.state is State.HANDSHAKE and self._flow is not None:
                self._advance_flow(bytes(data))
            else:
                self._receive_record(data)
        except ChannelError as exc:
            self._fail(exc)
            raise
        events, self._events = self._events, []
        return events

    def open_record(self, data: bytes | bytearray | memoryview) -> Frame | None:
        """Decrypt and decode one transport message, changing nothing but the receive cipher.

        For adapters that handle large messages off the event loop: run this in a worker
        thread, then pass its result to `receive_opened` on the loop (in arrival order, one
        message at a time). Only the receiving half of the transport is touched, so the loop
        may keep sending meanwhile.

        Raises:
            ChannelError: the message is unacceptable; pass it to `fail()`.
            UsageError: the connection is not past its handshake.
        """
        if self.transport is None or self.state is State.HANDSHAKE:
            raise UsageError("open_record() is for transport messages after the handshake")
        return self.transport.open(data)

    def receive_opened(self, frame: Frame | None) -> list[Event]:
        """Handle a message `open_record` returned; like `receive_data` from there on."""
        if self.state is State.CLOSED:
            return []
        try:
            self._receive_decoded(frame)
        except ChannelError as exc:
            self._fail(exc)
            raise
        events, self._events = self._events, []
        return events

    def _advance_flow(self, data: bytes | None) -> None:
        assert self._flow is not None
        try:
            step = self._flow.send(data) if data is not None else next(self._flow)
            while step is not None:
                self._outbox.append(step)
                step = next(self._flow)
        except StopIteration as stop:
            self._flow = None
            self._handshake_done(stop.value)
        except ValueError as exc:  # DH or key parsing failures inside cryptography
            raise HandshakeError("handshake failed") from exc

    def _handshake_done(self, result: HandshakeResult) -> None:
        raise NotImplementedError

    def fail(self, exc: ChannelError) -> None:
        """Close because of `exc` (for adapters that detect errors themselves)."""
        self._fail(exc)

    def _receive_record(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        self._receive_decoded(self.transport.open(data))

    def _receive_decoded(self, frame: Frame | None) -> None:
        self._last_received = self.clock()
        self._ping_sent_at = None  # any authentic record proves the peer is alive
        if frame is None:
            return  # Rekey, handled by the transport
        message = frame.message
        if isinstance(message, (Ping, Pong, Goodbye)):
            if frame.flags:
                raise UnexpectedMessage(f"{type(message).__name__} carries flags")
            if isinstance(message, Ping):
                if self.state is State.OPEN:
                    self._send_control(Pong(), request_id=frame.request_id)
            elif isinstance(message, Pong):
                self._emit(PongReceived(frame.request_id))
            else:
                self._receive_goodbye(message)
            return
        self._receive_frame(message, frame.request_id, frame.flags)

    def _receive_goodbye(self, message: Goodbye) -> None:
        self.peer_goodbye = message
        self.close_code = message.code
        self._emit(GoodbyeReceived(message.code, message.reason))
        self._set_state(State.CLOSED)

    def _receive_frame(self, message: Message, request_id: int, flags: int) -> None:
        raise NotImplementedError

    # -- output

    def _seal(self, encoded: EncodedFrame) -> None:
        assert self.transport is not None
        self._outbox.append(encoded)

    def _encode(self, message: Message, request_id: int, flags: int) -> EncodedFrame:
        encoded = encode_frame(message, request_id=request_id, flags=flags)
        if self.padding_block > 1:
            padding = (-(encoded.size)) % self.padding_block
            if padding:
                encoded = encode_frame(message, request_id=request_id, flags=flags, padding=padding)
        if self.peer_max_frame_bytes and encoded.size > self.peer_max_frame_bytes:
            raise UsageError(
                f"frame of {encoded.size} bytes exceeds the peer's limit of {self.peer_max_frame_bytes} bytes"
            )
        return encoded

    def _send_control(self, message: Message, request_id: int = 0) -> None:
        self._seal(encode_frame(message, request_id=request_id))

    def _require_open(self) -> None:
        if self.state is not State.OPEN:
            raise UsageError(f"connection is {self.state.name.lower()}, not open")

    def send_ping(self) -> int:
        """Queue a Ping; returns its id (a PongReceived event with the same id answers it)."""
        self._require_open()
        ping_id = self._next_ping_id
        self._next_ping_id += 1
        self._send_control(Ping(), request_id=ping_id)
        if self._ping_sent_at is None:
            self._ping_sent_at = self.clock()
        return ping_id

    def send_goodbye(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Announce a close (authenticated); the caller then closes the websocket with `code`."""
        if self.state is State.OPEN:
            self._send_control(Goodbye(code=int(code), reason=reason or _close_name(code)))
            self._set_state(State.CLOSING)
        elif self.state is State.HANDSHAKE:
            self._set_state(State.CLOSED)
        self.close_code = int(code)

    def connection_lost(self, code: int = CloseCode.ABNORMAL, reason: str = "") -> PeerClosed:
        """The websocket closed; returns the PeerClosed that pending operations should see."""
        clean = self.peer_goodbye is not None
        if self.state is not State.CLOSED:
            self._set_state(State.CLOSED)
        return PeerClosed(code, reason, clean=clean)

    # -- timers

    def next_deadline(self) -> float | None:
        """When `poll()` next has something to do (clock time), or None."""
        if self.state is State.HANDSHAKE:
            return self._started + self.handshake_timeout
        if self.state is not State.OPEN or self.keepalive_interval is None:
            return None
        if self._ping_sent_at is not None:
            return self._ping_sent_at + self.keepalive_timeout
        return self._last_received + self.keepalive_interval

    def poll(self) -> None:
        """Run timers: fail a slow handshake, send a keepalive Ping, or detect a half-open link.

        Raises:
            HandshakeTimeout, KeepaliveTimeout: the state is CLOSED afterwards.
        """
        now = self.clock()
        try:
            if self.state is State.HANDSHAKE:
                if now >= self._started + self.handshake_timeout:
                    raise HandshakeTimeout(f"handshake not complete after {self.handshake_timeout:g} s")
                return
            if self.state is not State.OPEN or self.keepalive_interval is None:
                return
            if self._ping_sent_at is not None:
                if now >= self._ping_sent_at + self.keepalive_timeout:
                    raise KeepaliveTimeout(self.keepalive_timeout)
            elif now >= self._last_received + self.keepalive_interval:
                self.send_ping()
        except ChannelError as exc:
            self._fail(exc)
            raise


@dataclass(slots=True)
class _Pending:
    request: type[Message]
    cancelled: bool = False


class ClientProtocol(_ProtocolBase):
    """The client (initiator) side.

    Args:
        keys: the client's static key pair.
        server_key: the pinned server public key (the handshake fails on any other).
        pattern: "IK" (needs the pinned key; message 1 carries a replay-checked timestamp) or "XX".
        token: optional bearer token, sent in the Hello (the first transport record:
            forward secret in both patterns).
        capabilities: strings the client announces.
        limits, rekey, keepalive_interval, keepalive_timeout, handshake_timeout,
        padding_block: see `connect`.
        clock: monotonic time source (tests inject a fake).
    """

    role = "client"

    def __init__(
        self,
        keys: KeyPair,
        server_key: PublicKey,
        *,
        pattern: str = "IK",
        token: str | None = None,
        capabilities: Collection[str] = (),
        limits: Limits | None = None,
        rekey: RekeyPolicy | None = None,
        keepalive_interval: float | None = 20.0,
        keepalive_timeout: float = 20.0,
        handshake_timeout: float = 10.0,
        padding_block: int = 0,
        clock: Callable[[], float] = time.monotonic,
        flow: Flow | None = None,
    ) -> None:
        super().__init__(
            limits=limits,
            rekey=rekey,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            handshake_timeout=handshake_timeout,
            padding_block=padding_block,
            clock=clock,
        )
        self.keys = keys
        self.server_key = server_key
        self.pattern = pattern
        self.welcome: Welcome | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_request_id = 1
        self.peer_max_in_flight = 0
        self._hello = Hello(
            client=f"tether/{tether.__version__}",
            capabilities=tuple(capabilities),
            token=token,
            max_frame_bytes=self.limits.max_frame_bytes,
        )
        self._flow = flow or client_handshake(keys, server_key, pattern=pattern)
        try:
            self._advance_flow(None)
        except ChannelError as exc:
            self._fail(exc)
            raise

    def _handshake_done(self, result: HandshakeResult) -> None:
        self.transport = Transport(result.send, result.receive, limits=self.limits, rekey=self.rekey_policy)
        self.peer = result.peer
        self.handshake_hash = result.handshake_hash
        # The Hello is the first transport record: forward secret, and the proof of liveness
        # the server waits for before it counts or admits the connection.
        self._send_control(self._hello)
        # Still HANDSHAKE: the server's verdict (Welcome, or Goodbye with a reason) comes next.

    def _receive_goodbye(self, message: Goodbye) -> None:
        if self.state is State.HANDSHAKE:
            self.peer_goodbye = message
            raise _refusal(message.code, self.keys.public)
        super()._receive_goodbye(message)

    def _receive_frame(self, message: Message, request_id: int, flags: int) -> None:
        if self.state is State.HANDSHAKE:
            if not isinstance(message, Welcome) or request_id or flags:
                raise UnexpectedMessage(f"expected Welcome, got {type(message).__name__}")
            self.welcome = message
            self.peer_max_frame_bytes = message.max_frame_bytes
            self.peer_max_in_flight = message.max_in_flight
            self._set_state(State.OPEN)
            self._last_received = self.clock()
            assert self.peer is not None
            self._emit(HandshakeComplete(self.peer, self.pattern, self.handshake_hash, welcome=message))
            return
        if message.KIND is not Kind.REPLY:
            raise UnexpectedMessage(f"a server may not send {type(message).__name__}")
        pending = self._pending.get(request_id)
        if pending is None:
            raise UnexpectedMessage(f"{type(message).__name__} answers request {request_id}, which is not open")
        end = bool(flags & FLAG_END)
        if flags & ~FLAG_END:
            raise UnexpectedMessage("unknown reply flags")
        if isinstance(message, ErrorReply):
            if not end:
                raise UnexpectedMessage("an ErrorReply must end its request")
        elif type(message) is not pending.request.REPLY:
            raise UnexpectedMessage(f"{type(message).__name__} is not a reply to {pending.request.__name__}")
        elif not end and not pending.request.STREAMING:
            raise UnexpectedMessage(f"{pending.request.__name__} does not stream replies")
        if end:
            del self._pending[request_id]
        elif pending.cancelled:
            return
        self._emit(ReplyReceived(request_id, message, end))

    def send_request(self, message: Message) -> int:
        """Queue a request; returns its request id.

        Raises:
            UsageError: not open, not a request type, too many in flight, or the frame is
                larger than the server accepts. Nothing was sent.
        """
        self._require_open()
        if message.KIND is not Kind.REQUEST:
            raise UsageError(f"{type(message).__name__} is not a request")
        if self.peer_max_in_flight and len(self._pending) >= self.peer_max_in_flight:
            raise UsageError(f"{len(self._pending)} requests already in flight (server limit)")
        request_id = self._next_request_id
        encoded = self._encode(message, request_id, 0)
        self._next_request_id += 1
        self._pending[request_id] = _Pending(type(message))
        self._seal(encoded)
        return request_id

    def cancel(self, request_id: int) -> bool:
        """Ask the server to abandon a request. Returns False when it is no longer open."""
        pending = self._pending.get(request_id)
        if pending is None or pending.cancelled or self.state is not State.OPEN:
            return False
        pending.cancelled = True
        self._send_control(Cancel(), request_id=request_id)
        return True

    @property
    def in_flight(self) -> int:
        return len(self._pending)


def _refusal(code: int, own_key: PublicKey) -> ChannelError:
    """The error a client raises when the server refuses it with `code` (Goodbye or close)."""
    if code == CloseCode.UNKNOWN_CLIENT_KEY:
        return UnknownClientKey(own_key.fingerprint, public_key=own_key.to_text())
    if code == CloseCode.BAD_TOKEN:
        return BadToken("the server refused the bearer token")
    if code == CloseCode.AUTHENTICATION_FAILED:
        return AuthenticationError("the server refused the client")
    if code == CloseCode.UNSUPPORTED_VERSION:
        return VersionMismatch("the server does not speak this protocol version or pattern")
    if code == CloseCode.HANDSHAKE_TIMEOUT:
        return HandshakeTimeout("the server timed out the handshake")
    if code == CloseCode.HANDSHAKE_FAILED:
        return HandshakeError("the server rejected the handshake")
    if code == CloseCode.HANDSHAKE_REPLAYED:
        return HandshakeReplayed("the server has seen a newer handshake from this client key")
    if code == CloseCode.TOO_MANY_CONNECTIONS:
        return TooManyConnections(
            f"client key {own_key.fingerprint} already holds the server's maximum of connections per client "
            "(max_connections_per_client): close one of them, or ask the operator to raise the limit"
        )
    return PeerClosed(code, _close_name(code))


class ServerProtocol(_ProtocolBase):
    """The server (responder) side.

    Args:
        keys: the server's static key pair.
        allowlist: client keys admitted; None admits any key (token may still be required).
        token: the bearer token clients must send, or None.
        patterns: handshake patterns offered.
        server_name, capabilities, models: announced in the Welcome.
        replay_guard: the IK timestamps seen, shared by all connections of a server
            (`serve` passes one); None skips the replay check.
        admit: called with the client's key once its Hello has arrived (the client proved
            it holds the session keys) and passed the allowlist and token, before the
            Welcome; it may raise an `AdmissionRefused` to refuse (e.g. TooManyConnections),
            which closes with that error's code after an encrypted Goodbye.
        limits, rekey, keepalive_interval, keepalive_timeout, handshake_timeout,
        padding_block, clock: see `serve`.

    Order of admission: the Noise handshake (IK: the timestamp must be newer than the
    last one from that key, else HandshakeReplayed before any answer), then the client's
    first transport record, which must be its Hello: allowlist, token, `admit`, Welcome.
    """

    role = "server"

    def __init__(
        self,
        keys: KeyPair,
        *,
        allowlist: Allowlist | None = None,
        token: str | None = None,
        patterns: tuple[str, ...] = ("XX", "IK"),
        server_name: str = "",
        capabilities: Collection[str] = (),
        models: Collection[str] = (),
        limits: Limits | None = None,
        rekey: RekeyPolicy | None = None,
        keepalive_interval: float | None = 20.0,
        keepalive_timeout: float = 20.0,
        handshake_timeout: float = 10.0,
        padding_block: int = 0,
        clock: Callable[[], float] = time.monotonic,
        replay_guard: ReplayGuard | None = None,
        admit: Callable[[PublicKey], None] | None = None,
    ) -> None:
        super().__init__(
            limits=limits,
            rekey=rekey,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            handshake_timeout=handshake_timeout,
            padding_block=padding_block,
            clock=clock,
        )
        self.keys = keys
        self.allowlist = allowlist
        self._replay_guard = replay_guard
        self._admit = admit
        self._token = token
        self._token_digest = hashlib.sha256(token.encode("utf-8")).digest() if token is not None else b""
        self.server_name = server_name or f"tether/{tether.__version__}"
        self.capabilities = tuple(capabilities)
        self.models = tuple(models)
        self.hello: Hello | None = None
        self.pattern = ""
        self.draining = False
        self._active: dict[int, type[Message]] = {}
        self._last_request_id = 0
        self._flow = server_handshake(keys, patterns=patterns, check_initiator=self._check_initiator)
        next(self._flow)  # run to the first "need data"

    def _check_initiator(self, peer: PublicKey, timestamp: bytes) -> None:
        """IK message 1 authenticated: refuse a replay before answering it."""
        if self._replay_guard is None:
            return
        # Only keys the allowlist admits are remembered, which bounds the table by the
        # allowlist; any other key is refused after its Hello anyway.
        if self.allowlist is not None and peer not in self.allowlist:
            return
        self._replay_guard.check(peer, timestamp)

    def _handshake_done(self, result: HandshakeResult) -> None:
        self.transport = Transport(result.send, result.receive, limits=self.limits, rekey=self.rekey_policy)
        self.peer = result.peer
        self.handshake_hash = result.handshake_hash
        self.pattern = result.pattern
        # Still HANDSHAKE: nothing is decided until the client's first transport record.

    def _receive_record(self, data: bytes | bytearray | memoryview) -> None:
        if self.state is not State.HANDSHAKE:
            super()._receive_record(data)
            return
        assert self.transport is not None
        try:
            frame = self.transport.open(data, HELLO_LIMITS)
        except ProtocolError as exc:
            raise HandshakeError(f"the client's first record is not a valid Hello: {exc}") from exc
        if frame is None or not isinstance(frame.message, Hello) or frame.request_id or frame.flags:
            raise HandshakeError("the client's first record must be a Hello (request id 0, flags 0)")
        self._admit_hello(frame.message)

    def _admit_hello(self, hello: Hello) -> None:
        """The client is live (it encrypted to this handshake's keys): admit it or refuse."""
        peer = self.peer
        assert peer is not None
        self.hello = hello
        if self.allowlist is not None and peer not in self.allowlist:
            raise UnknownClientKey(peer.fingerprint)
        if self._token is not None:
            # Compare digests, so neither the token's content nor its length leaks by timing.
            offered = hashlib.sha256((hello.token or "").encode("utf-8")).digest()
            if not hmac.compare_digest(offered, self._token_digest):
                raise BadToken(f"client {peer.fingerprint} sent a missing or wrong bearer token")
        if self._admit is not None:
            self._admit(peer)
        self.peer_max_frame_bytes = hello.max_frame_bytes
        limits = self.limits
        self._send_control(
            Welcome(
                server=self.server_name,
                capabilities=self.capabilities,
                models=self.models,
                max_frame_bytes=limits.max_frame_bytes,
                max_metadata_bytes=limits.max_metadata_bytes,
                max_tensor_elements=limits.max_tensor_elements,
                max_in_flight=limits.max_in_flight,
                keepalive_interval=float(self.keepalive_interval or 0.0),
            )
        )
        self._set_state(State.OPEN)
        self._last_received = self.clock()
        self._emit(HandshakeComplete(peer, self.pattern, self.handshake_hash, hello=hello))

    def _receive_frame(self, message: Message, request_id: int, flags: int) -> None:
        if isinstance(message, Cancel):
            if flags or request_id == 0 or request_id > self._last_request_id:
                raise UnexpectedMessage(f"Cancel for request {request_id}, which was never sent")
            if request_id in self._active and self.state is State.OPEN:
                self._emit(CancelReceived(request_id))
            return
        if message.KIND is not Kind.REQUEST:
            raise UnexpectedMessage(f"a client may not send {type(message).__name__}")
        if flags:
            raise UnexpectedMessage("requests carry no flags")
        if request_id <= self._last_request_id:
            raise UnexpectedMessage(f"request id {request_id} does not increase (last {self._last_request_id})")
        self._last_request_id = request_id
        if self.state is not State.OPEN:
            return  # closing: in-flight work finishes, new requests are dropped
        if self.draining:
            self._queue_error(request_id, ErrorCode.SHUTTING_DOWN, "server is shutting down", retryable=True)
            return
        if len(self._active) >= self.limits.max_in_flight:
            self._queue_error(
                request_id, ErrorCode.OVERLOADED, f"more than {self.limits.max_in_flight} requests in flight", True
            )
            return
        self._active[request_id] = type(message)
        self._emit(RequestReceived(request_id, message))

    def _queue_error(self, request_id: int, code: ErrorCode, text: str, retryable: bool = False) -> None:
        self._seal(self._encode(ErrorReply(code=code, message=text, retryable=retryable), request_id, FLAG_END))

    def is_active(self, request_id: int) -> bool:
        return request_id in self._active

    @property
    def active_requests(self) -> tuple[int, ...]:
        return tuple(self._active)

    def send_reply(self, request_id: int, message: Message, *, end: bool = True) -> None:
        """Queue a reply (`end=False` for a non-final chunk of a streaming reply).

        Raises:
            UsageError: the request is not open, the reply type does not answer it, it
                cannot stream, or the frame is larger than the client accepts. Nothing was
                sent; on a size error the request is still open (send an ErrorReply).
        """
        if self.state not in (State.OPEN, State.CLOSING):
            raise UsageError(f"connection is {self.state.name.lower()}")
        request = self._active.get(request_id)
        if request is None:
            raise UsageError(f"request {request_id} is not open")
        if isinstance(message, ErrorReply):
            end = True
        elif type(message) is not request.REPLY:
            raise UsageError(f"{type(message).__name__} does not answer {request.__name__}")
        elif not end and not request.STREAMING:
            raise UsageError(f"{request.__name__} does not stream replies")
        encoded = self._encode(message, request_id, FLAG_END if end else 0)
        if end:
            del self._active[request_id]
        self._seal(encoded)

    def send_error(self, request_id: int, code: ErrorCode, message: str = "", *, retryable: bool = False) -> None:
        """End a request with ErrorReply(code, message); `message` must be safe to show."""
        self.send_reply(request_id, ErrorReply(code=code, message=message, retryable=retryable))

    def start_draining(self) -> None:
        """Refuse new requests with ErrorReply(SHUTTING_DOWN); open ones may finish."""
        self.draining = True

