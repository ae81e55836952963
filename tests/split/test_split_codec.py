"""Hidden-state codecs and the INT4_GROUPED wire dtype: sizes, error bounds, raw frames, bounds checks."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import torch

from tether.edge import COMPRESSIONS
from tether.edge.split._hidden_codec import CODECS, get_codec, roundtrip
from tether.errors import ConfigurationError
from tether.protocol import BadTensor, ContinueHidden, DType, InvalidMessage, Limits, Tensor, decode_frame, encode_frame
from tether.protocol._frames import DESCRIPTOR, HEADER
from tether.protocol._tensors import wire_nbytes


def hidden_rows(n: int = 5, h: int = 256, seed: int = 0) -> torch.Tensor:
    """Residual-stream-like rows: small values plus a few huge outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen)
    x[:, 7] *= 300.0
    x[0, min(100, h - 1)] = -2500.0
    return x


def test_names_and_aliases() -> None:
    assert COMPRESSIONS == ("fp32", "fp16", "bf16", "int8", "int8-deflate", "int4")
    assert get_codec("none") is CODECS["fp32"] and get_codec("FP16") is CODECS["fp16"]
    with pytest.raises(ConfigurationError,
                       match="unknown compression 'q2'; choose one of fp32, fp16, bf16, int8, int8-deflate, int4"):
        get_codec("q2")


@pytest.mark.parametrize(("name", "per_row"), [("fp32", 4096), ("fp16", 2048), ("bf16", 2048), ("int8", 1028),
                                               ("int4", 576)])
def test_exact_wire_sizes(name: str, per_row: int) -> None:
    codec = get_codec(name)
    x = hidden_rows(3, 1024)
    tensor = codec.encode(x)
    assert tensor.shape == (3, 1024) and tensor.nbytes == 3 * per_row == codec.nbytes(3, 1024)
    assert sum(len(b) for b in tensor.buffers()) == tensor.nbytes


def test_error_bounds() -> None:
    x = hidden_rows()
    assert torch.equal(roundtrip(get_codec("fp32"), x), x)
    for name, rel in (("fp16", 1e-3), ("bf16", 8e-3)):
        err = (roundtrip(get_codec(name), x) - x).abs()
        assert (err <= rel * x.abs() + 1e-6).all(), name
    # int8: at most half a step of the row's scale; int4: half a step of each group's scale
    err8 = (roundtrip(get_codec("int8"), x) - x).abs()
    assert (err8 <= x.abs().amax(-1, keepdim=True) / 127 / 2 + 1e-4).all()
    groups = x.reshape(5, -1, 32)
    err4 = (roundtrip(get_codec("int4"), x) - x).abs().reshape(5, -1, 32)
    assert (err4 <= groups.abs().amax(-1, keepdim=True) / 7 / 2 * 1.001 + 1e-3).all()


def test_groups_confine_outliers() -> None:
    """An outlier channel wrecks a per-row int8 scale but only its own int4 group."""
    x = hidden_rows(1, 256)
    rest = torch.ones(256, dtype=torch.bool)
    rest[0:32] = False  # the group holding channel 7
    rest[96:128] = False  # and channel 100
    e8 = (roundtrip(get_codec("int8"), x) - x)[0, rest].abs().mean()
    e4 = (roundtrip(get_codec("int4"), x) - x)[0, rest].abs().mean()
    assert e4 < e8


def test_fp16_saturates_instead_of_overflowing() -> None:
    x = torch.tensor([[1e6, -1e6] + [0.0] * 30])
    assert np.isfinite(get_codec("fp16").encode(x).numpy()).all()


def test_int4_needs_a_multiple_of_32() -> None:
    with pytest.raises(ConfigurationError, match="multiple of 32, got 48"):
        get_codec("int4").encode(torch.zeros(2, 48))
    with pytest.raises(InvalidMessage, match="int4_grouped needs a last axis that is a multiple of 32"):
        Tensor.int4_grouped(np.zeros((2, 33), np.float32))


def test_int4_layout_byte_for_byte() -> None:
    values = np.zeros((1, 32), np.float32)
    values[0, 0], values[0, 1], values[0, 2] = 7.0, -7.0, 1.0  # scale 1: nibbles 15, 1, 9, then 8s
    tensor = Tensor.int4_grouped(values)
    raw = encode_frame(ContinueHidden(session_id="s", layer=1, compression="int4", hidden=tensor)).tobytes()
    data = raw[-24:]  # 2 bytes of scale + 16 packed bytes = 18, padded to 24
    assert np.frombuffer(data[:2], "<f2")[0] == 1.0
    assert data[2:5] == bytes([0x1F, 0x89, 0x88]) and data[5:18] == bytes([0x88]) * 13 and data[18:] == bytes(6)
    decoded = decode_frame(raw, Limits()).message
    assert isinstance(decoded, ContinueHidden) and decoded.hidden.dtype is DType.INT4_GROUPED
    assert decoded.hidden == tensor and np.array_equal(decoded.hidden.numpy(), np.rint(values))


def test_every_codec_crosses_a_frame() -> None:
    x = hidden_rows(4, 64)
    for name in COMPRESSIONS:
        tensor = get_codec(name).encode(x)
        # One vocabulary: the edge's codec name is the wire's compression name.
        raw = encode_frame(ContinueHidden(session_id="s", layer=3, compression=name, hidden=tensor)).tobytes()
        back = decode_frame(raw, Limits()).message.hidden
        assert back == tensor and np.array_equal(back.numpy(), tensor.numpy())


def _hidden_frame(dtype: int, dims: tuple[int, ...], nbytes: int) -> bytes:
    """A ContinueHidden frame whose one tensor declares `dtype`, `dims` and `nbytes`."""
    meta = b'{"session_id":"s","layer":1,"compression":"int4"}'
    desc = DESCRIPTOR.pack(0, dtype, len(dims), 0, 0, nbytes) + struct.pack(f"<{len(dims)}I", *dims)
    desc += bytes((-len(desc)) % 8)
    head = HEADER.pack(1, 0, ContinueHidden.TYPE, 1, 0, 0, len(meta), 0)
    return head + desc + meta + bytes((-len(meta)) % 8) + bytes(nbytes + (-nbytes) % 8)


@pytest.mark.parametrize(("dims", "text"), [
    ((2, 48), "the last axis of an INT4_GROUPED tensor must be a multiple of 32, got shape (2, 48)"),
    ((), "an INT4_GROUPED tensor needs at least one axis"),
])
def test_decoder_refuses_bad_int4_shapes_before_allocating(dims: tuple[int, ...], text: str) -> None:
    raw = _hidden_frame(int(DType.INT4_GROUPED), dims, 64)
    tracemalloc.start()
    try:
        with pytest.raises(BadTensor) as info:
            decode_frame(raw, Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value) == text and peak < 64 * 1024


def test_decoder_checks_int4_byte_count() -> None:
    raw = _hidden_frame(int(DType.INT4_GROUPED), (1, 32), 16)  # needs 16 + 2 scale bytes
    with pytest.raises(BadTensor, match=r"shape \(1, 32\) of INT4_GROUPED needs 18 bytes, frame declares 16"):
        decode_frame(raw, Limits())
    assert wire_nbytes(DType.INT4_GROUPED, (3, 1536)) == 3 * (768 + 96)


def test_tensor_validation() -> None:
    with pytest.raises(InvalidMessage, match="INT4_GROUPED scales must be float16 of shape"):
        Tensor(DType.INT4_GROUPED, np.zeros((1, 16), np.uint8), np.zeros((1, 1), np.float32))
    with pytest.raises(InvalidMessage, match="only INT8_ROWWISE, INT8_ROWWISE_DEFLATE and INT4_GROUPED tensors have"):
        Tensor(DType.FLOAT32, np.zeros((1, 2), np.float32), np.zeros((1,), np.float32))
