"""Errors a cloud session can raise, shared by every backend and carried over the wire.

Hierarchy (all under `tether.TetherError`)::

    CloudError                    root of the cloud service's errors; `code` is its stable wire name
    ├── InvalidRequest            the caller misused the API (bad draft probabilities, rollback past
    │                             the end, unknown model, wrong session mode); nothing changed
    ├── UnsupportedOperation      this backend cannot do the operation (see `Capabilities`)
    ├── SessionLimitExceeded      a per-session limit (max tokens, max pending requests, max draft)
    │                             would be exceeded; carries `limit_name`, `value`, `limit`
    ├── SessionNotOpen            the session was never opened or is already closed
    ├── SessionEvicted            the server dropped the session's state (memory budget, idle
    │                             timeout, shutdown); `reason` says which; open a new session and
    │                             re-prefill to continue
    ├── ServerOverloaded          too many sessions or requests server-wide; retry later
    └── BackendError              the engine behind the session failed (HTTP engine down, bad reply)

Every class has a `code` (a short stable string) so that a transport can send
``(code, message)`` and the other side rebuild the same class with `error_from_code`.
Messages never contain prompt text or key material.
"""

from __future__ import annotations

from typing import ClassVar

from tether.errors import TetherError


class CloudError(TetherError):
    """Root of the errors a cloud session raises."""

    code: ClassVar[str] = "cloud_error"


class InvalidRequest(CloudError):
    """The request is malformed or not allowed in the session's current state; no state changed."""

    code = "invalid_request"


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
            ``"idle"`` (idle timeout) or ``"shutdown"`` (server stopping).
    """

    code = "evicted"

    def __init__(self, message: str, *, reason: str = "memory") -> None:
        super().__init__(message)
        self.reason = reason


class ServerOverloaded(CloudError):
    """The server is at its session or request capacity; retry later."""

    code = "overloaded"


class BackendError(CloudError):
    """The engine behind the session failed or replied with something unusable."""

    code = "backend_error"


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


def error_from_code(code: str, message: str) -> CloudError:
    """Rebuild the error class named by `code` (unknown codes give a plain `CloudError`)."""
    cls = _BY_CODE.get(code, CloudError)
    if cls is SessionEvicted:
        reason = "memory"
        for r in ("idle", "shutdown", "memory"):
            if f"({r})" in message:
                reason = r
                break
        return SessionEvicted(message, reason=reason)
    return cls(message)
