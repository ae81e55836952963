"""Frame codec on raw bytes: exact layouts, and each limit or format violation by its message."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest

from tether.protocol import (
    AppendTokens,
    BadMetadata,
    BadTensor,
    ContinueHidden,
    DType,
    ErrorCode,
    ErrorReply,
    FrameTooLarge,
    LimitExceeded,
    Limits,
    MetadataTooLarge,
    Ping,
    ProtocolError,
    Tensor,
    TensorTooLarge,
    UnknownMessageType,
    VerifyDraft,
    decode_frame,
    encode_frame,
)
from tether.protocol._frames import DESCRIPTOR, HEADER

LIMITS = Limits()


def header(type_id: int, *, count: int = 0, request_id: int = 0, meta: int = 0, padding: int = 0, flags: int = 0,
           version: int = 1, reserved: int = 0) -> bytes:
    return HEADER.pack(version, flags, type_id, count, reserved, request_id, meta, padding)


def descriptor(slot: int, dtype: int, dims: tuple[int, ...], nbytes: int) -> bytes:
    raw = DESCRIPTOR.pack(slot, dtype, len(dims), 0, 0, nbytes) + struct.pack(f"<{len(dims)}I", *dims)
    return raw + bytes((-len(raw)) % 8)


def meta_part(text: bytes) -> bytes:
    return text + bytes((-len(text)) % 8)


def test_ping_is_exactly_a_header() -> None:
    assert encode_frame(Ping(), request_id=0x0102030405060708).tobytes() == bytes.fromhex(
        "01" "00" "0300" "0000" "0000" "0807060504030201" "00000000" "00000000"
    )


def test_append_tokens_layout_byte_for_byte() -> None:
    message = AppendTokens(session_id="s1", tokens=np.array([7, 8, 9], dtype=np.int32))
    meta = b'{"session_id":"s1"}'
    expected = (
        header(0x0102, count=1, request_id=5, meta=len(meta))
        + descriptor(0, 5, (3,), 12)
        + meta_part(meta)
        + struct.pack("<3i", 7, 8, 9)
        + bytes(4)
    )
    assert encode_frame(message, request_id=5).tobytes() == expected
    frame = decode_frame(expected, LIMITS)
    assert frame.request_id == 5 and frame.message == message


def test_decoded_tensors_are_zero_copy_views() -> None:
    hidden = Tensor.from_numpy(np.arange(64, dtype=np.float32).reshape(4, 16))
    buffer = bytearray(encode_frame(ContinueHidden(session_id="s", layer=2, hidden=hidden)).tobytes())
    message = decode_frame(buffer, LIMITS).message
    assert isinstance(message, ContinueHidden)
    whole = np.frombuffer(buffer, dtype=np.uint8)
    assert np.shares_memory(message.hidden.data, whole)
    buffer[-4:] = struct.pack("<f", -1.0)  # the view sees writes to the frame buffer
    assert message.hidden.data[3, 15] == -1.0


def test_padding_round_trips_and_must_be_zero() -> None:
    raw = bytearray(encode_frame(Ping(), padding=40).tobytes())
    assert len(raw) == 64 and decode_frame(raw, LIMITS).message == Ping()
    raw[-1] = 1
    with pytest.raises(ProtocolError, match="^non-zero traffic padding$"):
        decode_frame(raw, LIMITS)


@pytest.mark.parametrize(
    ("raw", "error", "text"),
    [
        (b"\x01\x00\x03", ProtocolError, "frame of 3 bytes is shorter than the 24-byte header"),
        (header(0x0003, version=2), ProtocolError, "unsupported frame format version 2"),
        (header(0x7777), UnknownMessageType, "unknown message type 0x7777"),
        (header(0x0003, flags=0x80), ProtocolError, "frame header has unknown flags or non-zero reserved bits"),
        (header(0x0003, reserved=1), ProtocolError, "frame header has unknown flags or non-zero reserved bits"),
        (header(0x0003) + b"x", ProtocolError, "frame of 25 bytes disagrees with the 24 bytes its header declares"),
        (header(0x0003, padding=8), ProtocolError, "frame of 24 bytes disagrees with the 32 bytes its header declares"),
    ],
)
def test_malformed_headers(raw: bytes, error: type[Exception], text: str) -> None:
    with pytest.raises(error) as info:
        decode_frame(raw, LIMITS)
    assert str(info.value) == text


def test_limit_violations_carry_size_and_limit() -> None:
    limits = Limits(max_frame_bytes=4096, max_metadata_bytes=100, max_tensor_elements=1000, max_tensors=2)
    with pytest.raises(FrameTooLarge) as frame_info:
        decode_frame(bytes(4097), limits)
    assert str(frame_info.value) == "frame of 4097 bytes exceeds the limit of 4096 bytes"
    assert (frame_info.value.size, frame_info.value.limit) == (4097, 4096)

    with pytest.raises(MetadataTooLarge) as meta_info:
        decode_frame(header(0x0102, meta=101), limits)
    assert str(meta_info.value) == "metadata of 101 bytes exceeds the limit of 100 bytes"

    with pytest.raises(LimitExceeded) as count_info:
        decode_frame(header(0x0102, count=3), limits)
    assert str(count_info.value) == "tensor count of 3 exceeds the limit of 2"

    raw = header(0x0102, count=1) + descriptor(0, 5, (1001,), 4004)
    with pytest.raises(TensorTooLarge) as tensor_info:
        decode_frame(raw, limits)
    assert str(tensor_info.value) == "tensor 0 of 1001 elements exceeds the limit of 1000 elements"
    assert (tensor_info.value.size, tensor_info.value.limit) == (1001, 1000)


def test_oversized_tensor_is_refused_before_allocating() -> None:
    """A descriptor claiming 2**32-1 x 2**32-1 int64 elements costs nothing to refuse."""
    raw = header(0x0102, count=1) + descriptor(0, 6, (2**32 - 1, 2**32 - 1), 8 * (2**32 - 1) ** 2 % 2**64)
    tracemalloc.start()
    try:
        with pytest.raises(TensorTooLarge):
            decode_frame(raw, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@pytest.mark.parametrize(
    ("tensor_part", "text"),
    [
        (descriptor(0, 9, (3,), 12), "tensor 0: unknown dtype 9"),
        (descriptor(0, 5, (3,), 16), "tensor 0: shape (3,) of INT32 needs 12 bytes, frame declares 16"),
        (descriptor(0, 4, (2, 3), 6), "tensor 0: shape (2, 3) of INT8_ROWWISE needs 14 bytes, frame declares 6"),
        (descriptor(0, 7, (2, 48), 60),
         "the last axis of an INT4_GROUPED tensor must be a multiple of 32, got shape (2, 48)"),
        (descriptor(3, 5, (3,), 12), "tensor 0: slot 3 is not a tensor field of AppendTokens in order"),
        (descriptor(0, 5, (1,) * 9, 4), "tensor 0: 9 dimensions exceed the limit of 8"),
        (DESCRIPTOR.pack(0, 5, 1, 0, 1, 4) + bytes(8), "tensor 0: non-zero reserved descriptor bytes"),
        (DESCRIPTOR.pack(0, 5, 1, 0, 0, 4), "tensor 0: descriptor runs past the end of the frame"),
    ],
)
def test_bad_tensor_descriptors(tensor_part: bytes, text: str) -> None:
    with pytest.raises(BadTensor) as info:
        decode_frame(header(0x0102, count=1) + tensor_part, LIMITS)
    assert str(info.value) == text


def _frame_with_meta(type_id: int, meta: bytes, tensors: bytes = b"", data: bytes = b"", count: int = 0) -> bytes:
    return header(type_id, count=count, meta=len(meta)) + tensors + meta_part(meta) + data


TOKENS = descriptor(0, 5, (1,), 4)
TOKEN_DATA = struct.pack("<i", 1) + bytes(4)


@pytest.mark.parametrize(
    ("meta", "text"),
    [
        (b"\xff", "metadata is not UTF-8"),
        (b"{", "metadata is not valid JSON"),
        (b"[]", "metadata must be a JSON object"),
        (b'{"session_id":"a","session_id":"b"}', "metadata: duplicate key 'session_id'"),
        (b'{"session_id":NaN}', "metadata: NaN is not allowed"),
        (b'{"session_id":1e999}', "metadata: non-finite number"),
        (b'{"session_id":"s","x":1}', "AppendTokens: unknown field 'x'"),
        (b"{}", "AppendTokens: missing field 'session_id'"),
        (b'{"session_id":5}', "AppendTokens.session_id: expected a string, got int"),
        (b'{"session_id":""}', "AppendTokens.session_id must be 1..128 characters"),
        (b'{"session_id":"s","z":' + b"[" * 40 + b"]" * 40 + b"}", "metadata nesting deeper than 32"),
        (b'{"session_id":"s","z":' + b"[" * 5000 + b"]" * 5000 + b"}", "metadata nesting deeper than 32"),
        (b'{"session_id":"s","z":' + b"9" * 5000 + b"}", "metadata is not valid JSON"),
        (b'{"session_id":"s","z":' + b"9" * 25 + b"}", "metadata: integer outside signed 64 bits"),
    ],
)
def test_bad_metadata(meta: bytes, text: str) -> None:
    raw = _frame_with_meta(0x0102, meta, TOKENS, TOKEN_DATA, count=1)
    with pytest.raises(BadMetadata) as info:
        decode_frame(raw, LIMITS)
    assert str(info.value) == text


def test_field_type_rules() -> None:
    raw = _frame_with_meta(0x02FF, b'{"code":999}')
    with pytest.raises(BadMetadata, match=r"^ErrorReply.code: 999 is not a known ErrorCode$"):
        decode_frame(raw, LIMITS)
    raw = _frame_with_meta(0x02FF, b'{"code":true}')
    with pytest.raises(BadMetadata, match=r"^ErrorReply.code: expected an integer, got bool$"):
        decode_frame(raw, LIMITS)
    ok = decode_frame(_frame_with_meta(0x02FF, b'{"code":3,"message":"gone"}'), LIMITS).message
    assert ok == ErrorReply(code=ErrorCode.NOT_FOUND, message="gone")


def test_missing_and_mistyped_tensors() -> None:
    with pytest.raises(BadTensor, match=r"^AppendTokens: missing tensor 'tokens'$"):
        decode_frame(_frame_with_meta(0x0102, b'{"session_id":"s"}'), LIMITS)
    floats = descriptor(0, 1, (1,), 4)
    with pytest.raises(BadTensor, match=r"^AppendTokens.tokens: dtype FLOAT32 not allowed \(INT32, INT64\)$"):
        decode_frame(_frame_with_meta(0x0102, b'{"session_id":"s"}', floats, TOKEN_DATA, 1), LIMITS)
    matrix = descriptor(0, 5, (1, 1), 4)
    with pytest.raises(BadTensor, match=r"^AppendTokens.tokens: expected 1 dimensions, got 2$"):
        decode_frame(_frame_with_meta(0x0102, b'{"session_id":"s"}', matrix, TOKEN_DATA, 1), LIMITS)


def test_cross_field_tensor_rules_are_bad_tensor() -> None:
    message = VerifyDraft(
        session_id="s",
        tokens=np.array([4], np.int32),
        draft_indices=np.array([[4, 5]], np.int32),
        draft_probs=np.array([[0.5, 0.5]], np.float32),
    )
    raw = bytearray(encode_frame(message).tobytes())
    # The last tensor is draft_probs (2 float32 = 8 bytes); indices come before it.
    index_offset = len(raw) - 8 - 8
    raw[index_offset : index_offset + 8] = struct.pack("<2i", 6, 7)  # token 4 no longer in its row
    with pytest.raises(BadTensor, match="each draft token must appear in its draft_indices row"):
        decode_frame(raw, LIMITS)


def test_int8_rowwise_and_bf16_layouts() -> None:
    values = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], dtype=np.float32)
    tensor = Tensor.int8_rowwise(values)
    raw = encode_frame(ContinueHidden(session_id="s", layer=1, compression="int8", hidden=tensor)).tobytes()
    # scales (2 x f32) then values (6 x i8), padded to 16 bytes, at the end of the frame.
    data = raw[-16:]
    scales = np.frombuffer(data[:8], "<f4")
    assert np.allclose(scales, [2.0 / 127, 1.0])
    assert list(np.frombuffer(data[8:14], np.int8)) == [64, -127, 32, 0, 0, 0]
    decoded = decode_frame(raw, LIMITS).message
    assert isinstance(decoded, ContinueHidden) and decoded.hidden.dtype is DType.INT8_ROWWISE
    assert np.allclose(decoded.hidden.numpy(), values, atol=2.0 / 127)


def test_int8_rowwise_subnormal_rows_stay_finite() -> None:
    import warnings

    values = np.full((2, 8), 6.4e-44, np.float32)  # subnormal: peak / 127 underflows
    values[1] = np.linspace(-3, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = Tensor.int8_rowwise(values).numpy()
    assert np.all(np.isfinite(decoded)) and np.allclose(decoded, values, atol=3 / 127)


def test_int4_grouped_tiny_and_huge_groups_stay_finite() -> None:
    import warnings

    values = np.zeros((3, 32), np.float32)
    values[0, :] = 1e-9  # a scale of peak / 7 would underflow float16 to zero
    values[1, :] = np.linspace(-1, 1, 32)
    values[2, 0] = 1e9  # would overflow float16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = Tensor.int4_grouped(values)
        decoded = tensor.numpy()
    assert np.all(np.isfinite(decoded))
    assert np.allclose(decoded[0], 0, atol=1e-3)
    assert np.allclose(decoded[1], values[1], atol=1 / 7)


def _draft(k: int, m: int) -> VerifyDraft:
    return VerifyDraft(session_id="s", tokens=np.zeros(k, np.int64),
                       draft_indices=np.tile(np.arange(m, dtype=np.int64), (k, 1)),
                       draft_probs=np.full((k, m), 1.0 / m, np.float32))


@pytest.mark.parametrize(("k", "m", "text"), [
    (129, 4, r"^VerifyDraft\.tokens axis 0 \(max_draft_tokens\) of 129 exceeds the limit of 128$"),
    (2, 1025, r"^VerifyDraft\.draft_indices axis 1 \(max_draft_width\) of 1025 exceeds the limit of 1024$"),
])
def test_verify_draft_shapes_are_checked_against_the_limits_before_the_data(k: int, m: int, text: str) -> None:
    """k and m are bounded by their own limits (not only the element count), on the declared
    shape: a frame cut right after its descriptors is refused for its shape, not its length."""
    frame = encode_frame(_draft(k, m)).tobytes()
    with pytest.raises(LimitExceeded, match=text):
        decode_frame(frame, LIMITS)
    descriptors_end = HEADER.size + 3 * (DESCRIPTOR.size + 8)  # each: 16 bytes + dims padded to 8
    with pytest.raises(LimitExceeded, match=text):
        decode_frame(frame[:descriptors_end], LIMITS)
    assert decode_frame(encode_frame(_draft(128, 1024)).tobytes(), LIMITS).message.tokens.shape == (128,)
    assert Limits(max_draft_width=2048).max_draft_width == 2048
