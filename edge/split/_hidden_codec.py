"""Compression of hidden states for split computing: float rows in, a wire `Tensor` out.

What belongs here: the codecs the edge applies to the hidden states it sends (one row per
position, [n, hidden_size]), their names, and their exact wire sizes. What does not: the
wire layout itself (`tether.protocol._tensors`, where the cloud decodes every codec's
tensor with `Tensor.numpy()`), or when rows are sent (`_split.py`).

Every codec works row by row (position by position), so compressing a prompt in one
message or token by token gives the same rows: the cloud's cache is the same either way.

| name         | wire dtype           | bytes per row of H values | what is lost                              |
|--------------|----------------------|---------------------------|-------------------------------------------|
| fp32         | FLOAT32              | 4 H                       | nothing                                   |
| fp16         | FLOAT16              | 2 H                       | mantissa bits; values past 65504 saturate |
| bf16         | BFLOAT16             | 2 H                       | mantissa bits (fp32's range)              |
| int8         | INT8_ROWWISE         | H + 4                     | absmax per row: scale = max abs / 127     |
| int8-deflate | INT8_ROWWISE_DEFLATE | 4 + DEFLATE(int8 values)  | as int8 (the DEFLATE stage is lossless)   |
| int4         | INT4_GROUPED         | H / 2 + H / 16            | absmax per 32 values: scale = max abs / 7 |

int8-deflate exists because a residual stream's per-row absmax is set by a few outlier
channels, so nearly all of a row's int8 values are small integers: their entropy is a few
bits, not eight, and DEFLATE's Huffman stage spends about that. Its size depends on the data;
`nbytes` gives int8's (the most it can usefully take) for planning, and each sent tensor's
`nbytes` is what it really took.

int4 groups (the GGUF Q4_0 layout with a float16 scale) is the stronger scheme: residual
streams carry a few huge outlier channels, and a per-row scale spends int8's range on
them; a group of 32 confines an outlier's damage to its own 31 neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import torch

from tether.errors import ConfigurationError
from tether.protocol import COMPRESSIONS, INT4_GROUP, DType, Tensor, wire_nbytes

__all__ = ["CODECS", "COMPRESSIONS", "HiddenCodec", "get_codec"]

# `COMPRESSIONS` (the names `SplitOptions.compression` accepts, lossless first) is the wire's
# one vocabulary (`tether.protocol.COMPRESSIONS`), re-exported here.

_FP16_MAX = float(np.finfo(np.float16).max)


class HiddenCodec(Protocol):
    """Turns [n, H] hidden states into the wire tensor that carries them."""

    @property
    def name(self) -> str:
        """One of `COMPRESSIONS`."""
        ...

    @property
    def dtype(self) -> DType:
        """The wire dtype of the tensors `encode` returns."""
        ...

    def encode(self, hidden: torch.Tensor) -> Tensor:
        """Compress [n, H] float hidden states (any float dtype, CPU or not) into a wire tensor."""
        ...

    def nbytes(self, rows: int, hidden_size: int) -> int:
        """Bytes of tensor data `rows` rows take on the wire (scales included, framing not);
        for a codec whose size depends on the data (int8-deflate), the size to plan with."""
        ...


def _rows(hidden: torch.Tensor) -> np.ndarray:
    """[n, H] float32 numpy (a view when the tensor already is CPU float32)."""
    if hidden.ndim != 2:
        raise ConfigurationError(f"hidden states must be [n, hidden_size], got shape {tuple(hidden.shape)}")
    return hidden.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


@dataclass(frozen=True, slots=True)
class _Codec:
    name: str
    dtype: DType

    def nbytes(self, rows: int, hidden_size: int) -> int:
        if self.dtype is DType.INT8_ROWWISE_DEFLATE:  # data-dependent: plan with plain int8's size
            return wire_nbytes(DType.INT8_ROWWISE, (rows, hidden_size))
        return wire_nbytes(self.dtype, (rows, hidden_size))

    def encode(self, hidden: torch.Tensor) -> Tensor:
        rows = _rows(hidden)
        if self.dtype is DType.FLOAT32:
            return Tensor.from_numpy(rows)
        if self.dtype is DType.FLOAT16:
            # Saturate instead of overflowing to inf (which the cloud would refuse).
            return Tensor.from_numpy(np.clip(rows, -_FP16_MAX, _FP16_MAX).astype(np.float16))
        if self.dtype is DType.BFLOAT16:
            return Tensor.bfloat16(rows)
        if self.dtype is DType.INT8_ROWWISE:
            return Tensor.int8_rowwise(rows)
        if self.dtype is DType.INT8_ROWWISE_DEFLATE:
            return Tensor.int8_rowwise_deflate(rows)
        if rows.shape[1] % INT4_GROUP:
            raise ConfigurationError(
                f"int4 compression needs a hidden size that is a multiple of {INT4_GROUP}, got {rows.shape[1]}"
            )
        return Tensor.int4_grouped(rows)


CODECS: Final[dict[str, HiddenCodec]] = {
    "fp32": _Codec("fp32", DType.FLOAT32),
    "fp16": _Codec("fp16", DType.FLOAT16),
    "bf16": _Codec("bf16", DType.BFLOAT16),
    "int8": _Codec("int8", DType.INT8_ROWWISE),
    "int8-deflate": _Codec("int8-deflate", DType.INT8_ROWWISE_DEFLATE),
    "int4": _Codec("int4", DType.INT4_GROUPED),
}

_ALIASES: Final[dict[str, str]] = {"none": "fp32", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def get_codec(name: str | HiddenCodec) -> HiddenCodec:
    """The codec called `name` (``"fp32"``, ``"fp16"``, ``"bf16"``, ``"int8"``, ``"int8-deflate"``, ``"int4"``).

    A codec object is returned as is, so callers may inject their own.

    Raises:
        ConfigurationError: an unknown name (the message lists the valid ones).
    """
    if not isinstance(name, str):
        return name
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in CODECS:
        raise ConfigurationError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")
    return CODECS[key]


def roundtrip(codec: HiddenCodec, hidden: torch.Tensor) -> torch.Tensor:
    """What the cloud will compute with: `hidden` encoded and decoded, as float32 [n, H]."""
    decoded: Any = codec.encode(hidden).numpy()
    return torch.from_numpy(np.array(decoded, dtype=np.float32, copy=True))
