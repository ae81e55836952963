"""int8-deflate: int8 rows whose values cross the wire as a raw DEFLATE stream.

The stage is lossless (the cloud computes with exactly int8's values), smaller on
residual-stream-like rows, and the decoder inflates into exactly the declared shape: a
stream that would expand further, ends early, or trails bytes is refused, and a bomb costs
the decoder no more memory than the declared (limit-checked) shape.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

from tether.edge.split._hidden_codec import get_codec, roundtrip
from tether.protocol import BadTensor, ContinueHidden, DType, InvalidMessage, Limits, Tensor, decode_frame, encode_frame
from tether.protocol._frames import DESCRIPTOR, HEADER
from tether.protocol._tensors import deflate_bound, wire_nbytes, wire_nbytes_range



def hidden_rows(n: int, h: int, seed: int = 0) -> torch.Tensor:
    """Residual-stream-like rows: small values plus a huge outlier channel (sets the row's scale)."""
    x = torch.randn(n, h, generator=torch.Generator().manual_seed(seed))
    x[:, 7] *= 300.0
    return x


def _frame(dims: tuple[int, ...], payload: bytes, nbytes: int | None = None) -> bytes:
    """A ContinueHidden frame carrying `payload` as an INT8_ROWWISE_DEFLATE tensor of `dims`."""
    nbytes = len(payload) if nbytes is None else nbytes
    meta = b'{"session_id":"s","layer":1,"compression":"int8-deflate"}'
    desc = DESCRIPTOR.pack(0, int(DType.INT8_ROWWISE_DEFLATE), len(dims), 0, 0, nbytes)
    desc += struct.pack(f"<{len(dims)}I", *dims)
    desc += bytes((-len(desc)) % 8)
    head = HEADER.pack(1, 0, ContinueHidden.TYPE, 1, 0, 0, len(meta), 0)
    body = payload[:nbytes].ljust(nbytes, b"\0")
    return head + desc + meta + bytes((-len(meta)) % 8) + body + bytes((-nbytes) % 8)


def _raw_deflate(data: bytes, level: int = 9) -> bytes:
    packer = zlib.compressobj(level, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def _scales(rows: int) -> bytes:
    return np.ones(rows, "<f4").tobytes()


def test_lossless_over_int8_and_smaller_on_outlier_rows() -> None:
    x = hidden_rows(4, 1536)
    plain, packed = get_codec("int8").encode(x), get_codec("int8-deflate").encode(x)
    assert packed.dtype is DType.INT8_ROWWISE_DEFLATE
    assert torch.equal(roundtrip(get_codec("int8-deflate"), x), roundtrip(get_codec("int8"), x))
    assert np.array_equal(packed.data, plain.data) and np.array_equal(packed.scales, plain.scales)
    # The outliers push every other value to a few small integers: far under 8 bits each.
    assert packed.nbytes < plain.nbytes / 2
    assert packed.nbytes == sum(len(b) for b in packed.buffers()) == 4 * 4 + len(packed.packed)
    # Planning uses plain int8's size: the data-dependent size is only known once encoded.
    assert get_codec("int8-deflate").nbytes(1, 1536) == 1540


def test_random_bytes_stay_within_the_declared_bound() -> None:
    """Incompressible values (uniform int8) may grow a little, never past the bound."""
    values = np.random.default_rng(0).integers(-127, 128, size=(3, 4096)).astype(np.int8)
    tensor = Tensor(DType.INT8_ROWWISE_DEFLATE, values, np.ones(3, np.float32))
    low, high = wire_nbytes_range(DType.INT8_ROWWISE_DEFLATE, (3, 4096))
    assert low == 14 and high == 12 + deflate_bound(3 * 4096) == wire_nbytes(DType.INT8_ROWWISE_DEFLATE, (3, 4096))
    assert low <= tensor.nbytes <= high


def test_crosses_a_frame_byte_for_byte() -> None:
    tensor = Tensor.int8_rowwise_deflate(hidden_rows(3, 256).numpy())
    raw = encode_frame(ContinueHidden(session_id="s", layer=2, compression="int8-deflate", hidden=tensor)).tobytes()
    back = decode_frame(raw, Limits()).message
    assert isinstance(back, ContinueHidden) and back.hidden == tensor
    assert np.array_equal(back.hidden.numpy(), Tensor.int8_rowwise(hidden_rows(3, 256).numpy()).numpy())
    assert bytes(back.hidden.packed) == bytes(tensor.packed)  # re-sent as received, not re-compressed


def test_compression_name_must_match_the_dtype() -> None:
    tensor = Tensor.int8_rowwise_deflate(np.ones((1, 32), np.float32))
    with pytest.raises(InvalidMessage, match="compression 'int8' needs INT8_ROWWISE, hidden is INT8_ROWWISE_DEFLATE"):
        ContinueHidden(session_id="s", layer=1, compression="int8", hidden=tensor)


def test_a_bomb_is_refused_without_inflating_it() -> None:
    """1 MB of zeros deflate to ~1 KB, inside the bound for one row of 1536 values: the
    decoder stops after 1536 bytes and refuses the stream."""
    bomb = _raw_deflate(bytes(1_000_000))
    assert len(bomb) + 4 <= wire_nbytes(DType.INT8_ROWWISE_DEFLATE, (1, 1536))
    raw = _frame((1, 1536), _scales(1) + bomb)
    tracemalloc.start()
    try:
        with pytest.raises(BadTensor) as info:
            decode_frame(raw, Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value) == ("INT8_ROWWISE_DEFLATE: the DEFLATE stream is not exactly the declared 1536 values "
                               "(it ends early, runs on, or has bytes after its end)")
    assert peak < 256 * 1024


@pytest.mark.parametrize("case", ["short", "trailing", "truncated", "corrupt"])
def test_malformed_streams_are_refused(case: str) -> None:
    values = bytes(range(64)) * 2  # 128 values: one row of 128
    stream = {"short": _raw_deflate(values[:100]), "trailing": _raw_deflate(values) + b"\x00junk",
              "truncated": _raw_deflate(values)[:-3], "corrupt": b"\xff" * 20}[case]
    raw = _frame((1, 128), _scales(1) + stream)
    with pytest.raises(BadTensor, match="INT8_ROWWISE_DEFLATE: .*DEFLATE stream"):
        decode_frame(raw, Limits())


def test_an_empty_shape_cannot_hide_a_stream() -> None:
    """Zero declared values must not turn into zlib's 'no limit' (max_length 0)."""
    raw = _frame((0, 16), _raw_deflate(bytes(1000)))
    with pytest.raises(BadTensor, match="not exactly the declared 0 values"):
        decode_frame(raw, Limits())


def test_declared_sizes_are_checked_before_reading() -> None:
    with pytest.raises(BadTensor, match=r"shape \(2, 64\) of INT8_ROWWISE_DEFLATE needs 10 to 149 bytes, "
                                        r"frame declares 200"):
        decode_frame(_frame((2, 64), b"", nbytes=200), Limits())
    with pytest.raises(BadTensor, match="needs 10 to 149 bytes, frame declares 9"):
        decode_frame(_frame((2, 64), b"", nbytes=9), Limits())
    with pytest.raises(BadTensor, match="an INT8_ROWWISE_DEFLATE tensor needs at least one axis"):
        decode_frame(_frame((), b"", nbytes=8), Limits())


def test_only_the_deflate_dtype_has_a_stream() -> None:
    with pytest.raises(InvalidMessage, match="only INT8_ROWWISE_DEFLATE tensors have a packed stream, not INT8_ROWWISE"):
        Tensor(DType.INT8_ROWWISE, np.zeros((1, 4), np.int8), np.ones(1, np.float32), b"\x03\x00")
