"""Helpers for the protocol tests: an in-memory client-server pair, a fake clock, a raw client.

(A uniquely named module rather than conftest.py: conftest module names collide across test folders.)
"""

from __future__ import annotations

import asyncio
from typing import Any

from tether.protocol import Allowlist, ClientProtocol, KeyPair, ServerConnection, ServerProtocol
from tether.protocol._session import Event


class Pair:
    """A sans-I/O client and server wired back to back in memory (h11's ConnectionPair)."""

    def __init__(self, client: ClientProtocol, server: ServerProtocol) -> None:
        self.client = client
        self.server = server
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []

    def pump(self) -> None:
        """Deliver queued records both ways until both sides are quiet."""
        moved = True
        while moved:
            moved = False
            for record in self.client.data_to_send():
                self.server_events += self.server.receive_data(record)
                moved = True
            for record in self.server.data_to_send():
                self.client_events += self.client.receive_data(record)
                moved = True

    def take(self) -> tuple[list[Event], list[Event]]:
        out = (self.client_events, self.server_events)
        self.client_events, self.server_events = [], []
        return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pair(
    server_keys: KeyPair,
    client_keys: KeyPair,
    *,
    pattern: str = "IK",
    client_kwargs: dict[str, Any] | None = None,
    server_kwargs: dict[str, Any] | None = None,
    pump: bool = True,
) -> Pair:
    server = ServerProtocol(server_keys, allowlist=Allowlist([client_keys.public]), **(server_kwargs or {}))
    client = ClientProtocol(client_keys, server_keys.public, pattern=pattern, **(client_kwargs or {}))
    pair = Pair(client, server)
    if pump:
        pair.pump()
    return pair


async def echo_handler(conn: ServerConnection) -> None:
    """Answers AppendTokens with Appended(length=len(tokens)); everything else UNSUPPORTED."""
    from tether.protocol import Appended, AppendTokens, ErrorCode, RequestFailed

    async def on_request(request: Any) -> Any:
        message = request.message
        if isinstance(message, AppendTokens):
            return Appended(session_id=message.session_id, length=int(message.tokens.shape[0]))
        raise RequestFailed(ErrorCode.UNSUPPORTED, "not supported by the echo handler")

    await conn.serve_requests(on_request)


class RawClient:
    """A client that completes a real handshake, then sends whatever records a test builds."""

    def __init__(self, ws: Any, protocol: ClientProtocol) -> None:
        self.ws = ws
        self.protocol = protocol
        self.next_request_id = 1

    @classmethod
    async def open(cls, url: str, keys: KeyPair, server_key: Any, *, pattern: str = "IK", **kwargs: Any) -> RawClient:
        from benchmarks.hostile import open_handshaken

        return cls(*await open_handshaken(url, keys, server_key, pattern=pattern, **kwargs))

    def seal(self, message: Any, *, request_id: int | None = None, flags: int = 0) -> bytearray:
        """One record (not sent) carrying `message`; request ids increase by default."""
        from tether.protocol._frames import encode_frame

        if request_id is None:
            request_id = self.next_request_id
            self.next_request_id += 1
        assert self.protocol.transport is not None
        (record,) = self.protocol.transport.seal(encode_frame(message, request_id=request_id, flags=flags))
        return record

    def seal_plaintext(self, plaintext: bytes) -> bytearray:
        assert self.protocol.transport is not None
        return self.protocol.transport.seal_plaintext(plaintext)

    async def send(self, *records: bytes | bytearray) -> None:
        for record in records:
            await self.ws.send(bytes(record))

    async def close_code(self, timeout: float = 5.0) -> int:
        """Read until the server closes; returns the close code it sent."""
        from websockets.exceptions import ConnectionClosed

        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "closed without a close frame"
            return int(exc.rcvd.code)


async def replay(url: str, message: bytes) -> tuple[int, int]:
    """Send captured handshake bytes on a fresh socket: (messages the server answered, its close code)."""
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed

    answered = 0
    async with ws_connect(url, compression=None, proxy=None, ping_interval=None) as ws:
        await ws.send(message)
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
                answered += 1
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "closed without a close frame"
            return answered, exc.rcvd.code
    raise AssertionError("unreachable")
