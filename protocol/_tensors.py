"""Tensors on the wire: dtypes, the `Tensor` value type, and zero-copy decoding.

What belongs here: how an array becomes raw little-endian bytes and back. Tensor data is
never pickled or parsed: it is a buffer with a dtype and a shape, decoded with
`np.frombuffer` (a view into the received frame, no copy).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from tether.protocol._errors import BadTensor, InvalidMessage

__all__ = ["DType", "Tensor", "bfloat16_to_float32", "float32_to_bfloat16"]


class DType(IntEnum):
    """Wire dtypes. Values are the byte stored in a tensor descriptor."""

    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3  # carried as uint16 bit patterns (numpy has no bfloat16)
    INT8_ROWWISE = 4  # int8 values with one float32 scale per row (last axis = row)
    INT32 = 5
    INT64 = 6
    # int4 in groups of INT4_GROUP values along the last axis, one float16 scale per group:
    # value = (nibble - 8) * scale, nibble in [1, 15]; two values per byte, low nibble first.
    # The last axis must be a multiple of INT4_GROUP (checked before anything is allocated).
    INT4_GROUPED = 7
    # INT8_ROWWISE's values and scales, the int8 values then squeezed by a raw DEFLATE stream
    # (RFC 1951; lossless). Its byte count varies with the data: the frame declares it, within
    # `wire_nbytes_range`, and decoding inflates into exactly the declared shape or refuses.
    INT8_ROWWISE_DEFLATE = 8


# Storage dtype of each wire dtype's values (always little-endian on the wire).
STORAGE: dict[DType, np.dtype[Any]] = {
    DType.FLOAT32: np.dtype("<f4"),
    DType.FLOAT16: np.dtype("<f2"),
    DType.BFLOAT16: np.dtype("<u2"),
    DType.INT8_ROWWISE: np.dtype("i1"),
    DType.INT32: np.dtype("<i4"),
    DType.INT64: np.dtype("<i8"),
    DType.INT4_GROUPED: np.dtype("u1"),  # packed nibbles: the stored last axis is half the logical one
    DType.INT8_ROWWISE_DEFLATE: np.dtype("i1"),  # the inflated values; the wire holds their DEFLATE stream
}
_ROWWISE = (DType.INT8_ROWWISE, DType.INT8_ROWWISE_DEFLATE)
_FROM_NUMPY = {
    np.dtype(np.float32): DType.FLOAT32,
    np.dtype(np.float16): DType.FLOAT16,
    np.dtype(np.int32): DType.INT32,
    np.dtype(np.int64): DType.INT64,
}
SCALE_DTYPE = np.dtype("<f4")
INT4_GROUP = 32  # values per float16 scale in INT4_GROUPED (the GGUF Q4_0 block size)
INT4_SCALE_DTYPE = np.dtype("<f2")
DEFLATE_LEVEL = 9  # rows are small (one token's hidden state): the slowest level costs ~0.1 ms


def deflate_bound(n: int) -> int:
    """Most bytes a DEFLATE stream of `n` input bytes can take (zlib's compressBound)."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


def check_int4_shape(shape: tuple[int, ...]) -> None:
    """Raise `BadTensor` unless `shape` can be INT4_GROUPED: >= 1 axis, last a multiple of 32.

    Decoding calls this (through `wire_nbytes`) on the declared shape, before reading or
    allocating anything.
    """
    if not shape:
        raise BadTensor("an INT4_GROUPED tensor needs at least one axis")
    if shape[-1] % INT4_GROUP:
        raise BadTensor(
            f"the last axis of an INT4_GROUPED tensor must be a multiple of {INT4_GROUP}, got shape {shape}"
        )


def wire_nbytes_range(dtype: DType, shape: tuple[int, ...]) -> tuple[int, int]:
    """Fewest and most bytes a tensor of `dtype` and `shape` may declare on the wire.

    Equal for every dtype but INT8_ROWWISE_DEFLATE, whose values are a DEFLATE stream: at
    least 2 bytes, at most zlib's bound for the int8 values, after the float32 scales.

    Raises:
        BadTensor: as `wire_nbytes`; a row-wise dtype with no axis.
    """
    if dtype is DType.INT8_ROWWISE_DEFLATE:
        if not shape:
            raise BadTensor("an INT8_ROWWISE_DEFLATE tensor needs at least one axis")
        scales = rows_of(shape) * SCALE_DTYPE.itemsize
        return scales + 2, scales + deflate_bound(math.prod(shape))
    exact = wire_nbytes(dtype, shape)
    return exact, exact


def wire_nbytes(dtype: DType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `dtype` and `shape` occupies on the wire (scales included).

    For INT8_ROWWISE_DEFLATE, whose size depends on the data, this is the most it can take
    (`wire_nbytes_range`); `Tensor.nbytes` is the size of one tensor.

    Raises:
        BadTensor: an INT4_GROUPED shape with no axis or a last axis not a multiple of 32.
    """
    if dtype is DType.INT8_ROWWISE_DEFLATE:
        return wire_nbytes_range(dtype, shape)[1]
    elements = math.prod(shape)
    if dtype is DType.INT4_GROUPED:
        check_int4_shape(shape)
        return elements // 2 + (elements // INT4_GROUP) * INT4_SCALE_DTYPE.itemsize
    nbytes = elements * STORAGE[dtype].itemsize
    if dtype is DType.INT8_ROWWISE:
        nbytes += rows_of(shape) * SCALE_DTYPE.itemsize
    return nbytes


def rows_of(shape: tuple[int, ...]) -> int:
    """Rows of a row-wise quantized tensor: all axes but the last (1 for a vector)."""
    return math.prod(shape[:-1])


def float32_to_bfloat16(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        rounded = np.where(nan, np.uint16(0x7FC0), rounded)
    return rounded


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exact."""
    widened: np.ndarray = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16
    return widened.view(np.float32)


@dataclass(frozen=True, slots=True, eq=False)
class Tensor:
    """An array in one of the wire dtypes.

    Build with `Tensor.from_numpy(a)` (float32, float16, int32, int64), `Tensor.bfloat16(a)`,
    `Tensor.int8_rowwise(a)`, `Tensor.int8_rowwise_deflate(a)` or `Tensor.int4_grouped(a)`;
    read with `.numpy()` (float32 for bfloat16, int8 and int4).

    Attributes:
        dtype: the wire dtype.
        data: the stored values, shape = the tensor's shape: float32/float16/int32/int64
            arrays as they are, uint16 bit patterns for BFLOAT16, int8 for INT8_ROWWISE and
            INT8_ROWWISE_DEFLATE (inflated); for INT4_GROUPED, uint8 of shape
            `shape[:-1] + (shape[-1] // 2,)` (packed nibbles).
        scales: INT8_ROWWISE(_DEFLATE): float32 of shape `shape[:-1]`, value = data * scale.
            INT4_GROUPED: float16 of shape `shape[:-1] + (shape[-1] // 32,)`, one per group.
        packed: INT8_ROWWISE_DEFLATE only: the raw DEFLATE stream of `data` (made from `data`
            when not given).

    Decoded tensors are views into the received frame (zero copy); copy before keeping
    them past the message's lifetime if the frame buffer must be released early.
    """

    dtype: DType
    data: np.ndarray
    scales: np.ndarray | None = None
    packed: bytes | memoryview | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        dtype = DType(self.dtype)
        object.__setattr__(self, "dtype", dtype)
        if not isinstance(self.data, np.ndarray):
            raise InvalidMessage("Tensor.data must be a numpy array")
        storage = STORAGE[dtype]
        if self.data.dtype.newbyteorder("<") != storage and self.data.dtype != storage:
            raise InvalidMessage(f"Tensor.data for {dtype.name} must be {storage}, got {self.data.dtype}")
        if self.packed is not None and dtype is not DType.INT8_ROWWISE_DEFLATE:
            raise InvalidMessage(f"only INT8_ROWWISE_DEFLATE tensors have a packed stream, not {dtype.name}")
        if dtype in _ROWWISE:
            if self.data.ndim < 1:
                raise InvalidMessage(f"an {dtype.name} tensor needs at least one axis")
            if self.scales is None or not isinstance(self.scales, np.ndarray):
                raise InvalidMessage(f"an {dtype.name} tensor needs float32 scales")
            if self.scales.dtype != np.float32 or self.scales.shape != self.data.shape[:-1]:
                raise InvalidMessage(
                    f"{dtype.name} scales must be float32 of shape {self.data.shape[:-1]}, "
                    f"got {self.scales.dtype} {self.scales.shape}"
                )
            if dtype is DType.INT8_ROWWISE_DEFLATE and self.packed is None:
                values = np.ascontiguousarray(self.data, dtype=STORAGE[dtype])
                # Raw stream (the frame carries the size); Huffman only: quantized activations
                # have no repeated strings for LZ77 to find, and its match codes cost bits.
                packer = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
                object.__setattr__(self, "packed", packer.compress(values.data) + packer.flush())
        elif dtype is DType.INT4_GROUPED:
            if self.data.ndim < 1 or (2 * self.data.shape[-1]) % INT4_GROUP:
                raise InvalidMessage(
                    f"INT4_GROUPED data must have a last axis of a multiple of {INT4_GROUP // 2} packed bytes, "
                    f"got shape {self.data.shape}"
                )
            groups = self.data.shape[:-1] + (2 * self.data.shape[-1] // INT4_GROUP,)
            if not isinstance(self.scales, np.ndarray) or self.scales.dtype != np.float16 or self.scales.shape != groups:
                raise InvalidMessage(f"INT4_GROUPED scales must be float16 of shape {groups}")
        elif self.scales is not None:
            raise InvalidMessage(
                f"only INT8_ROWWISE, INT8_ROWWISE_DEFLATE and INT4_GROUPED tensors have scales, not {dtype.name}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape (for INT4_GROUPED, twice the packed last axis)."""
        if self.dtype is DType.INT4_GROUPED:
            return tuple(self.data.shape[:-1]) + (2 * self.data.shape[-1],)
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        """Bytes this tensor takes on the wire (scales included)."""
        if self.packed is not None:
            return rows_of(self.shape) * SCALE_DTYPE.itemsize + len(self.packed)
        return wire_nbytes(self.dtype, self.shape)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Tensor:
        """Wrap a float32, float16, int32 or int64 array (no copy when already contiguous)."""
        array = np.asarray(array)
        dtype = _FROM_NUMPY.get(array.dtype.newbyteorder("=")) if array.dtype.byteorder != "|" else None
        if dtype is None:
            raise InvalidMessage(
                f"no wire dtype for numpy {array.dtype}; use float32, float16, int32 or int64, "
                "or Tensor.bfloat16 / Tensor.int8_rowwise"
            )
        return cls(dtype, array)

    @classmethod
    def bfloat16(cls, array: np.ndarray) -> Tensor:
        """Round a float array to bfloat16 (nearest even)."""
        return cls(DType.BFLOAT16, float32_to_bfloat16(np.asarray(array, dtype=np.float32)))

    @classmethod
    def int8_rowwise(cls, array: np.ndarray) -> Tensor:
        """Symmetric per-row int8 quantization: scale = max|row| / 127 (1 for all-zero rows)."""
        values = np.asarray(array, dtype=np.float32)
        if values.ndim < 1:
            raise InvalidMessage("int8_rowwise needs at least one axis")
        peak = np.max(np.abs(values), axis=-1) if values.shape[-1] else np.zeros(values.shape[:-1], np.float32)
        # A subnormal peak would give a zero scale: clamp to float32's smallest normal.
        scales = np.maximum(np.where(peak > 0, peak / 127.0, 1.0), np.finfo(np.float32).tiny).astype(np.float32)
        quantized = np.clip(np.rint(values / scales[..., None]), -127, 127).astype(np.int8)
        return cls(DType.INT8_ROWWISE, quantized, np.asarray(scales, dtype=np.float32).reshape(values.shape[:-1]))

    @classmethod
    def int8_rowwise_deflate(cls, array: np.ndarray) -> Tensor:
        """`int8_rowwise`, then its int8 values squeezed by DEFLATE (lossless: same values)."""
        rowwise = cls.int8_rowwise(array)
        return cls(DType.INT8_ROWWISE_DEFLATE, rowwise.data, rowwise.scales)

    @classmethod
    def int4_grouped(cls, array: np.ndarray) -> Tensor:
        """Symmetric int4 per group of 32 along the last axis: scale = max|group| / 7 (float16).

        The last axis must be a multiple of 32. Groups whose peak is 0 get scale 1; scales are
        clipped into float16's normal range (a tiny group quantizes to zeros, a huge one saturates).
        """
        values = np.asarray(array, dtype=np.float32)
        if values.ndim < 1 or values.shape[-1] % INT4_GROUP:
            raise InvalidMessage(
                f"int4_grouped needs a last axis that is a multiple of {INT4_GROUP}, got shape {values.shape}"
            )
        grouped = values.reshape(values.shape[:-1] + (values.shape[-1] // INT4_GROUP, INT4_GROUP))
        peak = np.max(np.abs(grouped), axis=-1)
        scales = np.where(peak > 0, peak / 7.0, 1.0)
        # Clamp into float16's normal range: a tiny peak would otherwise round to a zero scale.
        half = np.finfo(np.float16)
        scales = np.clip(scales, half.tiny, half.max).astype(np.float16)
        quantized = np.clip(np.rint(grouped / scales.astype(np.float32)[..., None]), -7, 7).astype(np.int16) + 8
        flat = quantized.reshape(values.shape).astype(np.uint8)
        packed = (flat[..., 0::2] | (flat[..., 1::2] << 4)).astype(np.uint8)
        return cls(DType.INT4_GROUPED, packed, scales)

    def numpy(self) -> np.ndarray:
        """The values as numpy: native arrays as they are; BFLOAT16, INT8_ROWWISE, INT4_GROUPED as float32."""
        if self.dtype is DType.BFLOAT16:
            return bfloat16_to_float32(self.data)
        if self.dtype in _ROWWISE:
            assert self.scales is not None
            dequantized: np.ndarray = self.data.astype(np.float32) * self.scales[..., None]
            return dequantized
        if self.dtype is DType.INT4_GROUPED:
            assert self.scales is not None
            shape = self.shape
            nibbles = np.empty(shape, dtype=np.int8)
            nibbles[..., 0::2] = self.data & 0x0F
            nibbles[..., 1::2] = self.data >> 4
            grouped = (nibbles - 8).astype(np.float32).reshape(self.scales.shape + (INT4_GROUP,))
            return (grouped * self.scales.astype(np.float32)[..., None]).reshape(shape)
        return self.data

    def to_torch(self) -> Any:
        """A torch tensor (bfloat16 stays bfloat16, bit-exact); imports torch lazily."""
        import torch

        if self.dtype is DType.BFLOAT16:
            return torch.from_numpy(np.ascontiguousarray(self.data).view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.array(self.numpy(), copy=True))

    def buffers(self) -> list[memoryview]:
        """The wire byte buffers in order (scales first when there are any), contiguous, little-endian."""
        out = []
        if self.scales is not None:
            out.append(_le_bytes(self.scales, INT4_SCALE_DTYPE if self.dtype is DType.INT4_GROUPED else SCALE_DTYPE))
        out.append(memoryview(self.packed) if self.packed is not None else _le_bytes(self.data, STORAGE[self.dtype]))
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return (
            self.dtype == other.dtype
            and self.shape == other.shape
            and b"".join(map(bytes, self.buffers())) == b"".join(map(bytes, other.buffers()))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Tensor({self.dtype.name}, shape={self.shape})"


def _le_bytes(array: np.ndarray, storage: np.dtype[Any]) -> memoryview:
    """A contiguous little-endian byte view of `array` (copies only when needed)."""
    contiguous = np.ascontiguousarray(array, dtype=storage)
    flat: Any = contiguous.reshape(-1).view(np.uint8)
    return memoryview(flat)


def decode_tensor(
    buffer: Any, offset: int, dtype: DType, shape: tuple[int, ...], nbytes: int | None = None
) -> Tensor:
    """A zero-copy Tensor over `buffer[offset:]`; the caller has checked every size already
    (`nbytes`, within `wire_nbytes_range`, is needed for INT8_ROWWISE_DEFLATE only).

    Raises:
        BadTensor: an INT8_ROWWISE_DEFLATE stream that is corrupt, ends early, has bytes after
            its end, or inflates to anything but exactly `shape`'s element count.
    """
    elements = math.prod(shape)
    scales = None
    if dtype is DType.INT8_ROWWISE_DEFLATE:
        if nbytes is None:
            raise BadTensor("an INT8_ROWWISE_DEFLATE tensor needs its declared byte count")
        rows = rows_of(shape)
        scales = np.frombuffer(buffer, dtype=SCALE_DTYPE, count=rows, offset=offset).reshape(shape[:-1])
        start = offset + rows * SCALE_DTYPE.itemsize
        stream = memoryview(buffer)[start : offset + nbytes]
        return Tensor(dtype, _inflate(stream, elements).reshape(shape), scales, stream)
    if dtype is DType.INT4_GROUPED:
        groups = shape[:-1] + (shape[-1] // INT4_GROUP,)
        group_scales = np.frombuffer(buffer, dtype=INT4_SCALE_DTYPE, count=elements // INT4_GROUP, offset=offset)
        offset += group_scales.nbytes
        packed = np.frombuffer(buffer, dtype=STORAGE[dtype], count=elements // 2, offset=offset)
        return Tensor(dtype, packed.reshape(shape[:-1] + (shape[-1] // 2,)), group_scales.reshape(groups))
    if dtype is DType.INT8_ROWWISE:
        rows = rows_of(shape)
        scales = np.frombuffer(buffer, dtype=SCALE_DTYPE, count=rows, offset=offset).reshape(shape[:-1])
        offset += rows * SCALE_DTYPE.itemsize
    data = np.frombuffer(buffer, dtype=STORAGE[dtype], count=elements, offset=offset).reshape(shape)
    return Tensor(dtype, data, scales)


def _inflate(packed: memoryview, elements: int) -> np.ndarray:
    """Inflate a raw DEFLATE stream into exactly `elements` int8 values, allocating no more.

    `max_length` stops zlib at the declared size however far the stream would expand (a
    "zip bomb" costs the decoder at most `elements` bytes, already checked against the limits).
    """
    inflater = zlib.decompressobj(-15)
    try:
        raw = inflater.decompress(packed, elements or 1)  # max_length 0 would mean "no limit"
    except zlib.error as exc:
        raise BadTensor(f"INT8_ROWWISE_DEFLATE: corrupt DEFLATE stream ({exc})") from None
    if len(raw) != elements or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise BadTensor(
            f"INT8_ROWWISE_DEFLATE: the DEFLATE stream is not exactly the declared {elements} values "
            "(it ends early, runs on, or has bytes after its end)"
        )
    return np.frombuffer(raw, dtype=STORAGE[DType.INT8_ROWWISE_DEFLATE])
