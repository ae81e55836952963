"""Errors the edge SDK raises.

Hierarchy (under `tether.TetherError`)::

    EdgeError                  root of the edge SDK's errors
    ├── CloudUnavailableError  the cloud could not be reached or stopped answering, and the
    │                          client's policy is ``on_disconnect="raise"`` (the default,
    │                          ``"degrade"``, finishes on the edge instead); `cause` holds the
    │                          underlying error
    └── ContextLengthExceeded  the prompt is longer than the context it must fit (the cloud
                               session's ``max_tokens`` or the edge model's positions); raised
                               before anything is computed; `prompt_tokens`, `limit`, `where`

A generation that *reaches* a context limit is not an error: it ends with
``finish_reason="length"``.

Misuse (a bad argument or mode) raises `tether.errors.ConfigurationError` or `ValueError`
before anything runs. Errors of the cloud session API (`tether.cloud.CloudError`) that mean
the request itself was wrong (`InvalidRequest`, `UnsupportedOperation`) propagate as they are.
"""

from __future__ import annotations

from tether.errors import TetherError


class EdgeError(TetherError):
    """Root of the edge SDK's errors."""


class CloudUnavailableError(EdgeError):
    """The cloud is unreachable and the policy says to raise rather than degrade.

    Attributes:
        cause: the error that took the link down (a timeout, a closed connection, ...).
    """

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class ContextLengthExceeded(EdgeError):
    """The prompt does not fit the context it must be processed in; nothing was computed.

    Shorten the prompt (or the conversation), or raise the server's ``max_tokens``.

    Attributes:
        prompt_tokens: the prompt's length in tokens.
        limit: the most tokens that context holds.
        where: whose limit it is: ``"cloud session"`` (the session's ``max_tokens``) or
            ``"edge model"`` (the edge model's positions).
    """

    def __init__(self, *, prompt_tokens: int, limit: int, where: str) -> None:
        super().__init__(
            f"the prompt has {prompt_tokens} tokens but the {where} holds at most {limit}; "
            "shorten the prompt or the conversation"
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit
        self.where = where
