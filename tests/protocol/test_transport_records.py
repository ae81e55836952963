"""Transport records: sealing, strict order, tamper/replay/reorder/truncation, rekey."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.protocol import (
    AppendTokens,
    ChannelError,
    FrameReordered,
    FrameReplayed,
    FrameTampered,
    FrameTooLarge,
    FrameTruncated,
    Limits,
    Ping,
    ProtocolError,
    RekeyPolicy,
)
from tether.protocol._cipher import CipherState
from tether.protocol._frames import encode_frame
from tether.protocol._transport import MAX_CHUNK, RECORD_HEADER, RECORD_OVERHEAD, Transport, message_size


def transports(limits: Limits | None = None, rekey: RekeyPolicy | None = None) -> tuple[Transport, Transport]:
    k1, k2 = bytes(range(32)), bytes(range(32, 64))
    limits = limits or Limits()
    rekey = rekey or RekeyPolicy()
    a = Transport(CipherState(k1), CipherState(k2), limits=limits, rekey=rekey)
    b = Transport(CipherState(k2), CipherState(k1), limits=limits, rekey=rekey)
    return a, b


MESSAGE = AppendTokens(session_id="s", tokens=np.arange(10, dtype=np.int32))


def test_record_layout_and_overhead() -> None:
    a, b = transports()
    encoded = encode_frame(MESSAGE, request_id=3)
    (record,) = a.seal(encoded)
    assert RECORD_OVERHEAD == 28
    assert len(record) == encoded.size + RECORD_OVERHEAD
    counter, length = RECORD_HEADER.unpack_from(record)
    assert (counter, length) == (0, encoded.size + 16)
    assert encoded.tobytes() not in bytes(record)  # encrypted
    frame = b.open(record)
    assert frame is not None and frame.message == MESSAGE and frame.request_id == 3


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_flipping_any_byte_of_a_sealed_record_is_detected(position: int, bit: int) -> None:
    a, b = transports()
    (record,) = a.seal(encode_frame(MESSAGE))
    position %= len(record)
    record[position] ^= 1 << bit
    with pytest.raises(ChannelError) as info:
        b.open(record)
    if position >= RECORD_HEADER.size:
        assert isinstance(info.value, FrameTampered)
    elif position < 8:
        assert isinstance(info.value, (FrameReordered, FrameTooLarge))  # counter changed
    else:
        assert isinstance(info.value, (FrameTruncated, FrameTooLarge, ProtocolError))  # length changed


def test_replay_reorder_truncation_and_oversize() -> None:
    a, b = transports(limits=Limits(max_frame_bytes=4096))
    first, second, third = (a.seal(encode_frame(Ping(), request_id=i))[0] for i in range(3))
    assert b.open(first) is not None
    with pytest.raises(FrameReplayed, match=r"^record counter 0 was already used \(expected 1\)$"):
        b.open(first)
    a2, b2 = transports()
    r0, r1 = (a2.seal(encode_frame(Ping()))[0] for _ in range(2))
    with pytest.raises(FrameReordered, match=r"^record counter 1 arrived before 0$"):
        b2.open(r1)
    _, b3 = transports(limits=Limits(max_frame_bytes=4096))
    with pytest.raises(FrameTruncated, match=r"^record of 20 bytes is shorter than its declared 52 bytes$"):
        b3.open(bytes(r0[:20]))
    with pytest.raises(FrameTruncated, match=r"^record of 5 bytes is shorter than its declared 12 bytes$"):
        b3.open(bytes(r0[:5]))
    # The frame size follows from the message length (28 bytes of overhead per record),
    # checked before any record is read.
    oversize = RECORD_HEADER.pack(0, 4096 + 16 + 1) + bytes(4096 + 16 + 1)
    with pytest.raises(FrameTooLarge, match=r"^frame of 4097 bytes exceeds the limit of 4096 bytes$"):
        b3.open(oversize)
    assert second and third


def test_rekey_by_message_count_is_announced_in_band() -> None:
    a, b = transports(rekey=RekeyPolicy(messages=3))
    seen = 0
    for i in range(10):
        records = a.seal(encode_frame(Ping(), request_id=i))
        for record in records:
            frame = b.open(record)
            if frame is not None:
                assert frame.request_id == i
                seen += 1
    assert seen == 10
    assert a.rekeys_sent == b.rekeys_received == 3
    # The old key no longer decrypts: a record sealed before the rekey cannot be re-sent.
    assert a.send_counter == b.receive_counter == 13


def test_rekey_by_bytes_and_forced_rekey() -> None:
    a, b = transports(rekey=RekeyPolicy(bytes=100))
    records = a.seal(encode_frame(MESSAGE))  # > 100 bytes: rekey right after
    assert len(records) == 2
    assert b.open(records[0]) is not None and b.open(records[1]) is None
    forced = a.force_rekey()
    assert b.open(forced) is None
    (record,) = a.seal(encode_frame(Ping()))
    assert b.open(record) is not None
    assert b.rekeys_received == 2


def test_after_rekey_old_key_records_fail() -> None:
    a, b = transports()
    a2, _ = transports()  # same keys as `a`, but never rekeyed
    assert b.open(a.force_rekey()) is None
    stale = a2.seal(encode_frame(Ping()))[0]
    stale_counter = RECORD_HEADER.pack(1, len(stale) - RECORD_HEADER.size)
    with pytest.raises(FrameTampered):
        b.open(stale_counter + bytes(stale[RECORD_HEADER.size :]))


def _records(message: bytes | bytearray) -> list[tuple[int, bytes]]:
    """(counter, ciphertext) of each record in one websocket message."""
    out, pos = [], 0
    while pos < len(message):
        counter, length = RECORD_HEADER.unpack_from(message, pos)
        out.append((counter, bytes(message[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + length])))
        pos += RECORD_HEADER.size + length
    return out


BIG = AppendTokens(session_id="s", tokens=np.arange(40_000, dtype=np.int32))  # a 160,072-byte frame


def test_a_frame_over_one_noise_message_spans_full_records() -> None:
    """Every ciphertext is a valid Noise transport message (<= 65,535 bytes); all records
    but the last are full, so the count follows from the size; counters run on."""
    a, b = transports()
    encoded = encode_frame(BIG, request_id=7)
    (message,) = a.seal(encoded)
    records = _records(message)
    assert MAX_CHUNK == 65_519
    assert [len(c) for _, c in records] == [65_535, 65_535, encoded.size - 2 * MAX_CHUNK + 16]
    assert [n for n, _ in records] == [0, 1, 2]
    assert len(message) == message_size(encoded.size) == encoded.size + 3 * RECORD_OVERHEAD
    frame = b.open(message)
    assert frame is not None and frame.message == BIG and frame.request_id == 7
    assert a.send_counter == b.receive_counter == 3 == a.records_sent == b.records_received
    (after,) = a.seal(encode_frame(Ping(), request_id=8))
    assert _records(after)[0][0] == 3 and b.open(after) is not None


def test_a_multi_record_frame_cut_or_spliced_is_refused() -> None:
    a, _ = transports()
    (message,) = a.seal(encode_frame(BIG))
    full = RECORD_HEADER.size + 65_535
    _, b = transports()
    with pytest.raises(FrameReordered, match=r"^record counter 2 arrived before 1$"):
        b.open(message[:full] + message[2 * full :])  # the middle record dropped
    _, b = transports()
    with pytest.raises(FrameTruncated):
        b.open(message[: len(message) - 1])  # the last record cut short
    _, b = transports()
    short = bytearray(message)
    RECORD_HEADER.pack_into(short, 0, 0, 65_534)  # a record that is not full before the last
    with pytest.raises(ProtocolError, match="^record 0 declares 65534 bytes but 65535 follow$"):
        b.open(short)
    _, b = transports()
    with pytest.raises(ProtocolError, match="^frame of 131038 bytes disagrees with the 160072 bytes its header"):
        b.open(message[: 2 * full])  # cut at a record boundary: the frame header says more
