"""Tether: edge-cloud collaborative LLM inference.

The `tether` namespace gathers four parts that the repository keeps in their own
folders: `tether.edge` (the SDK on the device), `tether.cloud` (the service),
`tether.protocol` (the encrypted wire protocol) and `tether.routing` (routers).
Code they share lives here: the model runtime (`tether.runtime`), the model
registry (`tether.models`), errors, paths and the `tether` command line.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from tether.errors import TetherError

try:
    __version__ = _version("tether")
except _PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["TetherError", "__version__"]
