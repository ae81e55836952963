"""Faults: a killed server, a slow, lossy or stalled link, a client that stops reading, a
half-open connection. Every generation returns its full requested output (or a clear error)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudkit import build_byte_tokenizer, build_tiny_byte_model
from faultproxy import FaultProxy
from benchmarks.hostile import HostileClient
from tether.edge import EdgeClient, Origin, ResilienceOptions
from tether.protocol import KeyPair, LinkEmulator, OpenSession, ScoreTokens, connect
from tether.protocol._frames import encode_frame

PROMPT = "a reliable answer, please"
N = 40
FAST_RETRY = ResilienceOptions(backoff_initial=0.02, backoff_max=0.1, request_timeout=10.0, connect_timeout=5.0)


async def generate(client: EdgeClient, *, mode: str = "speculative", n: int = N,
                   on_token: Callable[[Any], Awaitable[None]] | None = None) -> Any:
    gen = client.stream(PROMPT, mode=mode, max_new_tokens=n, chat_template=False)
    async for tok in gen:
        if on_token is not None:
            await on_token(tok)
    return gen.result


async def reference(url: str, server_keys: KeyPair, edge: Any, n: int = N) -> list[int]:
    """The cloud model's own greedy output over a clean link (cloud-only mode)."""
    async with await EdgeClient.connect(url, server_key=server_keys.public.to_text(), edge_model=edge) as client:
        r = await generate(client, mode="cloud", n=n)
    assert not r.stats.degraded
    return list(r.token_ids)


def assert_complete(r: Any, n: int = N) -> None:
    assert len(r.token_ids) == n or r.finish_reason == "stop", (len(r.token_ids), r.finish_reason)
    assert r.finish_reason in ("length", "stop")


# -- a slow, lossy, stalled link -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["speculative", "cloud"])
async def test_delay_jitter_and_loss_change_nothing_but_time(cloud_server, server_keys, edge, mode) -> None:  # type: ignore[no-untyped-def]
    server = await cloud_server()
    want = await reference(server.url, server_keys, edge)
    proxy = await FaultProxy(server.port, delay=0.01, jitter=0.01, loss=0.1, rto=0.05, seed=3).start()
    try:
        async with await EdgeClient.connect(proxy.url, server_key=server_keys.public.to_text(), edge_model=edge,
                                            resilience=FAST_RETRY) as client:
            r = await generate(client, mode=mode)
    finally:
        await proxy.aclose()
    assert proxy.chunks_delayed_by_loss > 0
    assert list(r.token_ids) == want and not r.stats.degraded
    assert_complete(r)


async def test_protocol_link_emulator_delay_and_jitter(cloud_server, server_keys, edge) -> None:  # type: ignore[no-untyped-def]
    server = await cloud_server()
    want = await reference(server.url, server_keys, edge)
    link = LinkEmulator.symmetric(delay=0.015, jitter=0.01, bandwidth=2e6, seed=1)
    async with await EdgeClient.connect(server.url, server_key=server_keys.public.to_text(), edge_model=edge,
                                        link=link) as client:
        r = await generate(client)
    assert list(r.token_ids) == want and not r.stats.degraded


async def test_short_stall_is_waited_out(cloud_server, server_keys, edge) -> None:  # type: ignore[no-untyped-def]
    server = await cloud_server()
    want = await reference(server.url, server_keys, edge)
    proxy = await FaultProxy(server.port).start()

    async def stall_once(tok: Any) -> None:
        if tok.index == 5:
            proxy.stall(0.5)  # much shorter than the request timeout

    try:
        async with await EdgeClient.connect(proxy.url, server_key=server_keys.public.to_text(), edge_model=edge,
                                            resilience=FAST_RETRY) as client:
            r = await generate(client, on_token=stall_once)
    finally:
        await proxy.aclose()
    assert list(r.token_ids) == want and not r.stats.degraded


async def test_long_stall_degrades_then_resumes(cloud_server, server_keys, edge) -> None:  # type: ignore[no-untyped-def]
    server = await cloud_server()
    proxy = await FaultProxy(server.port).start()
    options = ResilienceOptions(backoff_initial=0.02, backoff_max=0.1, request_timeout=0.3, connect_timeout=1.0)
    seen_edge_only = 0

    async def stall_then_wait(tok: Any) -> None:
        nonlocal seen_edge_only
        if tok.index == 5:
            proxy.stall()
        if tok.origin is Origin.EDGE_ONLY:
            seen_edge_only += 1
            if seen_edge_only == 3:  # the edge carried on alone; now the link comes back
                proxy.resume()
                await asyncio.sleep(1.0)  # the background reconnect finds the server

    try:
        async with await EdgeClient.connect(proxy.url, server_key=server_keys.public.to_text(), edge_model=edge,
                                            resilience=options) as client:
            r = await generate(client, on_token=stall_then_wait)
    finally:
        await proxy.aclose()
    assert_complete(r)
    assert r.stats.degraded and r.stats.reconnects >= 1
    last_edge = max(i for i, o in enumerate(r.origins) if o is Origin.EDGE_ONLY)
    assert last_edge < len(r.origins) - 1, "the cloud never took over again"


# -- the server is killed mid-generation -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _start_serve(model_dir: Path, keys_dir: Path, port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from tether.cli import main; main()", "serve", "--model", str(model_dir),
        "--keys", str(keys_dir), "--port", str(port), "--http-port", "-1", "--threads", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        if not line:
            raise AssertionError("tether serve exited before listening")
        if re.search(r"listening\s+ws://", line):
            return proc


@pytest.mark.slow
async def test_server_killed_mid_generation_edge_finishes_then_resumes(tmp_path: Path, edge, cloud_hf) -> None:  # type: ignore[no-untyped-def]
    model_dir = tmp_path / "model"
    cloud_hf.save_pretrained(model_dir)
    build_byte_tokenizer().save_pretrained(model_dir)
    keys = KeyPair.generate()
    keys.save(tmp_path / "keys")
    port = _free_port()
    url = f"ws://127.0.0.1:{port}"
    proc = await _start_serve(model_dir, tmp_path / "keys", port)
    restarted: list[asyncio.subprocess.Process] = []
    edge_only = 0

    async def kill_then_restart(tok: Any) -> None:
        nonlocal edge_only
        if tok.index == 6:
            proc.send_signal(signal.SIGKILL)  # no drain, no goodbye: the process is gone
            await proc.wait()
        if tok.origin is Origin.EDGE_ONLY:
            edge_only += 1
            if edge_only == 4:  # the edge has carried on alone; bring the server back
                restarted.append(await _start_serve(model_dir, tmp_path / "keys", port))
                await asyncio.sleep(0.5)

    try:
        async with await EdgeClient.connect(url, server_key=keys.public.to_text(), edge_model=edge,
                                            resilience=FAST_RETRY) as client:
            r = await generate(client, n=N, on_token=kill_then_restart)
            want = await generate(client, mode="cloud", n=N)  # same prompt, fresh server: the reference
    finally:
        for p in (proc, *restarted):
            if p.returncode is None:
                p.send_signal(signal.SIGKILL)
                await p.wait()
    assert len(r.token_ids) == N and r.finish_reason == "length"
    assert r.stats.degraded and r.stats.link_failures >= 1 and r.stats.reconnects >= 1
    first_edge = r.origins.index(Origin.EDGE_ONLY)
    last_edge = max(i for i, o in enumerate(r.origins) if o is Origin.EDGE_ONLY)
    assert first_edge >= 6 and last_edge < N - 1, "verification never resumed after the restart"
    assert list(r.token_ids[:first_edge]) == list(want.token_ids[:first_edge])  # the cloud's own, before the kill
    # After the restart the new server continued exactly from everything committed so far.
    prefix = list(r.token_ids[: last_edge + 1])
    model = build_tiny_byte_model(seed=0)  # the served weights (same seed)
    prompt_ids = list(edge.tokenizer.encode(PROMPT, add_special_tokens=False))
    assert list(r.token_ids[last_edge + 1:]) == _greedy(model, prompt_ids + prefix, N - last_edge - 1)


def _greedy(hf_model: Any, ids: list[int], n: int) -> list[int]:
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, hf_model(x).logits[0, -1].argmax().view(1, 1)], dim=1)
    return [int(t) for t in x[0, len(ids):]]


# -- a client that stops reading; a half-open connection -------------------------------------


async def test_client_that_stops_reading_does_not_stall_others(cloud_server, server_keys, client_keys, edge) -> None:  # type: ignore[no-untyped-def]
    server = await cloud_server(max_top_k=256, max_pending=64, requests_per_second=10_000, burst=10_000,
                                protocol_options={"keepalive_interval": 0.3, "keepalive_timeout": 0.5})
    want = await reference(server.url, server_keys, edge)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    from websockets.asyncio.client import connect as ws_connect

    hog = HostileClient.__new__(HostileClient)
    hog.ws = await ws_connect(server.url, sock=sock, compression=None, max_size=None, ping_interval=None, proxy=None,
                              max_queue=1)
    from tether.protocol import ClientProtocol

    hog.protocol = ClientProtocol(client_keys, server_keys.public, pattern="IK")
    for record in hog.protocol.data_to_send():
        await hog.ws.send(record)
    while hog.protocol.state.name == "HANDSHAKE":
        hog.protocol.receive_data(await hog.ws.recv())
        for record in hog.protocol.data_to_send():  # the Hello, after message 2
            await hog.ws.send(record)
    opened = await hog.request(OpenSession(model="tiny-cloud", prompt=np.arange(1, 400, dtype=np.int32) % 250))
    sid = opened.session_id  # type: ignore[attr-defined]
    # Ask for ~1 MB replies and never read them: the server must stop reading this client.
    score = ScoreTokens(session_id=sid, tokens=np.arange(1, 300, dtype=np.int32) % 250, top_k=256)
    sent = 0

    async def flood() -> None:  # sealed by hand: no client-side in-flight limit holds it back
        nonlocal sent
        while True:
            await hog.send_plaintext(encode_frame(score, request_id=1000 + sent).tobytes())
            sent += 1

    flooding = asyncio.ensure_future(flood())
    try:
        (hog_conn,) = [c for c in server._server.connections if c.peer_public_key == client_keys.public]
        read_before = -1
        for _ in range(40):  # until the server takes in no more of its requests
            await asyncio.sleep(0.5)
            if hog_conn._protocol._last_request_id == read_before:
                break
            read_before = hog_conn._protocol._last_request_id  # the last request the server read
        # Meanwhile another device is served in full.
        async with await EdgeClient.connect(server.url, server_key=server_keys.public.to_text(),
                                            edge_model=edge) as client:
            r = await asyncio.wait_for(generate(client), 30)
        assert list(r.token_ids) == want and not r.stats.degraded
        # The server stopped reading the client that does not read (its kernel buffers hold
        # the rest), so what it holds for it stays bounded: requests in flight, 8 records.
        assert hog_conn._protocol._last_request_id == read_before < 1000 + sent
        assert len(hog_conn._protocol._active) <= server._server.limits.max_in_flight
        # Keepalive gives up on the silent client; its connection and session are reclaimed.
        for _ in range(300):
            if not server.manager.sessions:
                break
            await asyncio.sleep(0.1)
        assert not server.manager.sessions
        assert not server._server.connections
    finally:
        flooding.cancel()
        with pytest.raises((asyncio.CancelledError, Exception)):
            await flooding
        hog.ws.transport.abort()


async def test_half_open_connection_is_closed_by_keepalive(cloud_server, server_keys, client_keys) -> None:  # type: ignore[no-untyped-def]
    server = await cloud_server(protocol_options={"keepalive_interval": 0.2, "keepalive_timeout": 0.3})
    proxy = await FaultProxy(server.port).start()
    try:
        conn = await connect(proxy.url, client_keys, server_public_key=server_keys.public, keepalive_interval=None)
        await conn.request(OpenSession(model="tiny-cloud", prompt=[1, 2, 3]))
        assert len(server.manager.sessions) == 1
        proxy.blackhole()  # no FIN, no RST: the device just vanished
        for _ in range(50):
            if not server._server.connections:
                break
            await asyncio.sleep(0.1)
        assert not server._server.connections, "keepalive did not close the half-open connection"
        assert not server.manager.sessions, "its session was not reclaimed"
    finally:
        await proxy.aclose()
