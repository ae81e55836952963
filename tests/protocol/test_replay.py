"""IK replay protection and admission on liveness (issue 17, items 1 and 4).

A passive observer who captured an IK message 1 must not get a connection slot, a "client
connected", or anything else by replaying it: the server refuses a timestamp that is not
newer than the last one accepted from that key, and admits (and counts) a connection only
once the client's first transport record (its Hello) has arrived.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import pytest

from protocolkit import echo_handler, make_pair, replay
from tether.protocol import (
    AdmissionLimits,
    Allowlist,
    Appended,
    AppendTokens,
    ClientProtocol,
    CloseCode,
    HandshakeError,
    HandshakeReplayed,
    KeyPair,
    ServerProtocol,
    TooManyConnections,
    connect,
)
from tether.protocol._replay import TIMESTAMP_LEN, ReplayGuard, next_timestamp, tai64n
from tether.protocol._session import State

TOKENS = AppendTokens(session_id="s", tokens=[1, 2, 3])


def test_tai64n_layout_and_strictly_increasing_timestamps(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tai64n(0) == bytes.fromhex("400000000000000a00000000")  # 1970 = 2^62 + 10 s (TAI - UTC)
    assert tai64n(1_767_225_600_123_456_789).hex() == "400000006955b90a075bcd15"
    monkeypatch.setattr("tether.protocol._replay._last_ns", 0)
    now = 1_767_225_600_123_456_789
    frozen = [next_timestamp(lambda: now) for _ in range(3)]
    # The clock rounded down to 2^24 ns (no fine clock reading leaves the client), then
    # strictly increasing even with a frozen clock.
    rounded = now - now % (1 << 24)
    assert frozen == [tai64n(rounded), tai64n(rounded + 1), tai64n(rounded + 2)]
    assert all(len(t) == TIMESTAMP_LEN for t in frozen)


def test_replay_guard_keeps_the_greatest_per_key_and_is_bounded() -> None:
    keys = [KeyPair.generate().public for _ in range(3)]
    guard = ReplayGuard(capacity=2)
    guard.check(keys[0], tai64n(10))
    with pytest.raises(HandshakeReplayed, match=f"from client {re.escape(keys[0].fingerprint)} replayed"):
        guard.check(keys[0], tai64n(10))
    with pytest.raises(HandshakeReplayed):
        guard.check(keys[0], tai64n(9))
    guard.check(keys[0], tai64n(11))
    guard.check(keys[1], tai64n(5))  # per key: another key's older time is fine
    guard.check(keys[2], tai64n(5))
    assert len(guard) == 2  # the least recently seen key (keys[0]) was forgotten
    with pytest.raises(HandshakeError, match="12-byte timestamp, got 3 bytes"):
        guard.check(keys[1], b"abc")


def test_a_replayed_ik_message_1_is_refused_before_any_answer(server_keys: KeyPair, client_keys: KeyPair) -> None:
    guard = ReplayGuard()
    client = ClientProtocol(client_keys, server_keys.public, pattern="IK")
    (first,) = client.data_to_send()
    genuine = ServerProtocol(server_keys, allowlist=Allowlist([client_keys.public]), replay_guard=guard)
    genuine.receive_data(first)
    assert len(genuine.data_to_send()) == 1  # message 2
    for _ in range(3):
        replayed = ServerProtocol(server_keys, allowlist=Allowlist([client_keys.public]), replay_guard=guard)
        with pytest.raises(HandshakeReplayed):
            replayed.receive_data(first)
        assert replayed.data_to_send() == [] and replayed.close_code == CloseCode.HANDSHAKE_REPLAYED == 4004


def test_keys_off_the_allowlist_are_not_remembered(server_keys: KeyPair, client_keys: KeyPair) -> None:
    guard = ReplayGuard()
    stranger = KeyPair.generate()
    for _ in range(3):
        client = ClientProtocol(stranger, server_keys.public, pattern="IK")
        server = ServerProtocol(server_keys, allowlist=Allowlist([client_keys.public]), replay_guard=guard)
        server.receive_data(client.data_to_send()[0])
    assert len(guard) == 0  # the table is bounded by the allowlist


def test_admission_waits_for_the_hello_and_the_admit_hook_refuses_before_welcome(
    server_keys: KeyPair, client_keys: KeyPair
) -> None:
    """The server's verdict comes only after the client's first record; a refusal from the
    admission hook is an encrypted Goodbye before any Welcome, raised by the client as its type."""
    admitted: list[str] = []

    def admit(peer: Any) -> None:
        if admitted:
            raise TooManyConnections("full", limit=1)
        admitted.append(peer.fingerprint)

    for pattern in ("IK", "XX"):
        admitted.clear()
        first = make_pair(server_keys, client_keys, pattern=pattern, server_kwargs={"admit": admit})
        assert first.client.state is State.OPEN and admitted == [client_keys.public.fingerprint]
        second = make_pair(server_keys, client_keys, pattern=pattern, server_kwargs={"admit": admit}, pump=False)
        for record in second.client.data_to_send():
            second.server.receive_data(record)
        for record in second.server.data_to_send():  # message 2 (XX: and nothing else yet)
            second.client.receive_data(record)
        assert second.server.state is State.HANDSHAKE and len(admitted) == 1  # not counted yet
        with pytest.raises(TooManyConnections):
            for record in second.client.data_to_send():  # (XX: message 3 and) the Hello
                second.server.receive_data(record)
        (goodbye,) = second.server.data_to_send()
        with pytest.raises(TooManyConnections, match="max_connections_per_client"):
            second.client.receive_data(goodbye)
        assert second.client.welcome is None and second.server.close_code == 4060


async def test_replay_to_a_server_that_forgot_the_key_is_never_admitted(
    live_server: Any, server_keys: KeyPair, client_keys: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    """Even unknown to the replay table (e.g. after a restart), a replayed message 1 gets only
    message 2: no Hello can follow it, so it is never admitted, counted or handed over."""
    handled: list[Any] = []

    async def handler(conn: Any) -> None:
        handled.append(conn)
        await echo_handler(conn)

    captured = ClientProtocol(client_keys, server_keys.public, pattern="IK").data_to_send()[0]
    server = await live_server(handler, handshake_timeout=0.5,
                               admission=AdmissionLimits(max_connections_per_client=1))
    replays = asyncio.gather(*(replay(server.url, captured) for _ in range(3)))
    await asyncio.sleep(0.1)
    # The socket is waiting for its Hello: the real client's only slot is still free.
    async with await connect(server.url, client_keys, server_public_key=server_keys.public) as conn:
        assert await conn.request(TOKENS) == Appended(session_id="s", length=3)
    # The first: message 2, then an encrypted Goodbye it cannot read, and the close. Its
    # timestamp is remembered from then on, so the others are refused without an answer.
    assert sorted(await replays) == [(0, CloseCode.HANDSHAKE_REPLAYED)] * 2 + [(2, CloseCode.HANDSHAKE_TIMEOUT)]
    assert len(handled) == 1 and server._per_client == {}


async def test_crossed_handshakes_are_retried_with_a_fresh_timestamp(
    live_server: Any, server_keys: KeyPair, client_keys: KeyPair, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two IK handshakes of one key that cross on the way: the older is refused (4004) and
    `connect()` retries it with a newer timestamp."""
    caplog.set_level(logging.WARNING, logger="tether.protocol")
    server = await live_server(echo_handler)
    # The server has already seen the timestamp connect() will draw next (as if a later
    # handshake of this key had overtaken it).
    last = time.time_ns() + 10 * 10**9  # ahead of the clock: the next timestamps are last + 1, + 2
    monkeypatch.setattr("tether.protocol._replay._last_ns", last)
    server._replay_guard.check(client_keys.public, tai64n(last + 1))
    async with await connect(server.url, client_keys, server_public_key=server_keys.public) as conn:
        assert await conn.request(TOKENS) == Appended(session_id="s", length=3)
    refusals = [r for r in caplog.records if "HANDSHAKE_REPLAYED" in r.getMessage()]
    assert len(refusals) == 1


async def test_many_concurrent_connections_of_one_key_all_open(
    live_server: Any, server_keys: KeyPair, client_keys: KeyPair
) -> None:
    server = await live_server(echo_handler)
    conns = await asyncio.gather(*(connect(server.url, client_keys, server_public_key=server_keys.public)
                                   for _ in range(8)))
    for conn in conns:
        assert await conn.request(TOKENS) == Appended(session_id="s", length=3)
        await conn.close()
