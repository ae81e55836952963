"""The sans-I/O client and server back to back in memory: no sockets, no event loop."""

from __future__ import annotations

import numpy as np
import pytest

from protocolkit import FakeClock, Pair, make_pair
from tether.protocol import (
    Allowlist,
    Appended,
    AppendTokens,
    BadToken,
    CancelReceived,
    Chat,
    ChatChunk,
    ChatMessage,
    ClientProtocol,
    CloseCode,
    ErrorCode,
    ErrorReply,
    Generate,
    Generated,
    GoodbyeReceived,
    HandshakeComplete,
    HandshakeError,
    HandshakeTimeout,
    KeepaliveTimeout,
    KeyPair,
    Limits,
    PongReceived,
    ReplyReceived,
    RequestReceived,
    ServerKeyMismatch,
    ServerProtocol,
    State,
    UnexpectedMessage,
    UnknownClientKey,
    UsageError,
    VersionMismatch,
)
from tether.protocol._frames import FLAG_END, encode_frame
from tether.protocol._handshake import PREAMBLE

TOKENS = AppendTokens(session_id="s", tokens=[1, 2, 3])


@pytest.mark.parametrize("pattern", ["IK", "XX"])
def test_handshake_then_request_and_reply(server_keys: KeyPair, client_keys: KeyPair, pattern: str) -> None:
    pair = make_pair(server_keys, client_keys, pattern=pattern, client_kwargs={"token": None})
    client_events, server_events = pair.take()
    assert pair.client.state is State.OPEN and pair.server.state is State.OPEN
    (done_c,) = client_events
    (done_s,) = server_events
    assert isinstance(done_c, HandshakeComplete) and done_c.peer == server_keys.public
    assert isinstance(done_s, HandshakeComplete) and done_s.peer == client_keys.public
    assert done_c.handshake_hash == done_s.handshake_hash and len(done_c.handshake_hash) == 32
    assert done_c.welcome is not None and done_c.welcome.max_in_flight == Limits().max_in_flight
    assert done_s.hello is not None and done_s.pattern == pattern

    request_id = pair.client.send_request(TOKENS)
    pair.pump()
    _, (received,) = pair.take()
    assert received == RequestReceived(request_id, TOKENS)
    pair.server.send_reply(request_id, Appended(session_id="s", length=3))
    pair.pump()
    (reply,), _ = pair.take()
    assert reply == ReplyReceived(request_id, Appended(session_id="s", length=3), True)
    assert pair.client.in_flight == 0 and not pair.server.is_active(request_id)


def test_handshake_message_count(server_keys: KeyPair, client_keys: KeyPair) -> None:
    """IK: msg1, msg2, Hello record, Welcome. XX: msg1, msg2, msg3 + Hello record, Welcome.

    The client's Hello is its first transport record in both patterns (forward secret, and
    its proof of liveness), so the server answers with the Welcome only after it."""
    for pattern, expected in (("IK", [1, 1, 1, 1]), ("XX", [1, 1, 2, 1])):
        pair = make_pair(server_keys, client_keys, pattern=pattern, pump=False)
        counts = []
        while pair.client.state is State.HANDSHAKE:
            out = pair.client.data_to_send()
            if out:
                counts.append(len(out))
                for record in out:
                    pair.server.receive_data(record)
            out = pair.server.data_to_send()
            counts.append(len(out))
            for record in out:
                pair.client.receive_data(record)
        assert counts == expected


def test_several_requests_in_flight_answered_out_of_order(pair: Pair) -> None:
    pair.take()
    ids = [pair.client.send_request(AppendTokens(session_id="s", tokens=[i])) for i in range(5)]
    pair.pump()
    assert pair.client.in_flight == 5
    for request_id in reversed(ids):
        pair.server.send_reply(request_id, Appended(session_id="s", length=request_id))
    pair.pump()
    replies, _ = pair.take()
    assert [r.request_id for r in replies] == list(reversed(ids))
    assert all(isinstance(r, ReplyReceived) and r.message.length == r.request_id for r in replies)


def test_streaming_replies_and_end_flag(pair: Pair) -> None:
    pair.take()
    request_id = pair.client.send_request(Generate(session_id="s", max_new_tokens=3))
    pair.pump()
    for i in range(3):
        last = i == 2
        chunk = Generated(session_id="s", length=i, tokens=[i], finish_reason="length" if last else None)
        pair.server.send_reply(request_id, chunk, end=last)
    pair.pump()
    replies, _ = pair.take()
    assert [r.end for r in replies] == [False, False, True]
    with pytest.raises(UsageError, match="is not open"):
        pair.server.send_reply(request_id, Generated(session_id="s", length=0, tokens=[]))


def test_non_streaming_request_cannot_get_chunks(pair: Pair) -> None:
    pair.take()
    request_id = pair.client.send_request(TOKENS)
    pair.pump()
    with pytest.raises(UsageError, match="AppendTokens does not stream replies"):
        pair.server.send_reply(request_id, Appended(session_id="s", length=1), end=False)
    with pytest.raises(UsageError, match="ChatChunk does not answer AppendTokens"):
        pair.server.send_reply(request_id, ChatChunk(text="x"))


def test_cancel_reaches_the_server_and_late_chunks_are_dropped(pair: Pair) -> None:
    pair.take()
    request_id = pair.client.send_request(Chat(messages=(ChatMessage(role="user", content="hi"),), stream=True))
    pair.pump()
    pair.take()
    pair.server.send_reply(request_id, ChatChunk(text="a"), end=False)
    pair.pump()
    assert pair.client.cancel(request_id)
    pair.server.send_reply(request_id, ChatChunk(text="b"), end=False)  # crosses the Cancel: dropped
    pair.pump()
    client_events, server_events = pair.take()
    assert [type(e) for e in client_events] == [ReplyReceived]  # only "a", received before cancelling
    assert server_events == [CancelReceived(request_id)]
    pair.server.send_error(request_id, ErrorCode.CANCELLED, "cancelled")
    pair.pump()
    client_events, _ = pair.take()
    assert len(client_events) == 1 and isinstance(client_events[0].message, ErrorReply)
    assert pair.client.in_flight == 0
    assert not pair.client.cancel(request_id)


def test_in_flight_limit_and_draining(server_keys: KeyPair, client_keys: KeyPair) -> None:
    pair = make_pair(server_keys, client_keys, server_kwargs={"limits": Limits(max_in_flight=2)})
    pair.take()
    pair.client.peer_max_in_flight = 0  # a misbehaving client ignores the announced limit
    ids = [pair.client.send_request(TOKENS) for _ in range(3)]
    pair.pump()
    client_events, server_events = pair.take()
    assert [e.request_id for e in server_events] == ids[:2]
    (refused,) = client_events
    assert isinstance(refused.message, ErrorReply) and refused.message.code is ErrorCode.OVERLOADED
    assert refused.message.retryable and refused.message.message == "more than 2 requests in flight"
    pair.server.start_draining()
    late = pair.client.send_request(TOKENS)
    pair.pump()
    (refused,), _ = pair.take()
    assert refused.request_id == late and refused.message.code is ErrorCode.SHUTTING_DOWN


def test_client_respects_announced_in_flight_limit(server_keys: KeyPair, client_keys: KeyPair) -> None:
    pair = make_pair(server_keys, client_keys, server_kwargs={"limits": Limits(max_in_flight=1)})
    pair.client.send_request(TOKENS)
    with pytest.raises(UsageError, match=r"1 requests already in flight \(server limit\)"):
        pair.client.send_request(TOKENS)


def test_frame_over_the_peers_limit_is_refused_locally(server_keys: KeyPair, client_keys: KeyPair) -> None:
    pair = make_pair(server_keys, client_keys, server_kwargs={"limits": Limits(max_frame_bytes=4096)})
    big = AppendTokens(session_id="s", tokens=np.zeros(2000, np.int32))
    with pytest.raises(UsageError, match=r"^frame of 8072 bytes exceeds the peer's limit of 4096 bytes$"):
        pair.client.send_request(big)
    assert pair.client.in_flight == 0 and pair.client.state is State.OPEN


def test_ping_pong_and_goodbye(pair: Pair) -> None:
    pair.take()
    ping_id = pair.client.send_ping()
    pair.pump()
    client_events, _ = pair.take()
    assert client_events == [PongReceived(ping_id)]
    pair.client.send_goodbye(CloseCode.NORMAL)
    assert pair.client.state is State.CLOSING
    pair.pump()
    _, server_events = pair.take()
    assert server_events == [GoodbyeReceived(1000, "NORMAL")]
    assert pair.server.state is State.CLOSED and pair.server.close_code == 1000
    assert pair.server.connection_lost(1000).clean


def _violate(pair: Pair, raw_frame: bytes, to_server: bool = True) -> None:
    sender = pair.client if to_server else pair.server
    assert sender.transport is not None
    record = sender.transport.seal_plaintext(raw_frame)
    receiver = pair.server if to_server else pair.client
    receiver.receive_data(record)


def test_state_machine_violations_close_with_unexpected_message(pair: Pair) -> None:
    pair.take()
    with pytest.raises(UnexpectedMessage, match="a client may not send Appended"):
        _violate(pair, encode_frame(Appended(session_id="s", length=1), request_id=1, flags=FLAG_END).tobytes())
    assert pair.server.state is State.CLOSED and pair.server.close_code == CloseCode.UNEXPECTED_MESSAGE
    assert pair.server.data_to_send(), "an encrypted Goodbye tells the client why"


@pytest.mark.parametrize(
    ("frame", "to_server", "text"),
    [
        (encode_frame(TOKENS, request_id=0).tobytes(), True, r"request id 0 does not increase \(last 0\)"),
        (encode_frame(TOKENS, request_id=1, flags=FLAG_END).tobytes(), True, "requests carry no flags"),
        (encode_frame(TOKENS, request_id=1).tobytes(), False, "a server may not send AppendTokens"),
        (encode_frame(Appended(session_id="s", length=0), request_id=9, flags=FLAG_END).tobytes(), False,
         "Appended answers request 9, which is not open"),
    ],
)
def test_more_violations(server_keys: KeyPair, client_keys: KeyPair, frame: bytes, to_server: bool, text: str) -> None:
    pair = make_pair(server_keys, client_keys)
    with pytest.raises(UnexpectedMessage, match=text):
        _violate(pair, frame, to_server)


def test_unknown_client_key_is_refused_with_encrypted_reason(server_keys: KeyPair) -> None:
    stranger = KeyPair.generate()
    server = ServerProtocol(server_keys, allowlist=Allowlist([]))
    client = ClientProtocol(stranger, server_keys.public, pattern="XX")
    pair = Pair(client, server)
    with pytest.raises(UnknownClientKey) as server_side:
        pair.pump()
    assert server_side.value.fingerprint == stranger.public.fingerprint
    assert server.close_code == CloseCode.UNKNOWN_CLIENT_KEY
    with pytest.raises(UnknownClientKey):  # the client learns it from the authenticated Goodbye
        for record in server.data_to_send():
            client.receive_data(record)


@pytest.mark.parametrize("pattern", ["IK", "XX"])
def test_bad_token(server_keys: KeyPair, client_keys: KeyPair, pattern: str) -> None:
    server = ServerProtocol(server_keys, token="right")
    client = ClientProtocol(client_keys, server_keys.public, pattern=pattern, token="wrong")
    with pytest.raises(BadToken):
        Pair(client, server).pump()
    with pytest.raises(BadToken, match="the server refused the bearer token"):
        for record in server.data_to_send():
            client.receive_data(record)
    assert client.close_code == CloseCode.BAD_TOKEN


def test_xx_client_refuses_an_unpinned_server(client_keys: KeyPair) -> None:
    impostor, pinned = KeyPair.generate(), KeyPair.generate()
    server = ServerProtocol(impostor)
    client = ClientProtocol(client_keys, pinned.public, pattern="XX")
    with pytest.raises(ServerKeyMismatch) as info:
        Pair(client, server).pump()
    assert info.value.expected == pinned.public.fingerprint and info.value.actual == impostor.public.fingerprint
    assert pinned.public.fingerprint in str(info.value) and impostor.public.fingerprint in str(info.value)
    assert client.close_code == CloseCode.SERVER_KEY_MISMATCH


def test_ik_with_a_wrong_pin_fails_at_the_server(client_keys: KeyPair) -> None:
    impostor, pinned = KeyPair.generate(), KeyPair.generate()
    server = ServerProtocol(impostor)
    client = ClientProtocol(client_keys, pinned.public, pattern="IK")
    with pytest.raises(HandshakeError, match="failed authentication"):
        Pair(client, server).pump()
    assert server.close_code == CloseCode.HANDSHAKE_FAILED


def test_preamble_version_and_pattern_are_checked(server_keys: KeyPair, client_keys: KeyPair) -> None:
    client = ClientProtocol(client_keys, server_keys.public, pattern="IK")
    (first,) = client.data_to_send()
    for patch, error, text in (
        (PREAMBLE.pack(b"TTHR", 1, 2, 0), VersionMismatch, "client offers protocol version 1; this server speaks 2"),
        (PREAMBLE.pack(b"TTHR", 2, 9, 0), VersionMismatch, "handshake pattern 9 is not offered by this server"),
        (PREAMBLE.pack(b"HTTP", 2, 2, 0), HandshakeError, "not a tether handshake"),
        (PREAMBLE.pack(b"TTHR", 2, 1, 0), HandshakeError, "unexpected payload in handshake message 1"),
    ):
        server = ServerProtocol(server_keys)
        with pytest.raises(error) as info:
            server.receive_data(patch + first[PREAMBLE.size :])
        assert str(info.value) == text
        assert server.close_code == error.close_code


def test_server_offering_only_xx_refuses_ik(server_keys: KeyPair, client_keys: KeyPair) -> None:
    server = ServerProtocol(server_keys, patterns=("XX",))
    client = ClientProtocol(client_keys, server_keys.public, pattern="IK")
    with pytest.raises(VersionMismatch):
        Pair(client, server).pump()


def test_keepalive_pings_then_detects_a_half_open_link(server_keys: KeyPair, client_keys: KeyPair) -> None:
    clock = FakeClock()
    pair = make_pair(
        server_keys, client_keys,
        client_kwargs={"clock": clock, "keepalive_interval": 5.0, "keepalive_timeout": 3.0},
    )
    pair.take()
    assert pair.client.next_deadline() == clock.now + 5.0
    clock.now += 5.0
    pair.client.poll()  # idle for the interval: a Ping goes out
    assert pair.client.next_deadline() == clock.now + 3.0
    pair.pump()  # the server answers with a Pong: alive
    assert pair.client.next_deadline() == clock.now + 5.0
    clock.now += 5.0
    pair.client.poll()
    pair.client.data_to_send()  # the Ping is lost: the link went half-open
    clock.now += 2.9
    pair.client.poll()
    clock.now += 0.2
    with pytest.raises(KeepaliveTimeout, match=r"no answer from the peer within 3 s of a keepalive ping"):
        pair.client.poll()
    assert pair.client.state is State.CLOSED and pair.client.close_code == CloseCode.KEEPALIVE_TIMEOUT


def test_handshake_timeout(server_keys: KeyPair) -> None:
    clock = FakeClock()
    server = ServerProtocol(server_keys, handshake_timeout=2.0, clock=clock)
    clock.now += 2.0
    with pytest.raises(HandshakeTimeout):
        server.poll()
    assert server.close_code == CloseCode.HANDSHAKE_TIMEOUT


def test_traffic_padding_hides_exact_sizes(server_keys: KeyPair, client_keys: KeyPair) -> None:
    pair = make_pair(server_keys, client_keys, client_kwargs={"padding_block": 256})
    pair.take()
    sizes = set()
    for n in (1, 5, 20):
        pair.client.send_request(AppendTokens(session_id="s", tokens=list(range(n))))
        sizes |= {len(r) for r in pair.client.data_to_send()}
    assert sizes == {256 + 28}


def test_sending_when_not_open_is_a_usage_error(server_keys: KeyPair, client_keys: KeyPair) -> None:
    pair = make_pair(server_keys, client_keys, pump=False)
    with pytest.raises(UsageError, match="connection is handshake, not open"):
        pair.client.send_request(TOKENS)
    pair.pump()
    with pytest.raises(UsageError, match="Appended is not a request"):
        pair.client.send_request(Appended(session_id="s", length=1))
