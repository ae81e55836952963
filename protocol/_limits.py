"""Configured maxima and the rekey policy, each with a safe default.

What belongs here: the numbers a deployment may tune. Every limit is checked against a
*declared* size before anything is read or allocated (websockets' `Frame.parse` habit).
"""

from __future__ import annotations

from dataclasses import dataclass

from tether.protocol._errors import UsageError

__all__ = ["AdmissionLimits", "Limits", "RateLimiter", "RekeyPolicy"]

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
        max_draft_tokens: most draft tokens k in one VerifyDraft.
        max_draft_width: most entries m per row of VerifyDraft's sparse draft distribution
            (`draft_indices`, `draft_probs`: k x m). Both are checked on the declared
            shapes, before the tensor data is read, so the largest VerifyDraft a peer can
            make the receiver handle is k x m, not the frame limit.
    """

    max_frame_bytes: int = 32 * MiB
    max_metadata_bytes: int = 1 * MiB
    max_metadata_depth: int = 32
    max_tensor_elements: int = 16 * MiB
    max_tensors: int = 16
    max_ndim: int = 8
    max_in_flight: int = 64
    max_draft_tokens: int = 128
    max_draft_width: int = 1024

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


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionLimits:
    """Server-wide admission limits: how many connections, and how fast each client may ask.

    Per-client limits are keyed by the client's authenticated static key, so they hold
    across all of that client's connections (a client cannot reset its budget by
    reconnecting). Refusals are clear and distinct:

    - a connection over `max_connections` is closed before the handshake with 1013
      TRY_AGAIN_LATER (`ServerBusy`), so a flood of dials costs no Diffie-Hellman;
    - one over `max_connections_per_client` is refused once its Hello arrives (the client
      proved it holds the session keys, so a replayed handshake is never counted) and before
      the Welcome, with 4060 TOO_MANY_CONNECTIONS: `connect()` raises `TooManyConnections`;
    - a request over the client's rate is answered ErrorReply(OVERLOADED, retryable=True)
      saying when to retry; the connection stays open.

    Attributes:
        max_connections: websocket connections open at once, handshakes included.
        max_connections_per_client: authenticated connections one client key may hold.
        requests_per_second: sustained requests per second per client key (token bucket).
        burst: requests a client may send at once above that rate (the bucket's size).
    """

    max_connections: int = 1024
    max_connections_per_client: int = 32
    requests_per_second: float = 500.0
    burst: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_connections_per_client", "burst"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"AdmissionLimits.{name} must be a positive int, got {value!r}")
        if not (isinstance(self.requests_per_second, (int, float)) and self.requests_per_second > 0):
            raise UsageError(f"AdmissionLimits.requests_per_second must be > 0, got {self.requests_per_second!r}")


class RateLimiter:
    """A token bucket per key: `rate` tokens per second, at most `burst` saved up.

    Sans-I/O: the caller passes the clock reading. Buckets of keys idle long enough to be
    full again are dropped, so the table stays as small as the set of recently active keys.
    """

    __slots__ = ("_buckets", "_last_sweep", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self._buckets: dict[bytes, tuple[float, float]] = {}  # key -> (tokens, time)
        self._last_sweep = 0.0

    def acquire(self, key: bytes, now: float) -> float:
        """Take one token for `key`. Returns 0.0 if granted, else seconds until one is free."""
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            self._sweep(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _sweep(self, now: float) -> None:
        full_after = self.burst / self.rate
        if now - self._last_sweep < full_after:
            return
        self._last_sweep = now
        for key in [k for k, (_, t) in self._buckets.items() if now - t >= full_after]:
            del self._buckets[key]
