"""Structural invariants of tether.protocol."""

from __future__ import annotations

import re
from pathlib import Path

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol"


def test_only_the_websocket_shim_imports_websockets() -> None:
    importers = sorted(
        p.name for p in PROTOCOL.glob("*.py") if re.search(r"^\s*(from|import) websockets", p.read_text(), re.M)
    )
    assert importers == ["_ws.py"]


def test_the_core_never_awaits() -> None:
    """The sans-I/O modules have no async code (bytes in, events out)."""
    for name in ("_noise.py", "_cipher.py", "_handshake.py", "_transport.py", "_frames.py", "_session.py",
                 "_messages.py", "_schema.py", "_metadata.py", "_tensors.py", "_keys.py", "_link.py"):
        text = (PROTOCOL / name).read_text()
        assert not re.search(r"\b(async def|await|import asyncio)\b", text), name
