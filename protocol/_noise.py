"""Noise handshake state machines: Noise_XX and Noise_IK over 25519, ChaChaPoly, SHA256.

What belongs here: SymmetricState and HandshakeState exactly as the Noise spec (rev 34,
sections 5.2 and 5.3) defines them, with the patterns as data. No sockets, no framing,
no policy: bytes in, bytes out; the caller decides what the payloads and keys mean.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tether.protocol._cipher import HASH_LEN, TAG_LEN, CipherState, InvalidTag, hash_sha256, hkdf
from tether.protocol._errors import HandshakeError, UsageError

__all__ = ["IK", "PATTERNS", "XX", "HandshakePattern", "HandshakeState", "SymmetricState"]

DH_LEN = 32
MAX_MESSAGE_LEN = 65535  # §3: Noise messages are at most 65535 bytes


@dataclass(frozen=True, slots=True)
class HandshakePattern:
    """A handshake pattern (§7): pre-messages and message token lists, initiator first."""

    name: str
    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]

    def protocol_name(self) -> bytes:
        return f"Noise_{self.name}_25519_ChaChaPoly_SHA256".encode("ascii")


XX = HandshakePattern("XX", (), (), (("e",), ("e", "ee", "s", "es"), ("s", "se")))
IK = HandshakePattern("IK", (), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se")))
PATTERNS: dict[str, HandshakePattern] = {"XX": XX, "IK": IK}


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # low-order point: the shared secret would be all zeros
        raise HandshakeError("Diffie-Hellman with the peer's key failed (low-order point)") from exc


class SymmetricState:
    """Chaining key `ck`, handshake hash `h` and a CipherState (§5.2)."""

    __slots__ = ("ck", "cipher", "h")

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASH_LEN:
            self.h = protocol_name.ljust(HASH_LEN, b"\x00")
        else:
            self.h = hash_sha256(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, input_key_material, 2)
        self.cipher.initialize_key(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = hash_sha256(self.h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        try:
            plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        except InvalidTag as exc:
            raise HandshakeError("handshake message failed authentication") from exc
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = hkdf(self.ck, b"", 2)
        return CipherState(temp_k1), CipherState(temp_k2)


class HandshakeState:
    """One side of a Noise handshake (§5.3).

    Args:
        pattern: XX or IK.
        initiator: True for the side that sends the first message.
        prologue: bytes both sides must agree on (mixed into h; any difference fails the handshake).
        s: this side's static private key.
        rs: the peer's static public key, when the pattern has it as a pre-message (IK initiator).
        e: a fixed ephemeral private key, for known-answer tests only.

    Call `write_message` and `read_message` in turn; after the last message `complete` is
    True and `split()` gives the (initiator-to-responder, responder-to-initiator) ciphers.
    Any error leaves the state unusable.
    """

    def __init__(
        self,
        pattern: HandshakePattern,
        *,
        initiator: bool,
        prologue: bytes,
        s: X25519PrivateKey,
        rs: bytes | None = None,
        e: X25519PrivateKey | None = None,
    ) -> None:
        self.pattern = pattern
        self.initiator = initiator
        self.symmetric = SymmetricState(pattern.protocol_name())
        self.s = s
        self.e = e
        self._fixed_e = e is not None
        self.rs = rs
        self.re: bytes | None = None
        self._index = 0
        self._failed = False
        self.symmetric.mix_hash(prologue)
        for token in pattern.initiator_pre:
            self._mix_pre(token, mine=initiator)
        for token in pattern.responder_pre:
            self._mix_pre(token, mine=not initiator)

    def _mix_pre(self, token: str, *, mine: bool) -> None:
        if token != "s":
            raise UsageError(f"unsupported pre-message token {token!r}")
        if mine:
            self.symmetric.mix_hash(public_bytes(self.s))
        else:
            if self.rs is None or len(self.rs) != DH_LEN:
                raise UsageError(f"pattern {self.pattern.name} needs the responder's static public key")
            self.symmetric.mix_hash(self.rs)

    @property
    def complete(self) -> bool:
        return self._index >= len(self.pattern.messages)

    @property
    def handshake_hash(self) -> bytes:
        """h: a unique, secret-free identifier of this handshake (channel binding, §11.2)."""
        return self.symmetric.h

    def _my_turn(self) -> bool:
        return (self._index % 2 == 0) == self.initiator

    def _check(self, writing: bool) -> None:
        if self._failed:
            raise UsageError("handshake state already failed")
        if self.complete:
            raise UsageError("handshake already complete")
        if self._my_turn() != writing:
            raise UsageError("not this side's turn to " + ("write" if writing else "read"))

    def _dh_token(self, token: str) -> bytes:
        if token == "ee":
            assert self.e is not None and self.re is not None
            return _dh(self.e, self.re)
        if token == "ss":
            assert self.rs is not None
            return _dh(self.s, self.rs)
        # "es": initiator's ephemeral with responder's static; "se": the reverse.
        initiator_part = token[0] == "e"
        mine_ephemeral = initiator_part == self.initiator
        if mine_ephemeral:
            assert self.e is not None and self.rs is not None
            return _dh(self.e, self.rs)
        assert self.re is not None
        return _dh(self.s, self.re)

    def write_message(self, payload: bytes = b"") -> bytes:
        """WriteMessage: the next handshake message carrying `payload` (encrypted once a key exists)."""
        self._check(writing=True)
        out = bytearray()
        try:
            for token in self.pattern.messages[self._index]:
                if token == "e":
                    if self.e is None or not self._fixed_e:
                        self.e = X25519PrivateKey.generate()
                    self._fixed_e = False
                    e_pub = public_bytes(self.e)
                    out += e_pub
                    self.symmetric.mix_hash(e_pub)
                elif token == "s":
                    out += self.symmetric.encrypt_and_hash(public_bytes(self.s))
                else:
                    self.symmetric.mix_key(self._dh_token(token))
            out += self.symmetric.encrypt_and_hash(payload)
        except Exception:
            self._failed = True
            raise
        if len(out) > MAX_MESSAGE_LEN:
            self._failed = True
            raise UsageError(f"handshake message of {len(out)} bytes exceeds {MAX_MESSAGE_LEN}")
        self._index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """ReadMessage: process the peer's handshake message and return its payload.

        Raises:
            HandshakeError: the message is too short, too long, or fails authentication.
        """
        self._check(writing=False)
        if len(message) > MAX_MESSAGE_LEN:
            self._failed = True
            raise HandshakeError(f"handshake message of {len(message)} bytes exceeds {MAX_MESSAGE_LEN}")
        view = memoryview(message)
        pos = 0
        try:
            for token in self.pattern.messages[self._index]:
                if token == "e":
                    if len(view) - pos < DH_LEN:
                        raise HandshakeError("handshake message too short")
                    self.re = bytes(view[pos : pos + DH_LEN])
                    pos += DH_LEN
                    self.symmetric.mix_hash(self.re)
                elif token == "s":
                    n = DH_LEN + (TAG_LEN if self.symmetric.cipher.has_key() else 0)
                    if len(view) - pos < n:
                        raise HandshakeError("handshake message too short")
                    self.rs = self.symmetric.decrypt_and_hash(bytes(view[pos : pos + n]))
                    pos += n
                else:
                    self.symmetric.mix_key(self._dh_token(token))
            rest = bytes(view[pos:])
            if self.symmetric.cipher.has_key() and len(rest) < TAG_LEN:
                raise HandshakeError("handshake message too short")
            payload = self.symmetric.decrypt_and_hash(rest)
        except Exception:
            self._failed = True
            raise
        self._index += 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """Split(): (cipher for initiator->responder, cipher for responder->initiator)."""
        if not self.complete:
            raise UsageError("split() before the handshake is complete")
        return self.symmetric.split()
