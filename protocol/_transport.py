"""Transport records: encrypted frames with explicit counters, strict ordering and rekey.

What belongs here: turning a frame into one websocket message and back after the
handshake. The message is one or more records back to back; a record is

    u64 counter | u32 ciphertext_length | ciphertext (a chunk of the frame, encrypted, + 16-byte tag)

Each ciphertext is exactly a Noise transport message (empty associated data, at most 65,535
bytes), so any Noise library can decrypt it with its public API. A frame is cut into chunks
of MAX_CHUNK = 65,519 bytes, the last one shorter: every record but the last is full, so the
record count follows from the message length (a 32 MiB frame is 513 records, not a million
tiny ones). The counter is the sender's CipherState nonce, sent in the clear so the receiver
can say *why* a record is unacceptable (replayed, reordered, truncated) instead of only "it
did not authenticate"; the AEAD still authenticates everything (a forged counter is a wrong
nonce), and the frame header inside the first chunk declares the frame's exact length.
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
from tether.protocol._noise import MAX_MESSAGE_LEN

__all__ = ["MAX_CHUNK", "RECORD_HEADER", "RECORD_OVERHEAD", "Transport", "message_size"]

RECORD_HEADER = struct.Struct("<QI")
RECORD_OVERHEAD = RECORD_HEADER.size + TAG_LEN  # 28 bytes around each chunk
MAX_CHUNK = MAX_MESSAGE_LEN - TAG_LEN  # 65,519 plaintext bytes per record
_FULL_RECORD = RECORD_HEADER.size + MAX_MESSAGE_LEN  # 65,547 bytes
MIN_CIPHERTEXT = HEADER.size + TAG_LEN


def record_count(frame_size: int) -> int:
    """Records a frame of `frame_size` bytes takes."""
    return max(1, -(-frame_size // MAX_CHUNK))


def message_size(frame_size: int) -> int:
    """Bytes of the websocket message carrying a frame of `frame_size` bytes."""
    return frame_size + RECORD_OVERHEAD * record_count(frame_size)


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
        """One websocket message for an encoded frame: its records, encrypted in place.

        A frame that fits one record is copied in once and encrypted where it lies; a larger
        one is laid out once, then each chunk is encrypted into its record.
        """
        size = frame.size
        count = record_count(size)
        message = bytearray(size + RECORD_OVERHEAD * count)
        out = memoryview(message)
        if count == 1:
            RECORD_HEADER.pack_into(message, 0, self._send.n, size + TAG_LEN)
            body = out[RECORD_HEADER.size :]
            frame.write_into(body[:size])
            self._send.encrypt_into(body[:size], body)
        else:
            plain = bytearray(size)
            frame.write_into(memoryview(plain))
            source = memoryview(plain)
            for index in range(count):
                chunk = source[index * MAX_CHUNK : (index + 1) * MAX_CHUNK]
                pos = index * _FULL_RECORD
                RECORD_HEADER.pack_into(message, pos, self._send.n, len(chunk) + TAG_LEN)
                start = pos + RECORD_HEADER.size
                self._send.encrypt_into(chunk, out[start : start + len(chunk) + TAG_LEN])
        self.records_sent += count
        return message

    def seal(self, encoded: EncodedFrame) -> list[bytearray]:
        """Websocket messages for one encoded frame: the frame's records, then a Rekey frame
        when the policy says so."""
        records = [self.seal_encoded(encoded)]
        self._sent_since_rekey += record_count(encoded.size)
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
        """The records around arbitrary plaintext, as one message (tests and fuzzing only)."""
        return self.seal_encoded(EncodedFrame(bytes(plaintext), (), len(plaintext)))

    def open(self, message: bytes | bytearray | memoryview, limits: Limits | None = None) -> Frame | None:
        """Check, decrypt and decode one websocket message. Returns None for a Rekey frame
        (handled here).

        Every check on the clear headers (size limit, counters, declared lengths) happens
        before the plaintext buffer is allocated.

        Args:
            message: the websocket message (one frame's records).
            limits: limits to decode with instead of this transport's (the Hello's).

        Raises:
            FrameTruncated, FrameReplayed, FrameReordered, FrameTampered, FrameTooLarge,
            and the frame decoding errors of `decode_frame`. After any of them the
            connection must be closed: the receive state is no longer trustworthy.
        """
        limits = limits or self.limits
        view = memoryview(message)
        size = len(view)
        if size < RECORD_HEADER.size:
            raise FrameTruncated(size, RECORD_HEADER.size)
        count = -(-size // _FULL_RECORD)
        frame_size = size - RECORD_OVERHEAD * count
        if frame_size > limits.max_frame_bytes:
            raise FrameTooLarge(frame_size, limits.max_frame_bytes)
        expected = self._receive.n
        if expected + count > MAX_NONCE:
            raise ProtocolError("record counter exhausted the nonce space")
        for index in range(count):
            pos = index * _FULL_RECORD
            left = size - pos
            if left < RECORD_HEADER.size:
                raise FrameTruncated(size, pos + RECORD_HEADER.size)
            counter, length = RECORD_HEADER.unpack_from(view, pos)
            if counter < expected + index:
                raise FrameReplayed(counter, expected + index)
            if counter > expected + index:
                raise FrameReordered(counter, expected + index)
            actual = min(left, _FULL_RECORD) - RECORD_HEADER.size
            if length > actual:
                raise FrameTruncated(size, pos + RECORD_HEADER.size + length)
            if length < actual:
                raise ProtocolError(f"record {counter} declares {length} bytes but {actual} follow")
            if length <= TAG_LEN:
                raise ProtocolError(f"record {counter} carries no data")
        if frame_size < HEADER.size:
            raise ProtocolError(f"record declares {frame_size + TAG_LEN} bytes, less than the minimum {MIN_CIPHERTEXT}")
        plaintext = np.empty(frame_size, dtype=np.uint8)  # fully overwritten; decoded tensors view it
        out = memoryview(plaintext)
        for index in range(count):
            pos = index * _FULL_RECORD + RECORD_HEADER.size
            start = index * MAX_CHUNK
            chunk = min(MAX_CHUNK, frame_size - start)
            try:
                self._receive.decrypt_into(view[pos : pos + chunk + TAG_LEN], out[start : start + chunk])
            except InvalidTag:
                raise FrameTampered(f"record {expected + index} failed authentication") from None
        self.records_received += count
        frame = decode_frame(plaintext, limits)
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
