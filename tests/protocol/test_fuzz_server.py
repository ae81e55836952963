"""Fuzz a live server with >= 10,000 random and mutated frames, before and after the handshake.

Every counted frame reaches the server's parser: each connection sends valid random
requests first and its one random or mutated frame last (then a frame that is refused in
any state, in case the mutation left a valid message). Every refusal has to be a protocol
close code (never 1011, never an exception in the server loop), and afterwards a normal
client is still served.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import struct
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from protocolkit import RawClient
from tether.protocol import (
    Appended,
    AppendTokens,
    Chat,
    ChatMessage,
    ClientProtocol,
    CloseCode,
    ContinueHidden,
    ErrorCode,
    Generate,
    KeyPair,
    Limits,
    Message,
    OpenSession,
    Request,
    RequestFailed,
    Rollback,
    ScoreTokens,
    ServerConnection,
    Tensor,
    VerifyDraft,
    connect,
)
from tether.protocol._frames import encode_frame

pytestmark = pytest.mark.slow

TARGET_FRAMES = 10_000
PRE_CONNECTIONS = 1200  # one random or mutated handshake message each (+ XX: valid msg1, mutated msg3)
POST_CONNECTIONS = 1000
POST_VALID = 8  # per authenticated connection: random valid requests, then one mutated frame
WORKERS = 6

# Codes a refusal may carry: handshake and protocol errors, or the websocket layer's size cap.
ALLOWED = {int(c) for c in CloseCode if 4000 <= c < 4050} | {int(CloseCode.MESSAGE_TOO_BIG)}


async def fuzz_handler(conn: ServerConnection) -> None:
    async def on_request(request: Request) -> Any:
        message = request.message
        if isinstance(message, AppendTokens):
            return Appended(session_id=message.session_id, length=int(message.tokens.shape[0]))
        raise RequestFailed(ErrorCode.UNSUPPORTED, "fuzz server")

    await conn.serve_requests(on_request)


def random_request(rng: random.Random) -> Message:
    sid = f"s{rng.randrange(1000)}"
    tokens = np.array([rng.randrange(2**31) for _ in range(rng.randrange(1, 12))], np.int32)
    kind = rng.randrange(8)
    if kind == 0:
        return AppendTokens(session_id=sid, tokens=tokens)
    if kind == 1:
        m = rng.randrange(1, 5)
        indices = np.array([[t] + [rng.randrange(1000) for _ in range(m - 1)] for t in tokens], np.int32)
        probs = np.array([[rng.random() for _ in range(m)] for _ in tokens], np.float32)
        return VerifyDraft(session_id=sid, tokens=tokens, draft_indices=indices, draft_probs=probs)
    if kind == 2:
        return ScoreTokens(session_id=sid, tokens=tokens, top_k=rng.randrange(10))
    if kind == 3:
        return Generate(session_id=sid, max_new_tokens=rng.randrange(1, 100))
    if kind == 4:
        hidden = np.array([[rng.uniform(-3, 3) for _ in range(8)] for _ in range(3)], np.float32)
        return ContinueHidden(session_id=sid, layer=rng.randrange(30), compression="int8",
                              hidden=Tensor.int8_rowwise(hidden))
    if kind == 5:
        return Chat(messages=(ChatMessage(role="user", content="x" * rng.randrange(50)),), max_tokens=5)
    if kind == 6:
        return OpenSession(model="tiny", seed=rng.randrange(100), prompt=tokens)
    return Rollback(session_id=sid, length=rng.randrange(100))


def mutate(data: bytes, rng: random.Random) -> bytes:
    raw = bytearray(data)
    op = rng.randrange(7)
    if op == 0 and raw:  # flip a bit
        i = rng.randrange(len(raw))
        raw[i] ^= 1 << rng.randrange(8)
    elif op == 1 and raw:  # overwrite a byte
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    elif op == 2 and raw:  # truncate
        del raw[rng.randrange(len(raw)) :]
    elif op == 3:  # append junk
        raw += rng.randbytes(rng.randrange(1, 64))
    elif op == 4 and len(raw) >= 24:  # rewrite one header field of a frame
        field = rng.choice([(0, "B"), (1, "B"), (2, "H"), (4, "H"), (16, "I"), (20, "I")])
        struct.pack_into("<" + field[1], raw, field[0], rng.randrange(256 ** struct.calcsize(field[1])))
    elif op == 5 and len(raw) > 8:  # splice a random chunk in the middle
        i = rng.randrange(len(raw))
        raw[i:i] = rng.randbytes(rng.randrange(1, 16))
    else:  # replace everything with noise
        raw = bytearray(rng.randbytes(rng.randrange(0, 200)))
    return bytes(raw)


class Tally:
    def __init__(self) -> None:
        self.frames = 0
        self.codes: collections.Counter[int] = collections.Counter()


async def _close_code(ws: Any, timeout: float = 10.0) -> int:
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return int(exc.rcvd.code) if exc.rcvd is not None else int(CloseCode.ABNORMAL)


async def pre_handshake(url: str, client_keys: KeyPair, server_keys: KeyPair, rng: random.Random,
                        tally: Tally) -> None:
    pattern = rng.choice(["IK", "XX"])
    protocol = ClientProtocol(client_keys, server_keys.public, pattern=pattern)
    (first,) = protocol.data_to_send()
    async with ws_connect(url, compression=None, proxy=None, ping_interval=None) as ws:
        if pattern == "XX" and rng.random() < 0.3:
            await ws.send(first)  # a valid message 1, then a mutated message 3
            tally.frames += 1
            protocol.receive_data(await ws.recv())
            (third,) = protocol.data_to_send()
            await ws.send(mutate(third, rng))
        else:
            await ws.send(mutate(first, rng) if rng.random() < 0.7 else rng.randbytes(rng.randrange(0, 300)))
        tally.frames += 1
        # A mutation can leave a valid message (a changed ephemeral key is still a key): the
        # server then waits for the next one. One byte more is refused in any state.
        with contextlib.suppress(ConnectionClosed):
            await ws.send(b"\x00")
        tally.codes[await _close_code(ws)] += 1


async def post_handshake(url: str, client_keys: KeyPair, server_keys: KeyPair, rng: random.Random,
                         tally: Tally) -> None:
    """Random valid requests (all processed), then one mutated frame, then a replay as a backstop."""
    raw = await RawClient.open(url, client_keys, server_keys.public, pattern=rng.choice(["IK", "XX"]))
    record = b""
    for _ in range(POST_VALID):
        record = bytes(raw.seal(random_request(rng)))
        await raw.ws.send(record)
        tally.frames += 1
    if rng.random() < 0.65:  # a mutated frame, correctly encrypted: it reaches the frame parser
        frame = encode_frame(random_request(rng), request_id=raw.next_request_id).tobytes()
        raw.next_request_id += 1
        mutated = bytes(raw.seal_plaintext(mutate(frame, rng)))
    else:  # a mutated record: counter, length or ciphertext damaged
        mutated = mutate(bytes(raw.seal(random_request(rng))), rng)
    await raw.ws.send(mutated)
    tally.frames += 1
    with contextlib.suppress(ConnectionClosed):  # if the mutation left a valid frame
        await raw.ws.send(record)
    tally.codes[await _close_code(raw.ws)] += 1


async def test_fuzz_live_server(live_server: Any, server_keys: KeyPair, client_keys: KeyPair,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)  # thousands of expected WARNING closes are not kept
    server = await live_server(fuzz_handler, limits=Limits(max_frame_bytes=256 * 1024))
    rng = random.Random(20240604)
    tally = Tally()
    jobs: asyncio.Queue[Any] = asyncio.Queue()
    for _ in range(PRE_CONNECTIONS):
        jobs.put_nowait(pre_handshake)
    for _ in range(POST_CONNECTIONS):
        jobs.put_nowait(post_handshake)

    async def worker(seed: int) -> None:
        local = random.Random(seed)
        while not jobs.empty():
            job = jobs.get_nowait()
            await job(server.url, client_keys, server_keys, local, tally)

    await asyncio.gather(*(worker(rng.randrange(2**32)) for _ in range(WORKERS)))

    assert tally.frames >= TARGET_FRAMES, tally.frames
    unexpected = {code: n for code, n in tally.codes.items() if code not in ALLOWED}
    assert not unexpected, f"connections closed with unexpected codes: {unexpected}"
    assert sum(tally.codes.values()) == PRE_CONNECTIONS + POST_CONNECTIONS
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:5]
    # The server is still healthy: a normal client is served.
    async with await connect(server.url, client_keys, server_public_key=server_keys.public) as conn:
        assert await conn.request(AppendTokens(session_id="s", tokens=[1, 2])) == Appended(session_id="s", length=2)
    print(f"\nfuzz: {tally.frames} frames over {PRE_CONNECTIONS + POST_CONNECTIONS} connections; "
          f"close codes {dict(sorted(tally.codes.items()))}")
