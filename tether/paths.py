"""Where Tether keeps files it creates: converted weights, ONNX builds, keys.

`TETHER_CACHE` wins; otherwise `$XDG_CACHE_HOME/tether`, otherwise `~/.cache/tether`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Return the cache root, creating it if needed."""
    explicit = os.environ.get("TETHER_CACHE")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tether"
    root.mkdir(parents=True, exist_ok=True)
    return root
