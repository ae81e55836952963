"""Configured maxima and the rekey policy, each with a safe default.

What belongs here: the numbers a deployment may tune. Every limit is checked against a
*declared* size before anything is read or allocated (websockets' `Frame.parse` habit).
"""

from __future__ import annotations

from dataclasses import dataclass

from tether.protocol._errors import UsageError

__all__ = ["Limits", "RekeyPolicy"]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Size and count limits for one connection (each side enforces its own).

    Attributes:
        max_frame_bytes: largest plaintext frame (header + metadata + tensors) accepted.
        max_metadata_bytes: largest metadata part.
        max_metadata_depth: deepest nesting of metadata lists/objects.
        max_tensor_elements: most elements in one tensor.
        max_tensors: most tensors in one frame.
        max_ndim: highest tensor rank.
        max_in_flight: most requests one client may have open at once; more are refused
            with ErrorReply(OVERLOADED).
    """

    max_frame_bytes: int = 32 * MiB
    max_metadata_bytes: int = 1 * MiB
    max_metadata_depth: int = 32
    max_tensor_elements: int = 16 * MiB
    max_tensors: int = 16
    max_ndim: int = 8
    max_in_flight: int = 64

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"Limits.{name} must be a positive int, got {value!r}")
        if self.max_frame_bytes > 2**31:
            raise UsageError("Limits.max_frame_bytes must be at most 2 GiB")
        if self.max_frame_bytes < 4096:
            raise UsageError("Limits.max_frame_bytes must be at least 4096")
        if self.max_ndim > 32:
            raise UsageError("Limits.max_ndim must be at most 32")
        if self.max_tensors > 255:
            raise UsageError("Limits.max_tensors must be at most 255")


@dataclass(frozen=True, slots=True, kw_only=True)
class RekeyPolicy:
    """When a sender replaces its transport key (Noise REKEY), announced in-band.

    The sender rekeys after `messages` records or `bytes` plaintext bytes since the last
    rekey, whichever comes first. Rekeying bounds how much traffic one key protects and
    gives forward secrecy inside a long session (a key captured later cannot decrypt
    records sent before its last rekey).
    """

    messages: int = 1 << 16
    bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.messages < 1 or self.bytes < 1:
            raise UsageError("RekeyPolicy thresholds must be positive")
