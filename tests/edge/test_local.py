"""`EdgeClient.local()`: a real `CloudServer` on loopback, reached over the encrypted protocol."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tether.compose import LoopbackCloud
from tether.edge import Client, EdgeClient, LazyCloud, Origin
from tether.errors import TetherError


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.test_chat_cli import save_tiny_pair

    return save_tiny_pair(tmp_path_factory.mktemp("local-pair"))


async def test_local_serves_on_loopback_and_reports_wire_costs(pair: tuple[Path, Path]) -> None:
    edge_dir, cloud_dir = pair
    client = EdgeClient.local(str(edge_dir), str(cloud_dir))
    assert isinstance(client.cloud, LazyCloud) and not client.cloud.started  # nothing loaded yet
    try:
        cloud = await client.generate("hello there", mode="cloud", max_new_tokens=12)
        spec = await client.generate("hello there", mode="speculative", max_new_tokens=12)
        loopback = await client.cloud.get()
        assert isinstance(loopback, LoopbackCloud)
        assert loopback.server.url.startswith("ws://127.0.0.1:") and loopback.server.connections == 1
        assert spec.token_ids == cloud.token_ids and len(spec.token_ids) == 12
        s = spec.stats
        assert Origin.EDGE_ACCEPTED in spec.origins and not s.degraded
        # The cost fields came over the wire: one forward pass per verify round, timed.
        assert s.cloud_forward_passes == s.rounds > 0 and s.cloud_compute_s > 0.0
        # Real bytes of the connection: every round sends a frame and gets one back.
        assert s.bytes_up > 50 * s.rounds and s.bytes_down > 50 * s.rounds
        assert cloud.stats.cloud_compute_s > 0.0 and cloud.stats.cloud_forward_passes == 12
    finally:
        await client.aclose()
    thread = loopback._thread.thread
    assert not thread.is_alive() and not loopback.server.ready
    assert loopback.remote.connection.closed


def test_sync_local_closes_its_server(pair: tuple[Path, Path]) -> None:
    edge_dir, cloud_dir = pair
    with Client.local(str(edge_dir), str(cloud_dir), lazy=False) as client:
        loopback = client._call(client.aclient.cloud.get())  # type: ignore[union-attr]
        assert len(client.generate("hi", max_new_tokens=5).token_ids) == 5
    assert not loopback._thread.thread.is_alive()


async def test_edge_mode_never_starts_the_cloud(pair: tuple[Path, Path]) -> None:
    edge_dir, cloud_dir = pair
    async with EdgeClient.local(str(edge_dir), str(cloud_dir)) as client:
        await client.generate("hi", mode="edge", max_new_tokens=3)
        assert isinstance(client.cloud, LazyCloud) and not client.cloud.started


async def test_cost_fields_only_for_clients_that_ask(pair: tuple[Path, Path]) -> None:
    """An old client (no "cost" capability) gets replies without the fields it would reject."""
    from tether.protocol import AppendTokens, KeyPair, OpenSession, VerifyDraft, connect

    _, cloud_dir = pair
    from tether.edge._client import _load_cloud

    loopback = await LoopbackCloud.start(lambda: _load_cloud(str(cloud_dir)))
    try:
        server = loopback.server
        # Only the connector's own client key is admitted: other local processes are refused.
        with pytest.raises(TetherError):
            await connect(server.url, KeyPair.generate(), server_public_key=server.keys.public)
        own_keys = loopback.remote._kwargs["client_keys"]
        for caps, expect in (((), False), (("cost",), True)):
            conn = await connect(server.url, own_keys, server_public_key=server.keys.public, capabilities=caps)
            try:
                opened = await conn.request(OpenSession(model=server.manager.model_name))
                await conn.request(AppendTokens(session_id=opened.session_id, tokens=np.arange(5, 9)))
                reply = await conn.request(VerifyDraft(session_id=opened.session_id, tokens=np.arange(9, 12)))
                assert (reply.compute_s is not None) is expect
                assert (reply.forward_passes == 1) if expect else reply.forward_passes is None
            finally:
                await conn.close()
    finally:
        await asyncio.wait_for(loopback.aclose(), 30)


async def test_chat_json_mode_crosses_the_wire(pair: tuple[Path, Path]) -> None:
    """Minions' JSON-constrained chat works through local() as it did in-process."""
    import json

    from tether.edge._client import _load_cloud

    _, cloud_dir = pair
    loopback = await LoopbackCloud.start(lambda: _load_cloud(str(cloud_dir)))
    try:
        s = await loopback.new_session()
        info = await s.open()
        assert info.capabilities.json_mode
        res = await s.chat([{"role": "user", "content": "answer in JSON"}], max_tokens=40, json_mode=True)
        assert isinstance(json.loads(res.text), dict), res.text
        await s.close()
    finally:
        await asyncio.wait_for(loopback.aclose(), 30)
