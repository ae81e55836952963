"""Transport records: encrypted frames with explicit counters, strict ordering and rekey.

What belongs here: turning a frame into one websocket message and back after the
handshake. A record is

    u64 counter | u32 ciphertext_length | ciphertext (frame encrypted, + 16-byte tag)

The counter is the sender's CipherState nonce, sent in the clear so the receiver can say
*why* a record is unacceptable (replayed, reordered, truncated) instead of only "it did not
authenticate"; the AEAD still authenticates everything (a forged counter is a wrong nonce).
Encryption uses empty associated data, exactly Noise's transport messages.
"""

from __future__ import annotations

import struct

import numpy as np

from tether.protocol._cipher import MAX_NONCE, TAG_LEN, CipherState, InvalidTag
from tether.protocol._errors import (
    FrameReordered,
    FrameReplayed,
    FrameTampered,
    FrameTooLarge,
    FrameTruncated,
    ProtocolError,
)
from tether.protocol._frames import HEADER, EncodedFrame, Frame, decode_frame, encode_frame
from tether.protocol._limits import Limits, RekeyPolicy
from tether.protocol._messages import Rekey

__all__ = ["RECORD_HEADER", "RECORD_OVERHEAD", "Transport"]

RECORD_HEADER = struct.Struct("<QI")
RECORD_OVERHEAD = RECORD_HEADER.size + TAG_LEN  # 28 bytes around each frame
MIN_CIPHERTEXT = HEADER.size + TAG_LEN


class Transport:
    """Both directions' cipher states after a handshake, plus the rekey bookkeeping.

    Args:
        send: CipherState for records this side sends.
        receive: CipherState for records this side receives.
        limits: this side's limits (checked on received records).
        rekey: when this side rekeys its sending key.
    """

    def __init__(self, send: CipherState, receive: CipherState, *, limits: Limits, rekey: RekeyPolicy) -> None:
        self._send = send
        self._receive = receive
        self.limits = limits
        self.rekey_policy = rekey
        self._sent_since_rekey = 0
        self._bytes_since_rekey = 0
        self.rekeys_sent = 0
        self.rekeys_received = 0
        self.records_sent = 0
        self.records_received = 0

    @property
    def send_counter(self) -> int:
        return self._send.n

    @property
    def receive_counter(self) -> int:
        return self._receive.n

    def seal_encoded(self, frame: EncodedFrame) -> bytearray:
        """One record for an encoded frame: copy it in once, encrypt in place."""
        size = frame.size
        record = bytearray(RECORD_HEADER.size + size + TAG_LEN)
        view = memoryview(record)
        RECORD_HEADER.pack_into(record, 0, self._send.n, size + TAG_LEN)
        body = view[RECORD_HEADER.size :]
        frame.write_into(body[:size])
        self._send.encrypt_into(body[:size], body)
        self.records_sent += 1
        return record

    def seal(self, encoded: EncodedFrame) -> list[bytearray]:
        """Records for one encoded frame: the frame, then a Rekey record when the policy says so."""
        records = [self.seal_encoded(encoded)]
        self._sent_since_rekey += 1
        self._bytes_since_rekey += encoded.size
        policy = self.rekey_policy
        if self._sent_since_rekey >= policy.messages or self._bytes_since_rekey >= policy.bytes:
            records.append(self.seal_encoded(encode_frame(Rekey())))
            self._send.rekey()
            self._sent_since_rekey = 0
            self._bytes_since_rekey = 0
            self.rekeys_sent += 1
        return records

    def seal_plaintext(self, plaintext: bytes) -> bytearray:
        """A record around arbitrary plaintext (tests and fuzzing only)."""
        return self.seal_encoded(EncodedFrame(bytes(plaintext), (), len(plaintext)))

    def open(self, record: bytes | bytearray | memoryview) -> Frame | None:
        """Check, decrypt and decode one record. Returns None for a Rekey record (handled here).

        Every check on the clear header (size limit, counter, declared length) happens before
        the plaintext buffer is allocated.

        Raises:
            FrameTruncated, FrameReplayed, FrameReordered, FrameTampered, FrameTooLarge,
            and the frame decoding errors of `decode_frame`. After any of them the
            connection must be closed: the receive state is no longer trustworthy.
        """
        view = memoryview(record)
        size = len(view)
        if size < RECORD_HEADER.size:
            raise FrameTruncated(size, RECORD_HEADER.size)
        counter, length = RECORD_HEADER.unpack_from(view, 0)
        if length > self.limits.max_frame_bytes + TAG_LEN:
            raise FrameTooLarge(length - TAG_LEN, self.limits.max_frame_bytes)
        expected = self._receive.n
        if counter < expected:
            raise FrameReplayed(counter, expected)
        if counter > expected:
            raise FrameReordered(counter, expected)
        actual = size - RECORD_HEADER.size
        if actual < length:
            raise FrameTruncated(size, RECORD_HEADER.size + length)
        if actual > length:
            raise ProtocolError(f"record of {size} bytes is longer than its declared {RECORD_HEADER.size + length}")
        if length < MIN_CIPHERTEXT:
            raise ProtocolError(f"record declares {length} bytes, less than the minimum {MIN_CIPHERTEXT}")
        if counter >= MAX_NONCE:
            raise ProtocolError("record counter exhausted the nonce space")
        plaintext = np.empty(length - TAG_LEN, dtype=np.uint8)  # fully overwritten; decoded tensors view it
        try:
            self._receive.decrypt_into(view[RECORD_HEADER.size :], plaintext)
        except InvalidTag:
            raise FrameTampered(f"record {counter} failed authentication") from None
        self.records_received += 1
        frame = decode_frame(plaintext, self.limits)
        if isinstance(frame.message, Rekey):
            if frame.request_id or frame.flags:
                raise ProtocolError("Rekey frames carry no request id or flags")
            self._receive.rekey()
            self.rekeys_received += 1
            return None
        return frame

    def force_rekey(self) -> bytearray:
        """Rekey the sending key now; returns the Rekey record to send first."""
        record = self.seal_encoded(encode_frame(Rekey()))
        self._send.rekey()
        self._sent_since_rekey = 0
        self._bytes_since_rekey = 0
        self.rekeys_sent += 1
        return record
