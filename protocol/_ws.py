"""The websocket layer: the only module that imports `websockets`.

What belongs here: opening client websockets, starting websocket servers, and reading
close codes, with the settings the protocol needs (binary messages, no compression, no
websocket-level pings, no software banners). Everything else goes through these names.
"""

from __future__ import annotations

import ssl as ssl_module
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as _ws_connect
from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as _ws_serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from tether.protocol._errors import CloseCode

__all__ = [
    "FRAGMENT_BYTES",
    "HANDSHAKE_MAX",
    "ClientConnection",
    "ConnectionClosed",
    "InvalidHandshake",
    "InvalidURI",
    "ServerConnection",
    "WebSocket",
    "WebSocketServer",
    "close_info",
    "fragments",
    "open_websocket",
    "raise_message_limit",
    "serve_websockets",
]

HANDSHAKE_MAX = 65535 + 64  # unauthenticated peers: one Noise message (+ preamble) at most
WebSocket = ClientConnection | ServerConnection
# Messages larger than this are sent as websocket fragments of this size. Measured on
# loopback (docs/benchmarks.md): a 1 MiB frame makes the websockets client allocate, mask and
# copy 1 MiB buffers that glibc often maps fresh (about 480 page faults per message); 64 KiB
# fragments stay under malloc's mmap threshold and in cache, and the receiver's message
# limit still counts the whole message.
FRAGMENT_BYTES = 64 * 1024


def fragments(data: bytes | bytearray) -> Iterator[memoryview]:
    """`data` in FRAGMENT_BYTES pieces, for ``ws.send(fragments(data))`` (one message)."""
    view = memoryview(data)
    return (view[start : start + FRAGMENT_BYTES] for start in range(0, len(view), FRAGMENT_BYTES))


async def open_websocket(
    url: str, *, ssl: ssl_module.SSLContext | None, proxy: str | None, max_size: int = HANDSHAKE_MAX
) -> ClientConnection:
    """A client websocket to `url` (TLS for wss://), capped at `max_size` per message."""
    kwargs: dict[str, Any] = {}
    if ssl is not None:
        kwargs["ssl"] = ssl
    return await _ws_connect(
        url,
        compression=None,  # compressing before encrypting would leak plaintext through sizes
        max_size=max_size,
        ping_interval=None,  # keepalive is done inside the encrypted channel
        ping_timeout=None,
        open_timeout=None,  # the caller bounds the whole connect
        close_timeout=5,
        user_agent_header=None,
        proxy=proxy,
        **kwargs,
    )


async def serve_websockets(
    handler: Callable[[ServerConnection], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl: ssl_module.SSLContext | None,
    open_timeout: float,
    max_size: int = HANDSHAKE_MAX,
) -> WebSocketServer:
    """A listening websocket server calling `handler` per connection."""
    kwargs: dict[str, Any] = {}
    if ssl is not None:
        kwargs["ssl"] = ssl
    return await _ws_serve(
        handler,
        host,
        port,
        compression=None,
        max_size=max_size,
        ping_interval=None,
        ping_timeout=None,
        close_timeout=5,
        open_timeout=open_timeout,
        server_header=None,
        **kwargs,
    )


def raise_message_limit(ws: WebSocket, size: int) -> None:
    """Change the per-message size cap of an open websocket (after authentication)."""
    protocol = ws.protocol
    if hasattr(protocol, "max_message_size"):
        protocol.max_message_size = size


def close_info(exc: ConnectionClosed) -> tuple[int, str]:
    """(code, reason) the peer closed with; 1006 when no close frame arrived."""
    frame = exc.rcvd
    if frame is None:
        return int(CloseCode.ABNORMAL), ""
    return int(frame.code), frame.reason
