"""Public calls raise only the library's typed errors (issue 17, item 4).

`connect()` raises TooManyConnections itself (the refusal comes before the Welcome), and a
connection whose link dropped raises PeerClosed from `ping()`, `request()` and `stream()`:
never a websockets exception, and no future is left with an unretrieved exception.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from typing import Any

import pytest

from protocolkit import echo_handler
from tether.protocol import (
    AdmissionLimits,
    Appended,
    AppendTokens,
    ChannelError,
    CloseCode,
    Generate,
    KeyPair,
    PeerClosed,
    TooManyConnections,
    connect,
)

TOKENS = AppendTokens(session_id="s", tokens=[1, 2, 3])


@pytest.mark.parametrize("pattern", ["IK", "XX"])
async def test_connect_raises_too_many_connections(live_server: Any, server_keys: KeyPair, client_keys: KeyPair,
                                                   pattern: str) -> None:
    server = await live_server(echo_handler, allowlist=None, admission=AdmissionLimits(max_connections_per_client=2))
    held = [await connect(server.url, client_keys, server_public_key=server_keys.public, pattern=pattern)
            for _ in range(2)]
    expected = f"client key {re.escape(client_keys.public.fingerprint)} already holds.*max_connections_per_client"
    with pytest.raises(TooManyConnections, match=expected) as refused:
        await connect(server.url, client_keys, server_public_key=server_keys.public, pattern=pattern)
    assert refused.value.close_code == CloseCode.TOO_MANY_CONNECTIONS == 4060
    assert server.busy == 1
    # The held connections are untouched, another key is admitted, and a freed slot is reusable.
    for conn in held:
        assert await conn.request(TOKENS) == Appended(session_id="s", length=3)
    async with await connect(server.url, KeyPair.generate(), server_public_key=server_keys.public,
                             pattern=pattern) as other:
        assert await other.request(TOKENS) == Appended(session_id="s", length=3)
    await held.pop().close()
    await asyncio.sleep(0.05)
    async with await connect(server.url, client_keys, server_public_key=server_keys.public,
                             pattern=pattern) as again:
        assert await again.request(TOKENS) == Appended(session_id="s", length=3)
    await held[0].close()


def _never_retrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()
    return [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_calls_on_a_dropped_link_raise_peer_closed(live_server: Any, server_keys: KeyPair,
                                                         client_keys: KeyPair,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    server = await live_server(echo_handler)
    conn = await connect(server.url, client_keys, server_public_key=server_keys.public)
    assert await conn.ping() >= 0.0
    conn._driver.ws.transport.abort()  # the TCP connection drops under the client, unread
    with pytest.raises(PeerClosed) as dropped:
        await conn.ping()
    assert dropped.value.code == CloseCode.ABNORMAL and not dropped.value.clean
    with pytest.raises(PeerClosed):
        await conn.ping()
    with pytest.raises(PeerClosed):
        await conn.request(TOKENS)
    with pytest.raises(PeerClosed):
        async for _ in conn.stream(Generate(session_id="s", max_new_tokens=2)):
            pass
    await conn.close()  # closing a dead connection is not an error
    await asyncio.sleep(0.05)
    assert _never_retrieved(caplog) == []


async def test_ping_racing_a_server_close_raises_peer_closed(live_server: Any, server_keys: KeyPair,
                                                             client_keys: KeyPair,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    server = await live_server(echo_handler)
    conns = [await connect(server.url, client_keys, server_public_key=server_keys.public) for _ in range(5)]
    closing = asyncio.ensure_future(server.close(grace=0.0))
    outcomes = await asyncio.gather(*(c.ping(timeout=5) for c in conns for _ in range(4)), return_exceptions=True)
    await closing
    for outcome in outcomes:
        assert isinstance(outcome, float) or isinstance(outcome, ChannelError), repr(outcome)
    for conn in conns:
        with pytest.raises(PeerClosed) as closed:
            await conn.ping()
        assert closed.value.code == CloseCode.GOING_AWAY and closed.value.clean
    await asyncio.sleep(0.05)
    assert _never_retrieved(caplog) == []
