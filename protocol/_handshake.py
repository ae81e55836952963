"""Handshake flows: the client and server sides of XX and IK as generators.

What belongs here: the order of handshake messages, the preamble and prologue, and what
each handshake payload carries. Flows are generators (httpx's `auth_flow` habit): they
yield `bytes` to send or `None` to ask for the next received message, get that message
back through `.send()`, and return a `HandshakeResult`. No I/O, no policy decisions
(who is admitted is decided by the caller, after the client's Hello).

First client message = preamble (8 bytes, clear) + Noise message 1:

    preamble = b"TTHR" | u8 protocol version (2) | u8 pattern (1 XX, 2 IK) | u16 0
    prologue = b"tether-noise-v1\\x00" + preamble

Both sides mix the same prologue into the handshake hash, the server from the bytes it
received: if anything on the path rewrites the preamble (a downgrade to another version
or pattern), the handshake fails authentication.

Payloads: IK message 1 carries a 12-byte TAI64N timestamp (replay protection, `_replay`);
every other handshake payload is empty. The client's Hello (and its token) travels in its
first transport record, which is forward secret in both patterns and proves that the
client holds the ephemeral key (a replayed message 1 can never produce it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tether.protocol._cipher import CipherState
from tether.protocol._errors import HandshakeError, ServerKeyMismatch, VersionMismatch
from tether.protocol._keys import KeyPair, PublicKey
from tether.protocol._limits import Limits
from tether.protocol._noise import IK, XX, HandshakePattern, HandshakeState
from tether.protocol._replay import TIMESTAMP_LEN, next_timestamp

__all__ = [
    "HELLO_LIMITS",
    "MAGIC",
    "MAX_HELLO_BYTES",
    "PREAMBLE",
    "PROLOGUE_PREFIX",
    "PROTOCOL_VERSION",
    "HandshakeResult",
    "client_handshake",
    "server_handshake",
]

MAGIC = b"TTHR"
# 2: the Hello moved from the handshake payload to the first transport record, IK message 1
# carries a timestamp, and frames over 65,519 bytes span several records.
PROTOCOL_VERSION = 2
PREAMBLE = struct.Struct("<4sBBH")
PROLOGUE_PREFIX = b"tether-noise-v1\x00"
PATTERN_IDS: dict[str, int] = {"XX": 1, "IK": 2}
PATTERNS_BY_ID: dict[int, HandshakePattern] = {1: XX, 2: IK}
MAX_HELLO_BYTES = 16 * 1024
# The Hello is decoded with fixed limits, whatever a deployment configures for transport.
HELLO_LIMITS = Limits(max_frame_bytes=MAX_HELLO_BYTES, max_metadata_bytes=MAX_HELLO_BYTES, max_tensors=1)

Flow = Generator["bytes | None", "bytes | None", "HandshakeResult"]
# Called by the server with the client's authenticated static key and IK timestamp, before
# it answers message 1; raising refuses the handshake (the replay check).
InitiatorCheck = Callable[[PublicKey, bytes], None]


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """What a finished handshake yields: transport ciphers and the peer's identity."""

    send: CipherState
    receive: CipherState
    peer: PublicKey
    handshake_hash: bytes
    pattern: str


def preamble(pattern: str, version: int = PROTOCOL_VERSION) -> bytes:
    return PREAMBLE.pack(MAGIC, version, PATTERN_IDS[pattern], 0)


def _received(data: bytes | None) -> bytes:
    if data is None:
        raise HandshakeError("handshake flow resumed without data")
    return data


def client_handshake(
    keys: KeyPair,
    server_key: PublicKey,
    *,
    pattern: str = "IK",
    timestamp: bytes | None = None,
    ephemeral: X25519PrivateKey | None = None,
    version: int = PROTOCOL_VERSION,
    prologue_prefix: bytes = PROLOGUE_PREFIX,
) -> Flow:
    """Initiator flow. XX: -> e; <- e, ee, s, es; -> s, se. IK: -> e, es, s, ss (+timestamp); <- e, ee, se.

    Args:
        keys: the client's static key pair.
        server_key: the pinned server key (IK: encrypted to; XX: compared with the one presented).
        pattern: "IK" or "XX".
        timestamp: IK's TAI64N payload (default: `next_timestamp()`, strictly increasing per process).
        ephemeral: a fixed ephemeral key, for known-answer tests and the documented example only.

    Raises (out of the generator):
        ServerKeyMismatch: XX only: the server presented a key other than `server_key`.
        HandshakeError: a handshake message failed to parse or authenticate.
    """
    if pattern not in PATTERN_IDS:
        raise VersionMismatch(f"unknown handshake pattern {pattern!r}")
    head = preamble(pattern, version)
    state = HandshakeState(
        PATTERNS_BY_ID[PATTERN_IDS[pattern]],
        initiator=True,
        prologue=prologue_prefix + head,
        s=keys.private_key,
        rs=server_key.raw if pattern == "IK" else None,
        e=ephemeral,
    )
    if pattern == "XX":
        yield head + state.write_message(b"")
        if state.read_message(_received((yield None))):
            raise HandshakeError("unexpected payload in handshake message 2")
        assert state.rs is not None
        presented = PublicKey(state.rs)
        if presented != server_key:
            raise ServerKeyMismatch(server_key.fingerprint, presented.fingerprint)
        yield state.write_message(b"")
    else:
        yield head + state.write_message(next_timestamp() if timestamp is None else timestamp)
        if state.read_message(_received((yield None))):
            raise HandshakeError("unexpected payload in handshake message 2")
    send, receive = state.split()
    return HandshakeResult(send, receive, server_key, state.handshake_hash, pattern)


def probe_server_key(*, version: int = PROTOCOL_VERSION) -> Generator[bytes | None, bytes | None, PublicKey]:
    """Read the server's static key with the first two XX messages, revealing nothing of ours.

    Used after an IK handshake is refused, to tell a wrong pinned key (ServerKeyMismatch
    naming both fingerprints) from other failures. The flow stops before message 3, so the
    client's static key is never sent.
    """
    head = preamble("XX", version)
    state = HandshakeState(XX, initiator=True, prologue=PROLOGUE_PREFIX + head, s=KeyPair.generate().private_key)
    yield head + state.write_message(b"")
    state.read_message(_received((yield None)))
    assert state.rs is not None
    return PublicKey(state.rs)


def server_handshake(
    keys: KeyPair,
    *,
    patterns: tuple[str, ...] = ("XX", "IK"),
    check_initiator: InitiatorCheck | None = None,
    ephemeral: X25519PrivateKey | None = None,
) -> Flow:
    """Responder flow for either pattern, chosen by the client's preamble.

    Args:
        keys: the server's static key pair.
        patterns: the patterns offered.
        check_initiator: IK only: called with the client's key and timestamp once message 1
            has authenticated, before message 2 is written (the server's replay check).
        ephemeral: a fixed ephemeral key, for known-answer tests and the documented example only.

    Raises (out of the generator):
        VersionMismatch: unsupported version or pattern in the preamble.
        HandshakeError: malformed or unauthentic handshake message, a payload that is not
            what the pattern carries, or whatever `check_initiator` raises.
    """
    first = _received((yield None))
    if len(first) < PREAMBLE.size:
        raise HandshakeError("first handshake message too short")
    magic, version, pattern_id, reserved = PREAMBLE.unpack_from(first, 0)
    if magic != MAGIC:
        raise HandshakeError("not a tether handshake")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"client offers protocol version {version}; this server speaks {PROTOCOL_VERSION}")
    noise_pattern = PATTERNS_BY_ID.get(pattern_id)
    if reserved or noise_pattern is None or noise_pattern.name not in patterns:
        raise VersionMismatch(f"handshake pattern {pattern_id} is not offered by this server")
    head = bytes(first[: PREAMBLE.size])
    state = HandshakeState(
        noise_pattern, initiator=False, prologue=PROLOGUE_PREFIX + head, s=keys.private_key, e=ephemeral
    )
    payload = state.read_message(bytes(first[PREAMBLE.size :]))
    if noise_pattern is XX:
        if payload:
            raise HandshakeError("unexpected payload in handshake message 1")
        yield state.write_message(b"")
        if state.read_message(_received((yield None))):
            raise HandshakeError("unexpected payload in handshake message 3")
    else:
        if len(payload) != TIMESTAMP_LEN:
            raise HandshakeError(f"IK message 1 must carry a {TIMESTAMP_LEN}-byte timestamp, got {len(payload)} bytes")
        assert state.rs is not None
        if check_initiator is not None:
            check_initiator(PublicKey(state.rs), payload)
        yield state.write_message(b"")
    assert state.rs is not None
    receive, send = state.split()
    return HandshakeResult(send, receive, PublicKey(state.rs), state.handshake_hash, noise_pattern.name)
