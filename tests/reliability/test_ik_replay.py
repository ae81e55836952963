"""A passive observer replays a captured IK message 1 against a real `CloudServer` (issue 17,
item 1): no replay is admitted, counted or logged as a client; the real client is served."""

from __future__ import annotations

import asyncio
import logging

from websockets.asyncio.client import connect as ws_connect

from benchmarks.hostile import HostileClient
from tests.protocol.protocolkit import replay
from tether.protocol import (
    ClientProtocol,
    CloseCode,
    ErrorReply,
    OpenSession,
    SessionOpened,
    TooManyConnections,
    connect,
)

MODEL = "tiny-cloud"
REPLAYS = 5


async def test_replayed_ik_first_message_is_never_admitted(cloud_server, server_keys, client_keys,  # type: ignore[no-untyped-def]
                                                           caplog) -> None:
    caplog.set_level(logging.INFO)
    server = await cloud_server(allowlist=[client_keys.public], max_connections_per_client=2)
    # The victim's first message, exactly as it crosses the network (what an observer captures).
    victim = ClientProtocol(client_keys, server_keys.public, pattern="IK")
    (captured,) = victim.data_to_send()
    ws = await ws_connect(server.url, compression=None, proxy=None, ping_interval=None, max_size=None)
    await ws.send(captured)
    while victim.state.name == "HANDSHAKE":
        victim.receive_data(await ws.recv())
        for record in victim.data_to_send():  # the Hello, after message 2
            await ws.send(bytes(record))
    real = HostileClient(ws, victim)
    # The replays, one socket each, while the victim's connection is up.
    outcomes = await asyncio.gather(*(replay(server.url, captured) for _ in range(REPLAYS)))
    assert outcomes == [(0, CloseCode.HANDSHAKE_REPLAYED)] * REPLAYS  # refused before any answer
    # The real client is served, and the replays took none of its 2 connection slots.
    opened = await real.request(OpenSession(model=MODEL))
    assert isinstance(opened, SessionOpened), opened
    async with await connect(server.url, client_keys, server_public_key=server_keys.public) as second:
        assert isinstance(await second.request(OpenSession(model=MODEL)), SessionOpened)
        try:
            await connect(server.url, client_keys, server_public_key=server_keys.public)
            raise AssertionError("a third connection was admitted")
        except TooManyConnections:
            pass  # the limit counts the two live connections only
    assert not isinstance(await real.request(OpenSession(model=MODEL)), ErrorReply)
    await real.aclose()
    messages = [r.getMessage() for r in caplog.records]
    refusals = [m for m in messages if "closing with HANDSHAKE_REPLAYED (4004)" in m]
    assert len(refusals) == REPLAYS, refusals
    assert all(client_keys.public.fingerprint in m for m in refusals)
    assert messages.count("client connected") == 2  # the victim's connection and the second one
