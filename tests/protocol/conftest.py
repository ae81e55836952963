"""Shared fixtures for the protocol tests: keys, an in-memory client-server pair, live servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from protocolkit import Pair, echo_handler, make_pair
from tether.protocol import KeyPair, ServerConnection, serve


@pytest.fixture
def pair(server_keys: KeyPair, client_keys: KeyPair) -> Pair:
    return make_pair(server_keys, client_keys)


Handler = Callable[[ServerConnection], Awaitable[None]]


@pytest.fixture
async def live_server(server_keys: KeyPair, client_keys: KeyPair) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Start servers on 127.0.0.1 (port 0) for the test; all are closed afterwards."""
    servers = []

    async def start(handler: Handler | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("server_keys", server_keys)
        kwargs.setdefault("allowlist", [client_keys.public])
        server = await serve(handler or echo_handler, "127.0.0.1", 0, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await asyncio.wait_for(server.close(grace=1.0), 10)
