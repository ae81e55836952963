"""A real server on 127.0.0.1 and real clients: operations, refusals and attacks on the wire."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocolkit import RawClient
from tether.protocol._transport import message_size
from tether.protocol import (
    Appended,
    AppendTokens,
    BadToken,
    ChatChunk,
    CloseCode,
    CloseSession,
    ErrorCode,
    Generate,
    Generated,
    KeepaliveTimeout,
    KeyPair,
    Limits,
    LinkEmulator,
    PeerClosed,
    RekeyPolicy,
    RemoteError,
    Request,
    RequestFailed,
    RolledBack,
    Rollback,
    ServerConnection,
    ServerKeyMismatch,
    ServerProtocol,
    UnknownClientKey,
    UsageError,
    connect,
)

TOKENS = AppendTokens(session_id="s", tokens=[1, 2, 3])


class Service:
    """A small request handler that records what happened to each request."""

    def __init__(self) -> None:
        self.cancelled: list[int] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, request: Request) -> Any:
        message = request.message
        if isinstance(message, AppendTokens):
            return Appended(session_id=message.session_id, length=int(message.tokens.shape[0]))
        if isinstance(message, Generate):
            return self._generate(message)
        if isinstance(message, Rollback):  # slow: waits until released (or cancelled)
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(request.id)
                raise
            return RolledBack(session_id=message.session_id, length=message.length)
        if isinstance(message, CloseSession):
            raise RuntimeError("secret internal detail: /etc/passwd")
        raise RequestFailed(ErrorCode.NOT_FOUND, f"no session {getattr(message, 'session_id', '')!r}")

    async def _generate(self, message: Generate) -> Any:
        for i in range(message.max_new_tokens):
            await asyncio.sleep(0)
            last = i == message.max_new_tokens - 1
            yield Generated(session_id=message.session_id, length=i + 1, tokens=[i],
                                finish_reason="length" if last else None)


def handler_for(service: Service) -> Any:
    async def handle(conn: ServerConnection) -> None:
        await conn.serve_requests(service)

    return handle


async def open_client(server: Any, client_keys: KeyPair, server_keys: KeyPair, **kwargs: Any) -> Any:
    kwargs.setdefault("server_public_key", server_keys.public)
    return await connect(server.url, client_keys, **kwargs)


@pytest.mark.parametrize("pattern", ["IK", "XX"])
async def test_requests_streams_and_errors(live_server: Any, server_keys: KeyPair, client_keys: KeyPair,
                                           pattern: str) -> None:
    service = Service()
    server = await live_server(handler_for(service), capabilities=("verify",), models=("tiny",))
    async with await open_client(server, client_keys, server_keys, pattern=pattern) as conn:
        assert conn.peer_public_key == server_keys.public and conn.pattern == pattern
        assert conn.welcome.capabilities == ("verify",) and conn.welcome.models == ("tiny",)
        assert await conn.request(TOKENS) == Appended(session_id="s", length=3)
        chunks = [c async for c in conn.stream(Generate(session_id="s", max_new_tokens=4))]
        assert [c.length for c in chunks] == [1, 2, 3, 4] and chunks[-1].finish_reason == "length"
        with pytest.raises(RemoteError) as missing:
            await conn.request(AppendTokens(session_id="s", tokens=[]) if False else _unknown())
        assert missing.value.code == ErrorCode.NOT_FOUND and missing.value.message == "no session 'x'"
        with pytest.raises(RemoteError) as internal:
            await conn.request(CloseSession(session_id="s"))
        assert internal.value.code == ErrorCode.INTERNAL and internal.value.message == "internal error"
        assert "passwd" not in str(internal.value)
        with pytest.raises(UsageError, match="use stream"):
            await conn.request(Generate(session_id="s", max_new_tokens=1))
        assert await conn.ping() < 1.0


def _unknown() -> Any:
    from tether.protocol import ScoreTokens

    return ScoreTokens(session_id="x", tokens=[1])


async def test_many_requests_in_flight(live_server: Any, server_keys: KeyPair, client_keys: KeyPair) -> None:
    server = await live_server(handler_for(Service()))
    async with await open_client(server, client_keys, server_keys) as conn:
        replies = await asyncio.gather(*(conn.request(AppendTokens(session_id="s", tokens=list(range(n))))
                                         for n in range(40)))
        assert [r.length for r in replies] == list(range(40))


async def test_timeout_cancels_the_request_on_the_server(live_server: Any, server_keys: KeyPair,
                                                         client_keys: KeyPair) -> None:
    service = Service()
    server = await live_server(handler_for(service))
    async with await open_client(server, client_keys, server_keys) as conn:
        with pytest.raises(TimeoutError):
            await conn.request(Rollback(session_id="s", length=2), timeout=0.2)
        for _ in range(100):
            if service.cancelled:
                break
            await asyncio.sleep(0.01)
        assert service.cancelled == [1]
        assert await conn.request(TOKENS) == Appended(session_id="s", length=3)  # connection still fine


async def test_leaving_a_stream_early_cancels_it(live_server: Any, server_keys: KeyPair, client_keys: KeyPair) -> None:
    server = await live_server(handler_for(Service()))
    async with await open_client(server, client_keys, server_keys) as conn:
        async for chunk in conn.stream(Generate(session_id="s", max_new_tokens=10_000)):
            if chunk.length == 3:
                break
        assert await conn.request(TOKENS) == Appended(session_id="s", length=3)
        for _ in range(200):
            if conn.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert conn.in_flight == 0  # the server ended the abandoned stream with CANCELLED
        async with conn.stream(Generate(session_id="s", max_new_tokens=10_000)) as replies:
            first = await replies.__anext__()
            assert first.length == 1
        assert await conn.request(TOKENS) == Appended(session_id="s", length=3)


@pytest.mark.parametrize("pattern", ["IK", "XX"])
async def test_refusals_have_their_own_errors(live_server: Any, server_keys: KeyPair, client_keys: KeyPair,
                                              pattern: str) -> None:
    server = await live_server(handler_for(Service()), token="s3cret")
    with pytest.raises(BadToken):
        await open_client(server, client_keys, server_keys, pattern=pattern, token="wrong")
    with pytest.raises(BadToken):
        await open_client(server, client_keys, server_keys, pattern=pattern)
    stranger = KeyPair.generate()
    with pytest.raises(UnknownClientKey) as unknown:
        await open_client(server, stranger, server_keys, pattern=pattern, token="s3cret")
    assert unknown.value.fingerprint == stranger.public.fingerprint
    wrong_pin = KeyPair.generate().public
    with pytest.raises(ServerKeyMismatch) as mismatch:
        await open_client(server, client_keys, server_keys, pattern=pattern, token="s3cret",
                          server_public_key=wrong_pin)
    assert mismatch.value.expected == wrong_pin.fingerprint
    assert mismatch.value.actual == server_keys.public.fingerprint
    async with await open_client(server, client_keys, server_keys, pattern=pattern, token="s3cret") as conn:
        assert await conn.request(TOKENS) == Appended(session_id="s", length=3)
    assert server.refused == (5 if pattern == "IK" else 4)  # IK: plus the key probe


async def test_allowlist_file_is_reloaded_without_restart(live_server: Any, server_keys: KeyPair,
                                                          tmp_path: Path) -> None:
    newcomer = KeyPair.generate()
    path = tmp_path / "clients.txt"
    path.write_text("# nobody yet\n")
    server = await live_server(handler_for(Service()), allowlist=str(path))
    with pytest.raises(UnknownClientKey):
        await open_client(server, newcomer, server_keys)
    time.sleep(0.01)
    path.write_text(f"{newcomer.public}  # added while running\n")
    async with await open_client(server, newcomer, server_keys) as conn:
        assert await conn.request(TOKENS) == Appended(session_id="s", length=3)
    path.write_text("# revoked\n")
    with pytest.raises(UnknownClientKey):
        await open_client(server, newcomer, server_keys)


def _assert_closed_and_logged(caplog: pytest.LogCaptureFixture, code: CloseCode) -> None:
    lines = [r.getMessage() for r in caplog.records if r.name == "tether.protocol"]
    assert any(f"closing with {code.name} ({int(code)})" in line for line in lines), lines
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def _serves_normally(server: Any, client_keys: KeyPair, server_keys: KeyPair) -> None:
    async with await open_client(server, client_keys, server_keys) as conn:
        assert await conn.request(TOKENS) == Appended(session_id="s", length=3)


async def test_tampered_record_closes_with_its_code(live_server: Any, server_keys: KeyPair, client_keys: KeyPair,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    server = await live_server(handler_for(Service()))
    raw = await RawClient.open(server.url, client_keys, server_keys.public)
    record = raw.seal(TOKENS)
    record[-20] ^= 0x01
    await raw.send(record)
    assert await raw.close_code() == CloseCode.FRAME_TAMPERED
    _assert_closed_and_logged(caplog, CloseCode.FRAME_TAMPERED)
    await _serves_normally(server, client_keys, server_keys)


async def test_replayed_record_closes_with_its_code(live_server: Any, server_keys: KeyPair, client_keys: KeyPair,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    server = await live_server(handler_for(Service()))
    raw = await RawClient.open(server.url, client_keys, server_keys.public)
    record = raw.seal(TOKENS)
    await raw.send(record, record)
    assert await raw.close_code() == CloseCode.FRAME_REPLAYED
    _assert_closed_and_logged(caplog, CloseCode.FRAME_REPLAYED)
    await _serves_normally(server, client_keys, server_keys)


async def test_reordered_records_close_with_their_code(live_server: Any, server_keys: KeyPair,
                                                       client_keys: KeyPair, caplog: pytest.LogCaptureFixture) -> None:
    server = await live_server(handler_for(Service()))
    raw = await RawClient.open(server.url, client_keys, server_keys.public)
    first, second = raw.seal(TOKENS), raw.seal(TOKENS)
    await raw.send(second, first)
    assert await raw.close_code() == CloseCode.FRAME_REORDERED
    _assert_closed_and_logged(caplog, CloseCode.FRAME_REORDERED)
    await _serves_normally(server, client_keys, server_keys)


async def test_truncated_record_closes_with_its_code(live_server: Any, server_keys: KeyPair, client_keys: KeyPair,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    server = await live_server(handler_for(Service()))
    raw = await RawClient.open(server.url, client_keys, server_keys.public)
    await raw.send(raw.seal(TOKENS)[:-7])
    assert await raw.close_code() == CloseCode.FRAME_TRUNCATED
    _assert_closed_and_logged(caplog, CloseCode.FRAME_TRUNCATED)
    await _serves_normally(server, client_keys, server_keys)


async def test_oversize_frame_closes_with_its_code(live_server: Any, server_keys: KeyPair, client_keys: KeyPair,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    server = await live_server(handler_for(Service()), limits=Limits(max_frame_bytes=64 * 1024))
    raw = await RawClient.open(server.url, client_keys, server_keys.public)
    big = AppendTokens(session_id="s", tokens=np.zeros(20_000, np.int32))  # 80 KB frame
    await raw.send(raw.seal(big))
    assert await raw.close_code() == CloseCode.FRAME_TOO_LARGE
    _assert_closed_and_logged(caplog, CloseCode.FRAME_TOO_LARGE)
    # Far past the limit, the websocket layer refuses the message before it is buffered.
    raw = await RawClient.open(server.url, client_keys, server_keys.public)
    await raw.send(bytes(message_size(64 * 1024) + 1024 * 1024 + 1))
    assert await raw.close_code() == CloseCode.MESSAGE_TOO_BIG
    await _serves_normally(server, client_keys, server_keys)


async def test_large_records_cross_as_fragments_and_arrive_whole(live_server: Any, server_keys: KeyPair,
                                                                 client_keys: KeyPair) -> None:
    # A 1.2 MB frame crosses as 64 KiB websocket fragments (see the next test) and must be
    # reassembled exactly, in both directions' limits, with a rekey in the middle.
    big_limits = Limits(max_frame_bytes=4 * 1024 * 1024, max_tensor_elements=1 << 20)

    async def digest(request: Request) -> Any:
        tokens = request.message.tokens
        return Appended(session_id=hashlib.sha256(tokens.tobytes()).hexdigest()[:32], length=int(tokens.shape[0]))

    async def handle(conn: ServerConnection) -> None:
        await conn.serve_requests(digest)

    server = await live_server(handle, limits=big_limits)
    tokens = np.random.default_rng(0).integers(0, 150_000, 300_001, dtype=np.int32)
    async with await open_client(server, client_keys, server_keys, limits=big_limits,
                                 rekey=RekeyPolicy(messages=2)) as conn:
        for _ in range(3):
            reply = await conn.request(AppendTokens(session_id="s", tokens=tokens))
            assert reply == Appended(session_id=hashlib.sha256(tokens.tobytes()).hexdigest()[:32], length=300_001)


async def test_records_over_64_kib_are_sent_as_64_kib_fragments() -> None:
    from tether.protocol._driver import _Driver
    from tether.protocol._ws import FRAGMENT_BYTES

    class RecordingSocket:  # test double: captures what the driver hands to websockets
        def __init__(self) -> None:
            self.sent: list[Any] = []

        async def send(self, message: Any) -> None:
            self.sent.append(message if isinstance(message, (bytes, bytearray)) else [bytes(m) for m in message])

    ws = RecordingSocket()
    driver = _Driver(ws, ServerProtocol.__new__(ServerProtocol), shapers=(None, None), describe="test")  # type: ignore[arg-type]
    small, large = bytearray(b"s" * FRAGMENT_BYTES), bytearray(np.arange(200_000, dtype=np.uint8).tobytes())
    await driver._ws_send(small)
    await driver._ws_send(large)
    assert ws.sent[0] == small
    fragments = ws.sent[1]
    assert [len(f) for f in fragments] == [FRAGMENT_BYTES] * 3 + [200_000 - 3 * FRAGMENT_BYTES]
    assert b"".join(fragments) == large


async def test_fragmented_oversize_message_is_refused_on_its_total(live_server: Any, server_keys: KeyPair,
                                                                   client_keys: KeyPair) -> None:
    # The websocket layer's cap counts all fragments of a message, so fragmenting cannot
    # smuggle a message past it.
    server = await live_server(handler_for(Service()), limits=Limits(max_frame_bytes=64 * 1024))
    raw = await RawClient.open(server.url, client_keys, server_keys.public)
    cap = 64 * 1024 + 28 + 1024 * 1024
    fragment = bytes(64 * 1024)
    await raw.ws.send(fragment for _ in range(cap // len(fragment) + 1))
    assert await raw.close_code() == CloseCode.MESSAGE_TOO_BIG
    await _serves_normally(server, client_keys, server_keys)


async def test_oversize_tensor_and_metadata_close_with_their_codes(live_server: Any, server_keys: KeyPair,
                                                                   client_keys: KeyPair) -> None:
    server = await live_server(handler_for(Service()),
                               limits=Limits(max_tensor_elements=100, max_metadata_bytes=64))
    raw = await RawClient.open(server.url, client_keys, server_keys.public)
    await raw.send(raw.seal(AppendTokens(session_id="s", tokens=np.zeros(101, np.int32))))
    assert await raw.close_code() == CloseCode.TENSOR_TOO_LARGE
    raw = await RawClient.open(server.url, client_keys, server_keys.public)
    await raw.send(raw.seal(AppendTokens(session_id="s" * 100, tokens=[1])))
    assert await raw.close_code() == CloseCode.METADATA_TOO_LARGE


async def test_garbage_and_downgrades_before_the_handshake(live_server: Any, server_keys: KeyPair,
                                                           client_keys: KeyPair) -> None:
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed

    from tether.protocol import ClientProtocol
    from tether.protocol._handshake import PREAMBLE

    server = await live_server(handler_for(Service()))
    first = ClientProtocol(client_keys, server_keys.public, pattern="IK").data_to_send()[0]
    cases = [
        (b"GET / HTTP/1.1\r\n", CloseCode.HANDSHAKE_FAILED),
        (PREAMBLE.pack(b"TTHR", 1, 2, 0) + first[8:], CloseCode.UNSUPPORTED_VERSION),  # version 1
        (PREAMBLE.pack(b"TTHR", 2, 1, 0) + first[8:], CloseCode.HANDSHAKE_FAILED),  # IK rewritten as XX
        (bytes(first[:-1]) + bytes([first[-1] ^ 1]), CloseCode.HANDSHAKE_FAILED),
    ]
    for data, code in cases:
        async with ws_connect(server.url, compression=None, proxy=None) as ws:
            await ws.send(data)
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == code, data[:16]
    await _serves_normally(server, client_keys, server_keys)


async def test_server_detects_a_silent_client(live_server: Any, server_keys: KeyPair, client_keys: KeyPair) -> None:
    server = await live_server(handler_for(Service()), keepalive_interval=0.2, keepalive_timeout=0.3)
    raw = await RawClient.open(server.url, client_keys, server_keys.public)
    # The raw client never answers the server's Pings: the server declares it half-open.
    assert await raw.close_code(timeout=5) == CloseCode.KEEPALIVE_TIMEOUT


async def test_client_detects_a_silent_server(server_keys: KeyPair, client_keys: KeyPair) -> None:
    from websockets.asyncio.server import serve as ws_serve

    async def silent(ws: Any) -> None:
        protocol = ServerProtocol(server_keys)
        while protocol.state.name == "HANDSHAKE":
            protocol.receive_data(await ws.recv())
            for record in protocol.data_to_send():
                await ws.send(record)
        await ws.wait_closed()  # never reads again: our Pings go unanswered

    async with ws_serve(silent, "127.0.0.1", 0, compression=None) as ws_server:
        port = next(iter(ws_server.sockets)).getsockname()[1]
        conn = await connect(f"ws://127.0.0.1:{port}", client_keys, server_public_key=server_keys.public,
                             keepalive_interval=0.2, keepalive_timeout=0.3)
        with pytest.raises(KeepaliveTimeout):
            await conn.request(Rollback(session_id="s", length=1), timeout=5)
        assert conn.closed and conn.close_code == CloseCode.KEEPALIVE_TIMEOUT


async def test_graceful_close_by_the_client(live_server: Any, server_keys: KeyPair, client_keys: KeyPair) -> None:
    closed: list[Any] = []

    async def handle(conn: ServerConnection) -> None:
        await conn.serve_requests(Service())
        await conn.wait_closed()
        closed.append(conn.close_code)

    server = await live_server(handle)
    conn = await open_client(server, client_keys, server_keys)
    await conn.request(TOKENS)
    await conn.close()
    assert conn.closed and conn.close_code == 1000
    with pytest.raises(UsageError, match="closed by this side"):
        await conn.request(TOKENS)
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.01)
    assert closed == [1000]


async def test_flush_returns_when_the_connection_ends_under_it(live_server: Any, server_keys: KeyPair,
                                                               client_keys: KeyPair) -> None:
    # Regression: a flush() waiting while another task finished the connection (cancelling
    # the sender just as it was woken) used to wait forever. It hung `CloudServer.close()`
    # when the drain's close raced the connection handler's own close.
    from tether.protocol import ChannelError

    server = await live_server(handler_for(Service()))
    conn = await open_client(server, client_keys, server_keys)
    await conn.request(TOKENS)
    driver = conn._driver
    flushing = asyncio.create_task(driver.flush())
    await asyncio.sleep(0)  # flush() has queued its waiter and woken the sender
    driver._finish(ChannelError("closed by a racing task"), int(CloseCode.GOING_AWAY))
    await asyncio.wait_for(flushing, timeout=5)
    assert conn.closed


async def test_server_shutdown_lets_requests_finish(live_server: Any, server_keys: KeyPair,
                                                    client_keys: KeyPair) -> None:
    service = Service()
    server = await live_server(handler_for(service))
    conn = await open_client(server, client_keys, server_keys)
    slow = asyncio.create_task(conn.request(Rollback(session_id="s", length=7)))
    await service.started.wait()
    closing = asyncio.create_task(server.close(grace=5.0))
    await asyncio.sleep(0.05)
    with pytest.raises(RemoteError) as refused:
        await conn.request(TOKENS)
    assert refused.value.code == ErrorCode.SHUTTING_DOWN and refused.value.retryable
    service.release.set()
    assert await slow == RolledBack(session_id="s", length=7)
    await closing
    await conn.wait_closed()
    assert conn.close_code == CloseCode.GOING_AWAY
    with pytest.raises(PeerClosed) as info:
        await conn.request(TOKENS)
    assert info.value.code == 1001 and info.value.clean


async def test_rekey_on_a_live_connection(live_server: Any, server_keys: KeyPair, client_keys: KeyPair) -> None:
    server = await live_server(handler_for(Service()), rekey=RekeyPolicy(messages=3))
    async with await open_client(server, client_keys, server_keys, rekey=RekeyPolicy(messages=4)) as conn:
        for _ in range(20):
            assert await conn.request(TOKENS) == Appended(session_id="s", length=3)
        stats = conn.transport_stats
        assert stats["rekeys_sent"] == 5 and stats["rekeys_received"] >= 6


async def test_link_emulator_delay_and_bandwidth(live_server: Any, server_keys: KeyPair,
                                                 client_keys: KeyPair) -> None:
    server = await live_server(handler_for(Service()))
    link = LinkEmulator.symmetric(delay=0.05, seed=1)
    async with await open_client(server, client_keys, server_keys, link=link) as conn:
        rtt = await conn.ping()
        assert 0.1 <= rtt < 0.5
    slow_up = LinkEmulator(up=_profile(bandwidth=2e6))
    async with await open_client(server, client_keys, server_keys, link=slow_up) as conn:
        start = time.monotonic()
        await conn.request(AppendTokens(session_id="s", tokens=np.zeros(50_000, np.int32)))  # 200 KB up
        assert time.monotonic() - start >= 0.75  # 1.6 Mbit at 2 Mbit/s


def _profile(**kwargs: Any) -> Any:
    from tether.protocol import LinkProfile

    return LinkProfile(**kwargs)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_wss_outer_tls_with_noise_inside(live_server: Any, server_keys: KeyPair, client_keys: KeyPair,
                                               tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    server = await live_server(handler_for(Service()), ssl=server_ctx)
    url = f"wss://127.0.0.1:{server.port}"
    for pattern in ("IK", "XX"):
        async with await connect(url, client_keys, server_public_key=server_keys.public, ssl=client_ctx,
                                 pattern=pattern) as conn:
            assert await conn.request(TOKENS) == Appended(session_id="s", length=3)
    with pytest.raises(ServerKeyMismatch):  # TLS is not a substitute for the pin
        await connect(url, client_keys, server_public_key=KeyPair.generate().public, ssl=client_ctx)
    with pytest.raises(ssl.SSLError):  # and the TLS certificate is still verified
        await connect(url, client_keys, server_public_key=server_keys.public, ssl=ssl.create_default_context())


async def test_handler_replying_with_the_wrong_type_gets_internal_error(live_server: Any, server_keys: KeyPair,
                                                                        client_keys: KeyPair) -> None:
    async def handle(conn: ServerConnection) -> None:
        await conn.serve_requests(lambda request: ChatChunk(text="wrong"))

    server = await live_server(handle)
    async with await open_client(server, client_keys, server_keys) as conn:
        with pytest.raises(RemoteError) as info:
            await conn.request(TOKENS)
        assert info.value.code == ErrorCode.INTERNAL


async def test_iterating_a_connection_directly(live_server: Any, server_keys: KeyPair, client_keys: KeyPair) -> None:
    seen: list[str] = []

    async def handle(conn: ServerConnection) -> None:
        async for request in conn:
            seen.append(type(request.message).__name__)
            assert request.peer == client_keys.public
            await request.reply(Appended(session_id="s", length=len(seen)))

    server = await live_server(handle)
    async with await open_client(server, client_keys, server_keys) as conn:
        assert (await conn.request(TOKENS)).length == 1
        assert (await conn.request(TOKENS)).length == 2
    assert seen == ["AppendTokens", "AppendTokens"]



async def test_pin_by_fingerprint(live_server: Any, server_keys: KeyPair, client_keys: KeyPair) -> None:
    """A `SHA256:` fingerprint pins the key too; a different server key is refused by name."""
    server = await live_server(handler_for(Service()))
    async with await open_client(server, client_keys, server_keys,
                                 server_public_key=server_keys.public.fingerprint) as conn:
        assert conn.peer_public_key == server_keys.public
        assert await conn.request(TOKENS) == Appended(session_id="s", length=3)
    other = KeyPair.generate().public.fingerprint
    with pytest.raises(ServerKeyMismatch) as mismatch:
        await open_client(server, client_keys, server_keys, server_public_key=other)
    assert mismatch.value.expected == other
    assert mismatch.value.actual == server_keys.public.fingerprint
