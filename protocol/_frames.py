"""Frame codec: one message <-> the plaintext bytes of one transport record.

What belongs here: the binary layout of a frame (docs/protocol.md, "Frame layout") and
its checks. Decoding validates every declared size against `Limits` before touching the
payload, and returns tensors as zero-copy views into the frame buffer.

Layout (little-endian, every section starts 8-byte aligned):

    header       24 bytes   u8 version | u8 flags | u16 type | u16 tensor_count | u16 0
                            | u64 request_id | u32 metadata_length | u32 padding_length
    descriptors  per tensor: u8 slot | u8 dtype | u8 ndim | u8 0 | u32 0 | u64 nbytes
                            | u32 dims[ndim] | zero pad to 8
    metadata     metadata_length bytes of strict UTF-8 JSON | zero pad to 8
    tensor data  per tensor: nbytes | zero pad to 8
    padding      padding_length zero bytes (optional traffic padding)
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from tether.protocol._errors import (
    BadTensor,
    FrameTooLarge,
    LimitExceeded,
    MetadataTooLarge,
    ProtocolError,
    TensorTooLarge,
    UnknownMessageType,
    UsageError,
)
from tether.protocol._limits import Limits
from tether.protocol._messages import CATALOGUE, Message, VerifyDraft
from tether.protocol._metadata import decode_metadata, encode_metadata
from tether.protocol._schema import check_decoded_tensor
from tether.protocol._tensors import DType, Tensor, decode_tensor, wire_nbytes_range

__all__ = ["FLAG_END", "FORMAT_VERSION", "HEADER", "Frame", "decode_frame", "encode_frame", "encoded_size"]

FORMAT_VERSION = 1
FLAG_END = 0x01
KNOWN_FLAGS = FLAG_END
HEADER = struct.Struct("<BBHHHQII")
DESCRIPTOR = struct.Struct("<BBBBIQ")
DIM = struct.Struct("<I")
MAX_DIM = 2**32 - 1
_ZERO_PAD = bytes(8)
_DTYPES = {int(d): d for d in DType}
# Tensor axes bounded by a `Limits` field beyond the element count, checked on the declared
# shape before the data is read: message type -> tensor field -> per axis, the Limits
# attribute bounding it (None: only max_tensor_elements).
DIM_LIMITS: dict[type[Message], dict[str, tuple[str | None, ...]]] = {
    VerifyDraft: {
        "tokens": ("max_draft_tokens",),
        "draft_indices": ("max_draft_tokens", "max_draft_width"),
        "draft_probs": ("max_draft_tokens", "max_draft_width"),
    },
}


def _pad8(n: int) -> int:
    return (-n) & 7


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame: the message, its request id and flags."""

    message: Message
    request_id: int = 0
    flags: int = 0

    @property
    def end(self) -> bool:
        """True on the last reply to a request."""
        return bool(self.flags & FLAG_END)


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """A frame ready to copy into a record: `head` then the `chunks`, `size` bytes in all."""

    head: bytes
    chunks: tuple[Any, ...]
    size: int

    def write_into(self, out: memoryview) -> None:
        pos = len(self.head)
        out[:pos] = self.head
        for chunk in self.chunks:
            n = len(chunk)
            out[pos : pos + n] = chunk
            pos += n
        assert pos == self.size

    def tobytes(self) -> bytes:
        buf = bytearray(self.size)
        self.write_into(memoryview(buf))
        return bytes(buf)


def encode_frame(message: Message, *, request_id: int = 0, flags: int = 0, padding: int = 0) -> EncodedFrame:
    """Lay out `message` as a frame without copying tensor data (views are kept in chunks)."""
    if not isinstance(message, Message) or type(message).TYPE not in CATALOGUE:
        raise UsageError(f"not a catalogue message: {message!r}")
    if not 0 <= request_id < 2**64:
        raise UsageError("request_id must fit in 64 bits")
    if flags & ~KNOWN_FLAGS or not 0 <= padding < 2**32:
        raise UsageError("bad flags or padding")
    meta_dict = message._to_metadata()
    metadata = encode_metadata(meta_dict, checked=True) if meta_dict else b""
    descriptors = bytearray()
    chunks: list[Any] = []
    data_size = 0
    count = 0
    for info in type(message).TENSOR_FIELDS:
        value = getattr(message, info.name)
        if value is None:
            continue
        tensor = value if isinstance(value, Tensor) else Tensor.from_numpy(value)
        shape = tensor.shape
        nbytes = tensor.nbytes
        if any(d > MAX_DIM for d in shape):
            raise UsageError(f"{info.name}: dimension too large")
        descriptors += DESCRIPTOR.pack(info.slot, int(tensor.dtype), len(shape), 0, 0, nbytes)
        for d in shape:
            descriptors += DIM.pack(d)
        descriptors += _ZERO_PAD[: _pad8(len(descriptors))]
        for buf in tensor.buffers():
            chunks.append(buf)
        if _pad8(nbytes):
            chunks.append(_ZERO_PAD[: _pad8(nbytes)])
        data_size += nbytes + _pad8(nbytes)
        count += 1
    header = HEADER.pack(FORMAT_VERSION, flags, message.TYPE, count, 0, request_id, len(metadata), padding)
    head = header + bytes(descriptors) + metadata + _ZERO_PAD[: _pad8(len(metadata))]
    if padding:
        chunks.append(bytes(padding))
    return EncodedFrame(head, tuple(chunks), len(head) + data_size + padding)


def encoded_size(message: Message) -> int:
    """Bytes `message` takes as a frame (without traffic padding)."""
    return encode_frame(message).size


def _zeros(view: memoryview, start: int, end: int) -> bool:
    if end <= start:
        return True
    if end - start <= 64:
        return not any(view[start:end])
    return not np.frombuffer(view, dtype=np.uint8, count=end - start, offset=start).any()


def decode_frame(buffer: bytes | bytearray | memoryview | np.ndarray, limits: Limits) -> Frame:
    """Parse and validate a frame. Tensors are views into `buffer` (keep it alive with them).

    Raises:
        FrameTooLarge, MetadataTooLarge, TensorTooLarge, LimitExceeded: a declared size is
            over its limit (checked before anything is allocated).
        UnknownMessageType, BadTensor, BadMetadata, ProtocolError: malformed frame.
    """
    view = memoryview(buffer)  # type: ignore[arg-type]  # numpy arrays are buffers
    size = len(view)
    if size > limits.max_frame_bytes:
        raise FrameTooLarge(size, limits.max_frame_bytes)
    if size < HEADER.size:
        raise ProtocolError(f"frame of {size} bytes is shorter than the {HEADER.size}-byte header")
    version, flags, type_id, count, reserved, request_id, meta_len, padding = HEADER.unpack_from(view, 0)
    if version != FORMAT_VERSION:
        raise ProtocolError(f"unsupported frame format version {version}")
    cls = CATALOGUE.get(type_id)
    if cls is None:
        raise UnknownMessageType(type_id)
    if flags & ~KNOWN_FLAGS or reserved:
        raise ProtocolError("frame header has unknown flags or non-zero reserved bits")
    if count > limits.max_tensors:
        raise LimitExceeded("tensor count", count, limits.max_tensors, unit="")
    if meta_len > limits.max_metadata_bytes:
        raise MetadataTooLarge(meta_len, limits.max_metadata_bytes)
    pos = HEADER.size
    slots = {info.slot: info for info in cls.TENSOR_FIELDS}
    dim_limits = DIM_LIMITS.get(cls, {})
    parsed: list[tuple[int, DType, tuple[int, ...], int]] = []
    last_slot = -1
    for index in range(count):
        if size - pos < DESCRIPTOR.size:
            raise BadTensor(f"tensor {index}: descriptor runs past the end of the frame")
        slot, dtype_id, ndim, r1, r2, nbytes = DESCRIPTOR.unpack_from(view, pos)
        pos += DESCRIPTOR.size
        if r1 or r2:
            raise BadTensor(f"tensor {index}: non-zero reserved descriptor bytes")
        if slot not in slots or slot <= last_slot:
            raise BadTensor(f"tensor {index}: slot {slot} is not a tensor field of {cls.__name__} in order")
        last_slot = slot
        dtype = _DTYPES.get(dtype_id)
        if dtype is None:
            raise BadTensor(f"tensor {index}: unknown dtype {dtype_id}")
        if ndim > limits.max_ndim:
            raise BadTensor(f"tensor {index}: {ndim} dimensions exceed the limit of {limits.max_ndim}")
        dims_end = pos + DIM.size * ndim
        if dims_end > size:
            raise BadTensor(f"tensor {index}: descriptor runs past the end of the frame")
        shape = struct.unpack_from(f"<{ndim}I", view, pos)
        pos = dims_end + _pad8(dims_end)
        if not _zeros(view, dims_end, min(pos, size)):
            raise BadTensor(f"tensor {index}: non-zero descriptor padding")
        elements = math.prod(shape)
        if elements > limits.max_tensor_elements:
            raise TensorTooLarge(elements, limits.max_tensor_elements, index)
        field = slots[slot].name
        for axis, (dim, limit_name) in enumerate(zip(shape, dim_limits.get(field, ()), strict=False)):
            if limit_name is not None and dim > getattr(limits, limit_name):
                raise LimitExceeded(
                    f"{cls.__name__}.{field} axis {axis} ({limit_name})", dim, getattr(limits, limit_name), unit=""
                )
        if dtype is DType.INT8_ROWWISE and ndim == 0:
            raise BadTensor(f"tensor {index}: INT8_ROWWISE needs at least one axis")
        low, high = wire_nbytes_range(dtype, shape)  # equal but for a DEFLATE-compressed dtype
        if not low <= nbytes <= high:
            needs = f"{low}" if low == high else f"{low} to {high}"
            raise BadTensor(
                f"tensor {index}: shape {shape} of {dtype.name} needs {needs} bytes, frame declares {nbytes}"
            )
        parsed.append((slot, dtype, shape, nbytes))
    meta_start = pos
    pos = meta_start + meta_len + _pad8(meta_len)
    data_start = pos
    for _, _, _, nbytes in parsed:
        pos += nbytes + _pad8(nbytes)
    declared = pos + padding
    if declared != size:
        raise ProtocolError(f"frame of {size} bytes disagrees with the {declared} bytes its header declares")
    if not _zeros(view, meta_start + meta_len, data_start):
        raise ProtocolError("non-zero metadata padding")
    metadata = decode_metadata(view[meta_start : meta_start + meta_len], max_depth=limits.max_metadata_depth)
    tensors: dict[str, Any] = {}
    pos = data_start
    for slot, dtype, shape, nbytes in parsed:
        info = slots[slot]
        tensor = decode_tensor(buffer, pos, dtype, shape, nbytes)
        tensors[info.name] = check_decoded_tensor(info, tensor, f"{cls.__name__}.{info.name}")
        end = pos + nbytes
        pos = end + _pad8(nbytes)
        if not _zeros(view, end, pos):
            raise BadTensor(f"{cls.__name__}.{info.name}: non-zero tensor padding")
    if not _zeros(view, pos, size):
        raise ProtocolError("non-zero traffic padding")
    for info in cls.TENSOR_FIELDS:
        if info.name not in tensors and not info.optional:
            raise BadTensor(f"{cls.__name__}: missing tensor {info.name!r}")
    message = cls._from_metadata(metadata, cls.__name__, True, tensors)
    return Frame(message, request_id, flags)
