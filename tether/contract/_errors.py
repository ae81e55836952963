"""Errors a cloud session can raise, shared by every backend and carried over the wire.

What belongs here: the error tree of the session contract and the stable code of each class.
What does not: how a transport carries them (the protocol's `ErrorReply`, the HTTP port's
JSON body); those map codes to these classes.

Hierarchy (all under `tether.TetherError`)::

    CloudError                    root of the session's errors; `code` is its stable wire name
    ├── InvalidRequest            the caller misused the API (bad draft probabilities, rollback past
    │   │                         the end, unknown model, wrong session mode); nothing changed
    │   └── InvalidSampling       a sampling setting is out of range (also a `ValueError`)
    ├── UnsupportedOperation      this backend cannot do the operation (see `Capabilities`)
    ├── SessionLimitExceeded      a per-session limit (max tokens, max pending requests, max draft)
    │                             would be exceeded; carries `limit_name`, `value`, `limit`
    ├── SessionNotOpen            the session was never opened or is already closed
    ├── SessionEvicted            the server dropped the session's state (memory budget, idle
    │                             timeout, shutdown); the `reason` field says which; open a new
    │                             session and re-prefill to continue
    ├── ServerOverloaded          too many sessions or requests server-wide; retry later
    └── BackendError              the engine behind the session failed (HTTP engine down, bad reply)
        └── InvalidReply          a reply breaks the contract (checked on the receiving side)

Every class has a `code` (a short stable string) so that a transport can send
``(code, message, reason)`` and the other side rebuild the same class with `error_from_code`.
Messages never contain prompt text or key material.
"""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

from tether.errors import TetherError

EvictionReason = Literal["memory", "idle", "shutdown"]
"""Why a session was evicted: LRU under the KV memory budget, idle timeout, or server shutdown."""

EVICTION_REASONS: tuple[str, ...] = get_args(EvictionReason)


class CloudError(TetherError):
    """Root of the errors a cloud session raises."""

    code: ClassVar[str] = "cloud_error"


class InvalidRequest(CloudError):
    """The request is malformed or not allowed in the session's current state; no state changed."""

    code = "invalid_request"


class InvalidSampling(InvalidRequest, ValueError):
    """A sampling setting (temperature, top_k, top_p) is out of range; the message names it.

    It is a `ValueError` too, so the edge's argument checks and the session contract raise
    the same error for the same rule (`tether.contract.validate_sampling`).
    """


class UnsupportedOperation(CloudError):
    """The backend behind this session cannot perform the operation (see `Capabilities`)."""

    code = "unsupported"


class SessionLimitExceeded(CloudError):
    """A per-session limit would be exceeded; no state changed.

    Attributes:
        limit_name: which limit (``"max_tokens"``, ``"max_pending"``, ``"max_draft"``, ...).
        value: the size that was asked for.
        limit: the configured maximum.
    """

    code = "limit_exceeded"

    def __init__(self, message: str, *, limit_name: str = "", value: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.limit_name = limit_name
        self.value = value
        self.limit = limit


class SessionNotOpen(CloudError):
    """The session has not been opened, or was closed."""

    code = "not_open"


class SessionEvicted(CloudError):
    """The server dropped this session's KV state; open a new session and re-prefill.

    Attributes:
        reason: ``"memory"`` (least recently used under the KV memory budget),
            ``"idle"`` (idle timeout) or ``"shutdown"`` (server stopping). Transports carry
            it as its own field, never inside the message text.
    """

    code = "evicted"

    def __init__(self, message: str, *, reason: EvictionReason = "memory") -> None:
        if reason not in EVICTION_REASONS:
            raise ValueError(f"SessionEvicted.reason must be one of {EVICTION_REASONS}, got {reason!r}")
        super().__init__(message)
        self.reason: EvictionReason = reason


class ServerOverloaded(CloudError):
    """The server is at its session or request capacity; retry later."""

    code = "overloaded"


class BackendError(CloudError):
    """The engine behind the session failed or replied with something unusable."""

    code = "backend_error"


class InvalidReply(BackendError):
    """The cloud's reply breaks the contract (e.g. more accepted tokens than were drafted, a
    token id outside the vocabulary); the session can no longer be trusted: open a new one."""


_BY_CODE: dict[str, type[CloudError]] = {
    cls.code: cls
    for cls in (
        CloudError,
        InvalidRequest,
        UnsupportedOperation,
        SessionLimitExceeded,
        SessionNotOpen,
        SessionEvicted,
        ServerOverloaded,
        BackendError,
    )
}


def error_from_code(code: str, message: str, *, reason: str | None = None) -> CloudError:
    """Rebuild the error class named by `code` (unknown codes give a plain `CloudError`).

    Args:
        code: a `CloudError.code`.
        message: the error's message, used as is.
        reason: for ``"evicted"``, the eviction reason field the transport carried (an
            unknown or missing reason gives ``"memory"``, the budget eviction).
    Returns:
        The rebuilt error (not raised).
    """
    cls = _BY_CODE.get(code, CloudError)
    if cls is SessionEvicted:
        known: EvictionReason = reason if reason in EVICTION_REASONS else "memory"  # type: ignore[assignment]
        return SessionEvicted(message, reason=known)
    return cls(message)
