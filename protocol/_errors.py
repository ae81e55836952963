"""Exceptions of the encrypted channel, and the websocket close code of each.

What belongs here: exception classes and the close-code table, nothing else. Each class
that can end a connection has exactly one close code (`close_code`), used both to close
the websocket and, on the other side, to name the error again (`error_for_close_code`).
Exception text is for local logs and callers only; the wire carries the code alone.

Hierarchy::

    TetherError
    └── ChannelError                  root of everything tether.protocol raises
        ├── UsageError                you misused the API (local; never sent, no close code)
        │   └── InvalidMessage        a message was built with bad field values
        ├── HandshakeError            4001 the Noise handshake failed (bad message, DH failure)
        │   ├── VersionMismatch       4002 the peer speaks a protocol version we do not
        │   ├── HandshakeTimeout      4003 the handshake did not finish in time
        │   ├── HandshakeReplayed     4004 an IK first message whose timestamp is not newer (a replay)
        │   └── AuthenticationError   4010 a peer identity or credential was refused
        │       ├── ServerKeyMismatch 4011 server's static key is not the pinned one (client side)
        │       ├── UnknownClientKey  4012 client's static key is not in the allowlist
        │       └── BadToken          4013 missing or wrong bearer token
        ├── ProtocolError             4000 the peer sent something malformed (remote)
        │   ├── FrameTampered         4020 a record failed authentication (flipped bits, wrong key)
        │   ├── FrameReplayed         4021 a record's counter is below the next expected one
        │   ├── FrameReordered        4022 a record's counter skips ahead of the next expected one
        │   ├── FrameTruncated        4023 a record is shorter than its declared length
        │   ├── LimitExceeded         4034 a declared size is over a configured maximum
        │   │   ├── FrameTooLarge     4030 ... the frame
        │   │   ├── MetadataTooLarge  4031 ... the metadata part
        │   │   └── TensorTooLarge    4032 ... a tensor's element count
        │   ├── UnknownMessageType    4040 the message type is not in the catalogue
        │   ├── BadTensor             4041 bad dtype, shape disagreeing with length, bad layout
        │   ├── BadMetadata           4042 metadata is not valid strict JSON for its type
        │   └── UnexpectedMessage     4043 a valid message at the wrong time or in the wrong direction
        ├── KeepaliveTimeout          4050 the peer stopped answering pings (half-open link)
        ├── AdmissionRefused          the server is at a configured connection limit (server side)
        │   ├── ServerBusy            1013 all `max_connections` are in use: try again later
        │   └── TooManyConnections    4060 this client key holds `max_connections_per_client`
        ├── PeerClosed                the peer closed the connection (code and reason attached)
        └── RemoteError               a request failed on the peer: ErrorReply (code, safe message)
"""

from __future__ import annotations

from enum import IntEnum

from tether.errors import TetherError


class CloseCode(IntEnum):
    """Websocket close codes used by the protocol (RFC 6455 §7.4; 4000-4999 are private use)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    ABNORMAL = 1006  # never sent: the connection dropped without a close frame
    MESSAGE_TOO_BIG = 1009  # sent by the websocket layer itself when a message exceeds max_size
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # the server holds its maximum of connections (standard code)
    PROTOCOL_ERROR = 4000
    HANDSHAKE_FAILED = 4001
    UNSUPPORTED_VERSION = 4002
    HANDSHAKE_TIMEOUT = 4003
    HANDSHAKE_REPLAYED = 4004
    AUTHENTICATION_FAILED = 4010
    SERVER_KEY_MISMATCH = 4011
    UNKNOWN_CLIENT_KEY = 4012
    BAD_TOKEN = 4013
    FRAME_TAMPERED = 4020
    FRAME_REPLAYED = 4021
    FRAME_REORDERED = 4022
    FRAME_TRUNCATED = 4023
    FRAME_TOO_LARGE = 4030
    METADATA_TOO_LARGE = 4031
    TENSOR_TOO_LARGE = 4032
    LIMIT_EXCEEDED = 4034
    UNKNOWN_MESSAGE_TYPE = 4040
    BAD_TENSOR = 4041
    BAD_METADATA = 4042
    UNEXPECTED_MESSAGE = 4043
    KEEPALIVE_TIMEOUT = 4050
    TOO_MANY_CONNECTIONS = 4060


class ChannelError(TetherError):
    """Root of every exception raised by tether.protocol.

    `close_code` is the websocket close code this error closes a connection with, or None
    for errors that never close one (API misuse, a failed request).
    """

    close_code: CloseCode | None = None


class UsageError(ChannelError):
    """The API was used wrongly (h11's LocalProtocolError): a bug on this side, not the peer's."""


class InvalidMessage(UsageError):
    """A message was constructed with a field value its type does not allow."""


class HandshakeError(ChannelError):
    """The Noise handshake failed: a malformed or unauthentic handshake message."""

    close_code = CloseCode.HANDSHAKE_FAILED


class VersionMismatch(HandshakeError):
    """The peer offered a protocol version or handshake pattern this side does not speak."""

    close_code = CloseCode.UNSUPPORTED_VERSION


class HandshakeTimeout(HandshakeError):
    """The handshake did not complete within the configured time."""

    close_code = CloseCode.HANDSHAKE_TIMEOUT


class HandshakeReplayed(HandshakeError):
    """An IK first message carried a timestamp not newer than one already seen for its client key.

    The server refuses it before answering (WireGuard's replay protection). A genuine client
    sees this only when two of its handshakes crossed on the way (or its clock went back):
    `connect()` retries with a fresh timestamp.
    """

    close_code = CloseCode.HANDSHAKE_REPLAYED


class AuthenticationError(HandshakeError):
    """The handshake completed cryptographically but a peer identity or credential was refused."""

    close_code = CloseCode.AUTHENTICATION_FAILED


class ServerKeyMismatch(AuthenticationError):
    """The server's static public key is not the one the client pinned."""

    close_code = CloseCode.SERVER_KEY_MISMATCH

    def __init__(self, expected: str, actual: str | None) -> None:
        if actual is None:
            text = (
                f"server key mismatch: pinned {expected}, but the server could not decrypt a "
                "handshake addressed to it (it holds a different key)"
            )
        else:
            text = f"server key mismatch: pinned {expected}, server presented {actual}"
        super().__init__(text)
        self.expected = expected
        self.actual = actual


class UnknownClientKey(AuthenticationError):
    """The client's static public key is not in the server's allowlist."""

    close_code = CloseCode.UNKNOWN_CLIENT_KEY

    def __init__(self, fingerprint: str | None = None, *, public_key: str | None = None) -> None:
        who = f"client key {fingerprint}" if fingerprint else "the client key"
        if public_key is None:
            text = f"{who} is not in the server's allowlist"
        else:  # the refused client's view: say what the server's operator must run
            text = (f"this device ({who}) is not on the server's allowlist; ask the server's operator to add it: "
                    f"tether keys allow {public_key} --allowlist ALLOWLIST_FILE")
        super().__init__(text)
        self.fingerprint = fingerprint
        self.public_key = public_key


class BadToken(AuthenticationError):
    """The bearer token sent inside the encrypted channel is missing or wrong."""

    close_code = CloseCode.BAD_TOKEN

    def __init__(self, message: str = "bearer token missing or wrong") -> None:
        super().__init__(message)


class ProtocolError(ChannelError):
    """The peer sent bytes that break the protocol (h11's RemoteProtocolError)."""

    close_code = CloseCode.PROTOCOL_ERROR


class FrameTampered(ProtocolError):
    """A transport record failed AEAD authentication: modified in transit or forged."""

    close_code = CloseCode.FRAME_TAMPERED


class FrameReplayed(ProtocolError):
    """A transport record carries a counter that was already used."""

    close_code = CloseCode.FRAME_REPLAYED

    def __init__(self, counter: int, expected: int) -> None:
        super().__init__(f"record counter {counter} was already used (expected {expected})")
        self.counter = counter
        self.expected = expected


class FrameReordered(ProtocolError):
    """A transport record arrived ahead of its turn (a record was dropped or reordered)."""

    close_code = CloseCode.FRAME_REORDERED

    def __init__(self, counter: int, expected: int) -> None:
        super().__init__(f"record counter {counter} arrived before {expected}")
        self.counter = counter
        self.expected = expected


class FrameTruncated(ProtocolError):
    """A transport record is shorter than the length its header declares."""

    close_code = CloseCode.FRAME_TRUNCATED

    def __init__(self, size: int, declared: int) -> None:
        super().__init__(f"record of {size} bytes is shorter than its declared {declared} bytes")
        self.size = size
        self.declared = declared


class LimitExceeded(ProtocolError):
    """A declared size is over a configured maximum; raised before anything is allocated.

    Attributes:
        what: which quantity (e.g. "frame", "metadata", "tensor elements").
        size: the declared size.
        limit: the configured maximum.
    """

    close_code = CloseCode.LIMIT_EXCEEDED
    unit = ""

    def __init__(self, what: str, size: int, limit: int, unit: str | None = None) -> None:
        unit = self.unit if unit is None else unit
        suffix = f" {unit}" if unit else ""
        super().__init__(f"{what} of {size}{suffix} exceeds the limit of {limit}{suffix}")
        self.what = what
        self.size = size
        self.limit = limit


class FrameTooLarge(LimitExceeded):
    """A frame (one encrypted record's plaintext) is larger than `Limits.max_frame_bytes`."""

    close_code = CloseCode.FRAME_TOO_LARGE
    unit = "bytes"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__("frame", size, limit)


class MetadataTooLarge(LimitExceeded):
    """The metadata part is larger than `Limits.max_metadata_bytes`."""

    close_code = CloseCode.METADATA_TOO_LARGE
    unit = "bytes"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__("metadata", size, limit)


class TensorTooLarge(LimitExceeded):
    """A tensor declares more elements than `Limits.max_tensor_elements`."""

    close_code = CloseCode.TENSOR_TOO_LARGE
    unit = "elements"

    def __init__(self, size: int, limit: int, index: int = 0) -> None:
        super().__init__(f"tensor {index}", size, limit)
        self.index = index


class UnknownMessageType(ProtocolError):
    """The frame's message type is not in the catalogue."""

    close_code = CloseCode.UNKNOWN_MESSAGE_TYPE

    def __init__(self, type_id: int) -> None:
        super().__init__(f"unknown message type 0x{type_id:04x}")
        self.type_id = type_id


class BadTensor(ProtocolError):
    """A tensor descriptor is invalid: unknown dtype, bad rank, shape disagreeing with length."""

    close_code = CloseCode.BAD_TENSOR


class BadMetadata(ProtocolError):
    """The metadata part is not strict JSON of the shape its message type requires."""

    close_code = CloseCode.BAD_METADATA


class UnexpectedMessage(ProtocolError):
    """A well-formed message that the protocol state does not allow here."""

    close_code = CloseCode.UNEXPECTED_MESSAGE


class KeepaliveTimeout(ChannelError):
    """No traffic and no pong from the peer within the keepalive timeout: the link is half-open."""

    close_code = CloseCode.KEEPALIVE_TIMEOUT

    def __init__(self, timeout: float) -> None:
        super().__init__(f"no answer from the peer within {timeout:g} s of a keepalive ping")
        self.timeout = timeout


class AdmissionRefused(ChannelError):
    """A connection was refused because the server is at one of its `AdmissionLimits`.

    Raised (and logged) on the server, and raised by `connect()` on the client.

    Attributes:
        limit: the limit reached (None on the client, which is not told the number).
    """

    def __init__(self, message: str, *, limit: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class ServerBusy(AdmissionRefused):
    """The server holds `max_connections` connections already (closed before the handshake)."""

    close_code = CloseCode.TRY_AGAIN_LATER


class TooManyConnections(AdmissionRefused):
    """This client key already holds `max_connections_per_client` connections."""

    close_code = CloseCode.TOO_MANY_CONNECTIONS


class PeerClosed(ChannelError):
    """The connection is closed: by the peer, or lost.

    Attributes:
        code: the websocket close code received (1006 when the connection dropped).
        reason: the close reason the peer sent (a code name, never details).
        clean: True when the peer announced the close inside the encrypted channel (Goodbye)
            before closing, so the close is authentic and not injected by a path attacker.
    """

    def __init__(self, code: int, reason: str = "", *, clean: bool = False) -> None:
        try:
            name = CloseCode(code).name
        except ValueError:
            name = "UNKNOWN"
        text = f"connection closed by the peer: {code} {name}"
        if reason and reason != name:
            text += f" ({reason})"
        super().__init__(text)
        self.code = code
        self.reason = reason
        self.clean = clean


class RemoteError(ChannelError):
    """The peer answered a request with an ErrorReply.

    Attributes:
        code: an `ErrorCode` (or the raw int when this side does not know it).
        message: the peer's safe, human-readable message.
        retryable: whether the peer says retrying the same request may succeed.
        request_id: the failed request's id.
        reason: the reply's `reason` field (why a session was evicted), or None.
    """

    def __init__(self, code: int, message: str, *, retryable: bool = False, request_id: int = 0,
                 reason: str | None = None) -> None:
        from tether.protocol._messages import ErrorCode

        try:
            name = ErrorCode(code).name
        except ValueError:
            name = str(code)
        super().__init__(f"request {request_id} failed: {name}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.request_id = request_id
        self.reason = reason


_BY_CODE: dict[int, type[ChannelError]] = {}
for _cls in (
    HandshakeError,
    VersionMismatch,
    HandshakeTimeout,
    HandshakeReplayed,
    AuthenticationError,
    ServerKeyMismatch,
    UnknownClientKey,
    BadToken,
    ProtocolError,
    FrameTampered,
    FrameReplayed,
    FrameReordered,
    FrameTruncated,
    LimitExceeded,
    FrameTooLarge,
    MetadataTooLarge,
    TensorTooLarge,
    UnknownMessageType,
    BadTensor,
    BadMetadata,
    UnexpectedMessage,
    KeepaliveTimeout,
    ServerBusy,
    TooManyConnections,
):
    assert _cls.close_code is not None and _cls.close_code not in _BY_CODE, _cls
    _BY_CODE[_cls.close_code] = _cls


def error_class_for_close_code(code: int) -> type[ChannelError] | None:
    """The exception class that closes connections with `code`, or None for generic codes."""
    return _BY_CODE.get(code)
