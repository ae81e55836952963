"""Noise CipherState and HKDF for ChaChaPoly + SHA256 on `cryptography` primitives.

What belongs here: the symmetric primitives of the Noise spec (rev 34, sections 4.2, 4.3
and 5.1), and nothing that knows about framing, sockets or messages.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _hmac
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tether.protocol._errors import UsageError

__all__ = ["CipherState", "InvalidTag", "hash_sha256", "hkdf", "hmac_sha256"]

KEY_LEN = 32
HASH_LEN = 32
TAG_LEN = 16
MAX_NONCE = 2**64 - 1  # reserved by the spec: never used to encrypt a message (§5.1)
_NONCE = struct.Struct("<4xQ")  # ChaChaPoly nonce: 32 zero bits, then the counter little-endian
_ZEROS32 = bytes(32)


def hash_sha256(data: bytes) -> bytes:
    """HASH(data) of the Noise spec: SHA-256."""
    return hashlib.sha256(data).digest()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) through `cryptography`."""
    mac = _hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """HKDF of the Noise spec (§4.3): RFC 5869 with `chaining_key` as salt and empty info.

    Args:
        chaining_key: HASHLEN bytes.
        input_key_material: zero or DHLEN bytes.
        num_outputs: 2 or 3.

    Returns:
        `num_outputs` values of HASHLEN bytes each.
    """
    if num_outputs not in (2, 3):
        raise UsageError(f"hkdf produces 2 or 3 outputs, not {num_outputs}")
    temp_key = hmac_sha256(chaining_key, input_key_material)
    output1 = hmac_sha256(temp_key, b"\x01")
    output2 = hmac_sha256(temp_key, output1 + b"\x02")
    if num_outputs == 2:
        return output1, output2
    output3 = hmac_sha256(temp_key, output2 + b"\x03")
    return output1, output2, output3


class CipherState:
    """A key and a 64-bit counter nonce (Noise §5.1), ChaCha20-Poly1305 (RFC 8439).

    The nonce increments after every successful encryption or decryption; a failed
    decryption leaves it unchanged (callers close the connection anyway). Rekey replaces
    the key with ENCRYPT(k, 2^64-1, "", zeros) truncated to 32 bytes (§4.2) and keeps n.
    """

    __slots__ = ("_aead", "_key", "n")

    def __init__(self, key: bytes | None = None, n: int = 0) -> None:
        self._key: bytes | None = None
        self._aead: ChaCha20Poly1305 | None = None
        if key is not None:
            self.initialize_key(key)
        self.n = n

    def initialize_key(self, key: bytes) -> None:
        """InitializeKey(key): set the key and reset the nonce to zero."""
        if len(key) != KEY_LEN:
            raise UsageError(f"cipher keys are {KEY_LEN} bytes, got {len(key)}")
        self._key = bytes(key)
        self._aead = ChaCha20Poly1305(self._key)
        self.n = 0

    def has_key(self) -> bool:
        return self._aead is not None

    def _next_nonce(self) -> bytes:
        if self.n >= MAX_NONCE:
            raise UsageError("nonce space exhausted: the connection must be re-established")
        return _NONCE.pack(self.n)

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """EncryptWithAd: ciphertext || 16-byte tag, or the plaintext itself before a key is set."""
        if self._aead is None:
            return bytes(plaintext)
        out = self._aead.encrypt(self._next_nonce(), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """DecryptWithAd. Raises InvalidTag (from `cryptography`) when authentication fails."""
        if self._aead is None:
            return bytes(ciphertext)
        out = self._aead.decrypt(self._next_nonce(), ciphertext, ad)
        self.n += 1
        return out

    def encrypt_into(self, plaintext: memoryview, out: memoryview) -> None:
        """Encrypt with empty AD into `out` (len(plaintext) + 16 bytes; may overlap in place)."""
        assert self._aead is not None, "transport cipher without a key"
        self._aead.encrypt_into(self._next_nonce(), plaintext, b"", out)
        self.n += 1

    def decrypt_into(self, ciphertext: memoryview, out: Any) -> None:
        """Decrypt (empty AD) into `out`, any writable buffer of len(ciphertext) - 16 bytes.

        Raises InvalidTag (the nonce then stays unchanged)."""
        assert self._aead is not None, "transport cipher without a key"
        self._aead.decrypt_into(self._next_nonce(), ciphertext, b"", out)
        self.n += 1

    def rekey(self) -> None:
        """Rekey() of §4.2: k = first 32 bytes of ENCRYPT(k, maxnonce, zerolen, zeros[32])."""
        if self._aead is None:
            raise UsageError("cannot rekey a cipher state without a key")
        new_key = self._aead.encrypt(_NONCE.pack(MAX_NONCE), _ZEROS32, b"")[:KEY_LEN]
        self._key = new_key
        self._aead = ChaCha20Poly1305(new_key)
