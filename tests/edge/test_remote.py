"""`EdgeClient.connect` against a real `CloudServer` on loopback (tiny model, encrypted protocol)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tether.edge import EdgeClient, Origin
from tether.protocol import KeyPair


@pytest.fixture
async def server(tiny_cloud_hf) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager
    from tether.cloud._server import CloudServer
    from tether.runtime import TorchCausalLM

    manager = SessionManager(TorchCausalLM(tiny_cloud_hf, name="tiny-cloud"), config=CloudConfig(batch_window_s=0.0))
    srv = CloudServer(manager, keys=KeyPair.generate())
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close(grace=1.0)


async def test_connect_speculative_equals_cloud_over_the_protocol(server, edge_model) -> None:  # type: ignore[no-untyped-def]
    client = await EdgeClient.connect(server.url, server_key=server.keys.public.to_text(), edge_model=edge_model)
    async with client:
        cloud = await client.generate("remote hello", mode="cloud", max_new_tokens=20)
        spec = await client.generate("remote hello", mode="speculative", max_new_tokens=20)
        assert spec.token_ids == cloud.token_ids and len(spec.token_ids) == 20
        assert Origin.EDGE_ACCEPTED in spec.origins
        s = spec.stats
        assert not s.degraded and s.bytes_up > 0 and s.bytes_down > 0 and s.rtt_s is not None
        # The server's cost fields reach the stats over the wire (the SDK announces "cost").
        assert s.cloud_forward_passes == s.rounds and s.cloud_compute_s > 0.0
        sampled = await client.generate("remote hello", max_new_tokens=10, temperature=0.8, seed=1)
        assert len(sampled.token_ids) == 10 and not sampled.stats.degraded


async def test_connect_with_wrong_key_fails_fast(server, edge_model) -> None:  # type: ignore[no-untyped-def]
    from tether.errors import TetherError

    with pytest.raises(TetherError):
        await EdgeClient.connect(server.url, server_key=KeyPair.generate().public.to_text(), edge_model=edge_model)


async def test_sync_client_connect(server, edge_model) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from tether.edge import Client

    def run() -> list[int]:
        with Client.connect(server.url, server_key=server.keys.public.to_text(), edge_model=edge_model) as client:
            return client.generate("remote hello", mode="cloud", max_new_tokens=5).token_ids

    # The blocking client runs its own loop thread; keep this test's loop free to serve it.
    assert len(await asyncio.to_thread(run)) == 5
