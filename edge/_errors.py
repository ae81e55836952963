"""Errors the edge SDK raises.

Hierarchy (under `tether.TetherError`)::

    EdgeError                  root of the edge SDK's errors
    └── CloudUnavailableError  the cloud could not be reached or stopped answering, and the
                               client's policy is ``on_disconnect="raise"`` (the default,
                               ``"degrade"``, finishes on the edge instead); `cause` holds the
                               underlying error

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
