"""Admission limits: connections (server-wide, per client key), request rate and sessions per
client. Each refusal is clear (its own close code or error message) and touches no one else."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tether.cloud._config import CloudConfig
from tether.errors import ConfigurationError
from tether.protocol import (
    AdmissionLimits,
    AppendTokens,
    CloseCode,
    ErrorCode,
    KeyPair,
    OpenSession,
    PeerClosed,
    RemoteError,
    TooManyConnections,
    UsageError,
    connect,
)
from tether.protocol._limits import RateLimiter

MODEL = "tiny-cloud"


async def _open(url: str, keys: KeyPair, server_keys: KeyPair):  # type: ignore[no-untyped-def]
    return await connect(url, keys, server_public_key=server_keys.public)


async def test_server_wide_connection_limit_refuses_before_the_handshake(cloud_server, server_keys) -> None:  # type: ignore[no-untyped-def]
    server = await cloud_server(max_connections=2)
    held = [await _open(server.url, KeyPair.generate(), server_keys) for _ in range(2)]
    with pytest.raises(PeerClosed) as refused:
        await _open(server.url, KeyPair.generate(), server_keys)
    assert refused.value.code == CloseCode.TRY_AGAIN_LATER == 1013
    assert "TRY_AGAIN_LATER" in str(refused.value)
    # The held connections are unaffected, and a slot frees as soon as one closes.
    assert isinstance(await held[0].request(OpenSession(model=MODEL)), object)
    await held[1].close()
    await asyncio.sleep(0.05)
    again = await _open(server.url, KeyPair.generate(), server_keys)
    await again.request(OpenSession(model=MODEL))
    for conn in (held[0], again):
        await conn.close()
    assert server._server.busy == 1


async def test_per_client_connection_limit_closes_with_4060(cloud_server, server_keys, client_keys) -> None:  # type: ignore[no-untyped-def]
    server = await cloud_server(max_connections_per_client=2)
    mine = [await _open(server.url, client_keys, server_keys) for _ in range(2)]
    # Refused after the Hello (the client proved who it is) and before the Welcome: connect() raises.
    with pytest.raises(TooManyConnections) as refused:
        await _open(server.url, client_keys, server_keys)
    assert refused.value.close_code == CloseCode.TOO_MANY_CONNECTIONS == 4060
    # Another client is admitted, and this client's first two connections still work.
    other = await _open(server.url, KeyPair.generate(), server_keys)
    await other.request(OpenSession(model=MODEL))
    await mine[0].request(OpenSession(model=MODEL))
    for conn in (*mine, other):
        await conn.close()


async def test_rate_limit_answers_overloaded_with_a_retry_time(cloud_server, server_keys, client_keys) -> None:  # type: ignore[no-untyped-def]
    server = await cloud_server(requests_per_second=2.0, burst=3)
    conn = await _open(server.url, client_keys, server_keys)
    opened = await conn.request(OpenSession(model=MODEL, prompt=[1, 2]))
    sid = opened.session_id  # type: ignore[attr-defined]
    results = await asyncio.gather(
        *(conn.request(AppendTokens(session_id=sid, tokens=np.array([3], np.int32))) for _ in range(6)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, RemoteError)]
    assert len(refused) >= 3, results
    assert all(r.code == ErrorCode.OVERLOADED and r.retryable for r in refused)
    assert "rate limit: over 2 requests/s (burst 3) for this client; retry in" in refused[0].message
    # The connection stays open; another client has its own bucket.
    other = await _open(server.url, KeyPair.generate(), server_keys)
    await other.request(OpenSession(model=MODEL))
    await asyncio.sleep(0.6)  # one token back
    await conn.request(AppendTokens(session_id=sid, tokens=np.array([4], np.int32)))
    assert not conn.closed
    await conn.close()
    await other.close()


async def test_rate_limit_holds_across_a_clients_connections(cloud_server, server_keys, client_keys) -> None:  # type: ignore[no-untyped-def]
    server = await cloud_server(requests_per_second=0.2, burst=2)
    first = await _open(server.url, client_keys, server_keys)
    await first.request(OpenSession(model=MODEL))
    await first.request(OpenSession(model=MODEL))
    second = await _open(server.url, client_keys, server_keys)  # reconnecting does not refill it
    with pytest.raises(RemoteError) as refused:
        await second.request(OpenSession(model=MODEL))
    assert refused.value.code == ErrorCode.OVERLOADED
    await first.close()
    await second.close()


async def test_sessions_per_client_limit(cloud_server, server_keys, client_keys) -> None:  # type: ignore[no-untyped-def]
    server = await cloud_server(max_sessions_per_client=2)
    a = await _open(server.url, client_keys, server_keys)
    b = await _open(server.url, client_keys, server_keys)
    await a.request(OpenSession(model=MODEL))
    await b.request(OpenSession(model=MODEL))
    with pytest.raises(RemoteError) as refused:
        await a.request(OpenSession(model=MODEL))
    assert refused.value.code == ErrorCode.LIMIT_EXCEEDED
    assert "this client already holds its maximum of 2 open sessions; close one first" in refused.value.message
    other = await _open(server.url, KeyPair.generate(), server_keys)
    await other.request(OpenSession(model=MODEL))  # others are not affected
    await b.close()  # its session closes with its connection: room again
    await asyncio.sleep(0.05)
    await a.request(OpenSession(model=MODEL))
    await a.close()
    await other.close()


def test_rate_limiter_bucket() -> None:
    limiter = RateLimiter(rate=2.0, burst=2)
    assert limiter.acquire(b"a", 0.0) == 0.0
    assert limiter.acquire(b"a", 0.0) == 0.0
    assert limiter.acquire(b"a", 0.0) == pytest.approx(0.5)
    assert limiter.acquire(b"b", 0.0) == 0.0  # keys are independent
    assert limiter.acquire(b"a", 0.5) == 0.0  # refilled at 2/s
    limiter.acquire(b"c", 100.0)  # a sweep drops buckets that are full again
    assert set(limiter._buckets) == {b"c"}


def test_admission_limits_validate_and_come_from_the_config_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="max_connections must be a positive int"):
        AdmissionLimits(max_connections=0)
    with pytest.raises(UsageError, match="requests_per_second must be > 0"):
        AdmissionLimits(requests_per_second=0)
    path = tmp_path / "cloud.toml"
    path.write_text("[cloud]\nmax_connections = 10\nmax_connections_per_client = 3\nrequests_per_second = 7.5\n"
                    "burst = 9\nmax_sessions_per_client = 4\n")
    cfg = CloudConfig.from_file(path)
    assert cfg.admission() == AdmissionLimits(max_connections=10, max_connections_per_client=3,
                                              requests_per_second=7.5, burst=9)
    assert cfg.max_sessions_per_client == 4
    with pytest.raises(ConfigurationError):
        CloudConfig(max_connections=0)
