"""Hostile clients: a fuzz campaign of frames and a catalogue of malformed requests.

What belongs here: what a hostile or broken client sends to a `tether serve` (or any
`CloudServer`) and how the server's answer is classified. Used by `tether bench soak`
(the full 10,000-frame campaign) and by tests/reliability (a smaller count). Nothing here
needs the server's internals: it speaks the real protocol over a real socket.

A server passes when every hostile input ends in a clear refusal: an `ErrorReply` whose
code is not INTERNAL, or a close with one of the protocol's own close codes (never 1011,
never a dropped connection), and a normal client is served afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tether.protocol import (
    AppendTokens,
    Chat,
    ChatMessage,
    ClientProtocol,
    CloseCode,
    ContinueHidden,
    ErrorCode,
    ErrorReply,
    Generate,
    KeyPair,
    Message,
    OpenSession,
    PublicKey,
    Rollback,
    ScoreTokens,
    Tensor,
    VerifyDraft,
)
from tether.protocol._frames import HEADER, encode_frame
from tether.protocol._session import ReplyReceived

__all__ = [
    "CLEAN_CLOSE_CODES",
    "CaseResult",
    "FuzzReport",
    "HostileClient",
    "fuzz_campaign",
    "hypothesis_frames",
    "malformed_cases",
    "mutate",
    "open_handshaken",
    "run_malformed",
]

# A refusal may close with a handshake or protocol code, or the websocket layer's size cap.
CLEAN_CLOSE_CODES = frozenset({int(c) for c in CloseCode if 4000 <= c < 4100} | {int(CloseCode.MESSAGE_TOO_BIG)})


def _close_code_of(exc: BaseException) -> int:
    rcvd = getattr(exc, "rcvd", None)
    return int(rcvd.code) if rcvd is not None else int(CloseCode.ABNORMAL)


async def open_handshaken(url: str, keys: KeyPair, server_key: Any, *, pattern: str = "IK",
                          **protocol_options: Any) -> tuple[Any, ClientProtocol]:
    """A raw websocket and a `ClientProtocol` whose Noise handshake is complete: what a
    client that wants to send its own records (hostile or hand-built) starts from.

    Like `connect()`, it retries an IK handshake the server refused as not newer than
    another of this key's (concurrent handshakes of one key may cross on the way)."""
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed

    for attempt in range(3):
        ws = await ws_connect(url, compression=None, max_size=None, ping_interval=None, proxy=None)
        protocol = ClientProtocol(keys, server_key, pattern=pattern, **protocol_options)
        try:
            for record in protocol.data_to_send():
                await ws.send(record)
            while protocol.state.name == "HANDSHAKE":
                protocol.receive_data(await ws.recv())
                for record in protocol.data_to_send():
                    await ws.send(record)
        except ConnectionClosed as exc:
            await ws.close()
            if _close_code_of(exc) == CloseCode.HANDSHAKE_REPLAYED and attempt < 2:
                continue
            raise
        except BaseException:
            await ws.close()
            raise
        return ws, protocol
    raise AssertionError("unreachable")


class HostileClient:
    """A client that completes a real handshake, then sends what it likes.

    Valid requests go through the protocol (`request`); anything else is sealed as a
    correctly encrypted record around arbitrary plaintext (`send_plaintext`), so it
    reaches the server's frame parser, or sent raw (`send_raw`).
    """

    def __init__(self, ws: Any, protocol: ClientProtocol) -> None:
        self.ws = ws
        self.protocol = protocol

    @classmethod
    async def open(cls, url: str, keys: KeyPair, server_key: PublicKey, *, pattern: str = "IK") -> HostileClient:
        return cls(*await open_handshaken(url, keys, server_key, pattern=pattern))

    async def _flush(self) -> None:
        for record in self.protocol.data_to_send():
            await self.ws.send(bytes(record))

    async def send(self, message: Message) -> int:
        """Send a request without waiting; returns its request id."""
        request_id = self.protocol.send_request(message)
        await self._flush()
        return request_id

    async def request(self, message: Message, *, timeout: float = 30.0) -> Message:
        """Send a request and return its final reply (an `ErrorReply` is returned, not raised)."""
        request_id = await self.send(message)
        async with asyncio.timeout(timeout):
            while True:
                for event in self.protocol.receive_data(await self.ws.recv()):
                    if isinstance(event, ReplyReceived) and event.request_id == request_id and event.end:
                        return event.message
                await self._flush()  # pongs, rekeys

    async def send_plaintext(self, plaintext: bytes) -> None:
        assert self.protocol.transport is not None
        await self.ws.send(bytes(self.protocol.transport.seal_plaintext(plaintext)))

    async def send_raw(self, data: bytes) -> None:
        await self.ws.send(data)

    async def close_code(self, timeout: float = 10.0) -> int:
        """Read until the server closes; the close code it sent (1006: none; -1: still open)."""
        from websockets.exceptions import ConnectionClosed

        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        except ConnectionClosed as exc:
            return _close_code_of(exc)
        except TimeoutError:
            return -1  # still open

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()


# -- the fuzz campaign ------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation: a bit flip, a byte, a truncation, junk, a header field, a splice or noise."""
    raw = bytearray(data)
    op = rng.randrange(7)
    if op == 0 and raw:
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif op == 1 and raw:
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    elif op == 2 and raw:
        del raw[rng.randrange(len(raw)):]
    elif op == 3:
        raw += rng.randbytes(rng.randrange(1, 64))
    elif op == 4 and len(raw) >= HEADER.size:
        offset, fmt = rng.choice([(0, "B"), (1, "B"), (2, "H"), (4, "H"), (16, "I"), (20, "I")])
        struct.pack_into("<" + fmt, raw, offset, rng.randrange(256 ** struct.calcsize(fmt)))
    elif op == 5 and len(raw) > 8:
        i = rng.randrange(len(raw))
        raw[i:i] = rng.randbytes(rng.randrange(1, 16))
    else:
        raw = bytearray(rng.randbytes(rng.randrange(0, 200)))
    return bytes(raw)


def random_request(rng: random.Random, session_id: str, vocab: int, model: str) -> Message:
    """A well-formed request with random (often out-of-range or nonsensical) values."""
    n = rng.randrange(1, 12)
    big = rng.random() < 0.2
    tokens = np.array([rng.randrange(2**31 - 1) if big else rng.randrange(vocab) for _ in range(n)], np.int32)
    kind = rng.randrange(8)
    if kind == 0:
        return AppendTokens(session_id=session_id, tokens=tokens)
    if kind == 1:
        m = rng.randrange(1, 5)
        idx = np.array([[t] + [rng.randrange(vocab) for _ in range(m - 1)] for t in tokens], np.int32)
        probs = np.array([[rng.choice([rng.random(), 0.0, 1.0]) for _ in range(m)] for _ in tokens], np.float32)
        return VerifyDraft(session_id=session_id, tokens=tokens, draft_indices=idx, draft_probs=probs)
    if kind == 2:
        return ScoreTokens(session_id=session_id, tokens=tokens, top_k=rng.randrange(40))
    if kind == 3:
        return Generate(session_id=session_id, max_new_tokens=rng.choice([1, 2, 3, 10**6]))
    if kind == 4:
        rows = rng.randrange(1, 4)
        width = rng.choice([8, 64, 65])
        hidden = np.array([[rng.choice([rng.uniform(-3, 3), float("nan"), float("inf")]) for _ in range(width)]
                           for _ in range(rows)], np.float32)
        return ContinueHidden(session_id=session_id, layer=rng.randrange(0, 30), compression="fp32",
                              hidden=Tensor.from_numpy(hidden))
    if kind == 5:
        return Chat(messages=(ChatMessage(role=rng.choice(["user", "system", "assistant"]), content="x" * rng.randrange(40)),),
                    max_tokens=rng.choice([1, 2, 10**6]))
    if kind == 6:
        return OpenSession(model=rng.choice(["nope", model]), seed=rng.randrange(100), prompt=tokens)
    return Rollback(session_id=session_id, length=rng.randrange(0, 100))


def hypothesis_frames(count: int, seed: int) -> list[bytes]:
    """`count` plaintext frames drawn by hypothesis: a 24-byte header with arbitrary fields
    (message type, tensor count, lengths, flags, version) over random descriptors and
    payload, biased towards the known types and small lengths that reach deep checks."""
    from hypothesis import HealthCheck, Phase, given, seed as hyp_seed, settings
    from hypothesis import strategies as st

    from tether.protocol import CATALOGUE

    types = sorted(int(t) for t in CATALOGUE) if isinstance(CATALOGUE, dict) else list(range(1, 40))
    header = st.tuples(
        st.one_of(st.just(1), st.integers(0, 255)),  # version
        st.one_of(st.just(0), st.integers(0, 255)),  # flags
        st.one_of(st.sampled_from(types), st.integers(0, 65535)),  # type
        st.one_of(st.integers(0, 4), st.integers(0, 65535)),  # tensor count
        st.one_of(st.just(0), st.integers(0, 65535)),  # reserved
        st.integers(0, 2**64 - 1),  # request id (replaced below when small)
        st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),  # metadata length
        st.one_of(st.just(0), st.integers(0, 2**32 - 1)),  # padding length
    )
    descriptor = st.tuples(st.integers(0, 8), st.integers(0, 12), st.integers(0, 9), st.just(0), st.just(0),
                           st.one_of(st.integers(0, 4096), st.integers(0, 2**64 - 1)))
    body = st.tuples(header, st.lists(descriptor, max_size=3), st.lists(st.integers(0, 2**32 - 1), max_size=6),
                     st.one_of(st.just(b"{}"), st.binary(max_size=64),
                               st.text(max_size=40).map(lambda t: t.encode("utf-8", "replace"))),
                     st.binary(max_size=256))
    frames: list[bytes] = []

    @hyp_seed(seed)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(body)
    def collect(parts: Any) -> None:
        (version, flags, type_id, count, reserved, request_id, meta_len, padding), descs, dims, meta, payload = parts
        out = bytearray(HEADER.pack(version, flags, type_id, count, reserved, request_id, meta_len, padding))
        for slot, dtype, ndim, z1, z2, nbytes in descs:
            out += struct.pack("<BBBBIQ", slot, dtype, ndim, z1, z2, nbytes)
            out += b"".join(struct.pack("<I", d) for d in dims[:ndim])
            out += bytes((-len(out)) & 7)
        out += meta + bytes((-len(meta)) & 7) + payload
        frames.append(bytes(out))

    collect()
    return frames


@dataclass
class FuzzReport:
    """What a fuzz campaign sent and how the server answered.

    Attributes:
        frames: frames that reached the server (handshake messages and records).
        hostile: of those, the random, mutated or hypothesis-drawn ones.
        connections: connections opened.
        close_codes: close code -> connections it ended.
        replies: ErrorCode name (or "ok") -> replies to the requests sent.
        unclean: connections that ended without a clean protocol refusal (1006, 1011, ...).
    """

    frames: int = 0
    hostile: int = 0
    connections: int = 0
    close_codes: collections.Counter[int] = field(default_factory=collections.Counter)
    replies: collections.Counter[str] = field(default_factory=collections.Counter)
    unclean: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "hostile_frames": self.hostile, "connections": self.connections,
                "close_codes": {str(k): v for k, v in sorted(self.close_codes.items())},
                "replies": dict(sorted(self.replies.items())), "unclean_closes": self.unclean}


async def _ws_close_code(ws: Any, timeout: float) -> int:
    from websockets.exceptions import ConnectionClosed

    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return _close_code_of(exc)
    except TimeoutError:
        return -1  # the server kept the connection open: counted as unclean


def _tally_close(report: FuzzReport, code: int) -> None:
    report.close_codes[code] += 1
    if code not in CLEAN_CLOSE_CODES:
        report.unclean += 1


async def _pre_handshake(url: str, keys: KeyPair, server_key: PublicKey, rng: random.Random,
                         report: FuzzReport) -> None:
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed

    pattern = rng.choice(["IK", "XX"])
    protocol = ClientProtocol(keys, server_key, pattern=pattern)
    (first,) = protocol.data_to_send()
    report.connections += 1
    async with ws_connect(url, compression=None, proxy=None, ping_interval=None) as ws:
        if pattern == "XX" and rng.random() < 0.3:
            await ws.send(first)  # a valid message 1, then a mutated message 3
            report.frames += 1
            protocol.receive_data(await ws.recv())
            third = protocol.data_to_send()[0]  # message 3 (the Hello record follows it)
            await ws.send(mutate(bytes(third), rng))
        else:
            await ws.send(mutate(bytes(first), rng) if rng.random() < 0.7 else rng.randbytes(rng.randrange(300)))
        report.frames += 1
        report.hostile += 1
        # A mutation may leave a valid message (a changed ephemeral key is still a key): one
        # byte more is refused in any state.
        with contextlib.suppress(ConnectionClosed):
            await ws.send(b"\x00")
        _tally_close(report, await _ws_close_code(ws, 15.0))


async def _post_handshake(url: str, keys: KeyPair, server_key: PublicKey, rng: random.Random,
                          report: FuzzReport, corpus: list[bytes], vocab: int, model: str, valid: int) -> None:
    """Open a session, send `valid` random well-formed requests (each answered), then one
    hostile frame: from the hypothesis corpus, a mutated frame, or a mutated record."""
    from websockets.exceptions import ConnectionClosed

    report.connections += 1
    client = await HostileClient.open(url, keys, server_key, pattern=rng.choice(["IK", "XX"]))
    try:
        opened = await client.request(OpenSession(model=model, prompt=np.array([1, 2, 3], np.int32)))
        report.frames += 1
        session_id = getattr(opened, "session_id", "s")
        report.replies["ok" if not isinstance(opened, ErrorReply) else ErrorCode(opened.code).name] += 1
        for _ in range(valid):
            reply = await client.request(random_request(rng, session_id, vocab, model))
            report.frames += 1
            report.replies["ok" if not isinstance(reply, ErrorReply) else ErrorCode(reply.code).name] += 1
        choice = rng.random()
        if corpus and choice < 0.4:
            await client.send_plaintext(corpus.pop())
        elif choice < 0.75:
            frame = encode_frame(random_request(rng, session_id, vocab, model), request_id=1 << 40).tobytes()
            await client.send_plaintext(mutate(frame, rng))
        else:
            assert client.protocol.transport is not None
            record = bytes(client.protocol.transport.seal_plaintext(
                encode_frame(random_request(rng, session_id, vocab, model), request_id=1 << 40).tobytes()))
            await client.send_raw(mutate(record, rng))
        report.frames += 1
        report.hostile += 1
        # If the hostile frame happened to be acceptable, a replayed record ends it for sure.
        with contextlib.suppress(ConnectionClosed):
            await client.send_raw(b"\x00" * 40)
        _tally_close(report, await client.close_code(15.0))
    finally:
        await client.aclose()


async def fuzz_campaign(
    url: str,
    keys: KeyPair,
    server_key: PublicKey,
    *,
    frames: int,
    vocab: int,
    model: str,
    seed: int = 20260601,
    workers: int = 6,
    valid_per_connection: int = 4,
    progress: Callable[[int], None] | None = None,
) -> FuzzReport:
    """Send at least `frames` frames: about a third before the handshake (one hostile
    handshake message per connection), the rest after it (a session, well-formed random
    requests, then one hostile frame per connection; 40% of those drawn by hypothesis)."""
    from websockets.exceptions import ConnectionClosed

    rng = random.Random(seed)
    pre = max(1, frames // 3)
    post = max(1, (frames - pre) // (valid_per_connection + 2) + 1)
    corpus = hypothesis_frames(int(post * 0.4) + 1, seed)
    report = FuzzReport()
    jobs: collections.deque[str] = collections.deque(["pre"] * pre + ["post"] * post)
    rng.shuffle(jobs)  # type: ignore[arg-type]

    async def worker(worker_seed: int) -> None:
        local = random.Random(worker_seed)
        while jobs:
            job = jobs.popleft()
            before = report.frames
            try:
                if job == "pre":
                    await _pre_handshake(url, keys, server_key, local, report)
                else:
                    await _post_handshake(url, keys, server_key, local, report, corpus, vocab, model,
                                          valid_per_connection)
            except ConnectionClosed as exc:  # closed during a well-formed step: by what code?
                _tally_close(report, _close_code_of(exc))
            except (OSError, TimeoutError):  # the server failed to answer a well-formed step
                report.unclean += 1
                report.close_codes[-2] += 1
            if progress is not None:
                progress(report.frames - before)

    await asyncio.gather(*(worker(rng.randrange(2**32)) for _ in range(workers)))
    return report


# -- malformed requests ----------------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    """How the server answered one malformed request.

    outcome: "error" (an ErrorReply; `code` is its ErrorCode name), "closed" (the
    connection was closed; `code` is the close code name) or "accepted" (a normal reply).
    """

    name: str
    outcome: str
    code: str
    message: str

    @property
    def clean(self) -> bool:
        if self.outcome == "error":
            return self.code != "INTERNAL"
        if self.outcome == "closed":
            return self.code in {CloseCode(c).name for c in CLEAN_CLOSE_CODES}
        return self.name in SERVED_UP_TO_THE_LIMIT


#: Cases a correct server answers normally: a generate asking for more tokens than the
#: session has room for is served up to the limit (finish_reason "length"), not refused.
SERVED_UP_TO_THE_LIMIT = frozenset({"generate 10^9 tokens"})


def malformed_cases(*, vocab: int, hidden_size: int, max_tokens: int, model: str) -> list[tuple[str, Any]]:
    """(name, build) pairs; build(session_id) returns the plaintext frame a hostile client sends.

    Frames are encoded without the checks our message constructors make (`_unchecked`),
    so values the SDK would refuse to send still reach the server.
    """
    ok = np.array([1, 2, 3], np.int32)
    row = np.ones((1, hidden_size), np.float32)

    def hidden(values: np.ndarray, *, layer: int = 2, compression: str = "fp32") -> Callable[[str], bytes]:
        dtype = np.float16 if compression == "fp16" else np.float32
        return lambda sid: _unchecked(ContinueHidden, session_id=sid, layer=layer, compression=compression,
                                      hidden=Tensor.from_numpy(values.astype(dtype)), top_k=0, tokens=None)

    huge_tensor = bytearray(encode_frame(AppendTokens(session_id="s", tokens=ok), request_id=1 << 40).tobytes())
    struct.pack_into("<Q", huge_tensor, HEADER.size + 8, 2**62)  # the first descriptor's nbytes
    huge_meta = bytearray(huge_tensor[:HEADER.size])
    struct.pack_into("<I", huge_meta, 16, 2**32 - 1)  # metadata_length
    return [
        ("hidden state with NaN", hidden(np.where(np.arange(hidden_size) == 3, np.nan, row))),
        ("hidden state with +Inf", hidden(np.where(np.arange(hidden_size) == 5, np.inf, row))),
        ("hidden state NaN in fp16", hidden(np.full((1, hidden_size), np.nan), compression="fp16")),
        ("hidden state of the wrong width", hidden(np.ones((1, hidden_size + 1)))),
        ("hidden state of rank 3", lambda sid: _unchecked(
            ContinueHidden, session_id=sid, layer=2, compression="fp32", top_k=0, tokens=None,
            hidden=Tensor.from_numpy(np.ones((1, 1, hidden_size), np.float32)))),
        ("hidden state at a layer past the model", hidden(row, layer=10_000)),
        ("hidden state at a negative layer", hidden(row, layer=-1)),
        ("token id past the vocabulary", lambda sid: _unchecked(
            AppendTokens, session_id=sid, tokens=np.array([vocab + 7], np.int32))),
        ("negative token id", lambda sid: _unchecked(AppendTokens, session_id=sid, tokens=np.array([-3], np.int32))),
        ("token ids as float32", lambda sid: _unchecked(AppendTokens, session_id=sid, tokens=np.ones(3, np.float32))),
        ("draft token past the vocabulary", lambda sid: _unchecked(
            VerifyDraft, session_id=sid, tokens=np.array([2**31 - 1], np.int32))),
        ("draft probabilities NaN", lambda sid: _unchecked(
            VerifyDraft, session_id=sid, tokens=np.array([5], np.int32), draft_indices=np.array([[5]], np.int32),
            draft_probs=np.array([[np.nan]], np.float32))),
        ("draft rows disagree with the tokens", lambda sid: _unchecked(
            VerifyDraft, session_id=sid, tokens=np.array([5, 6], np.int32), draft_indices=np.array([[5]], np.int32),
            draft_probs=np.array([[0.5]], np.float32))),
        ("oversized prompt", lambda sid: _unchecked(
            OpenSession, model=model, prompt=np.ones(max_tokens + 10, np.int32))),
        ("oversized append", lambda sid: _unchecked(
            AppendTokens, session_id=sid, tokens=np.ones(max_tokens + 10, np.int32))),
        ("generate 10^9 tokens", lambda sid: _unchecked(Generate, session_id=sid, max_new_tokens=10**9)),
        ("generate -1 tokens", lambda sid: _unchecked(Generate, session_id=sid, max_new_tokens=-1)),
        ("score with top_k 10^6", lambda sid: _unchecked(ScoreTokens, session_id=sid, tokens=ok, top_k=10**6)),
        ("rollback to -1", lambda sid: _unchecked(Rollback, session_id=sid, length=-1)),
        ("rollback past the end", lambda sid: _unchecked(Rollback, session_id=sid, length=10**6)),
        ("chat asking for 10^9 tokens", lambda sid: _unchecked(
            Chat, messages=(ChatMessage(role="user", content="hi"),), max_tokens=10**9)),
        ("chat with an unknown role", lambda sid: _unchecked(
            Chat, messages=(ChatMessage(role="user", content="hi"),), max_tokens=2,
            model=model).replace(b'"user"', b'"root"')),
        ("unknown session", lambda sid: _unchecked(AppendTokens, session_id="no-such-session", tokens=ok)),
        ("unknown model", lambda sid: _unchecked(OpenSession, model="no-such-model", prompt=None)),
        ("tensor declaring 2^62 bytes", lambda sid: bytes(huge_tensor)),
        ("metadata declaring 4 GiB", lambda sid: bytes(huge_meta)),
    ]


def _unchecked(cls: type[Message], **fields: Any) -> bytes:
    """A frame of `cls` with `fields` as given, skipping the checks its constructor makes
    (a hostile client does not use our encoder's validation). Request id 2^40."""
    message = object.__new__(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in fields:
            value = fields[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        object.__setattr__(message, f.name, value)
    return encode_frame(message, request_id=1 << 40).tobytes()


async def _answer(client: HostileClient, timeout: float = 30.0) -> tuple[str, str, str]:
    """The server's answer to a frame sent with request id 2^40: read at the transport level
    (the client's session layer does not know that request)."""
    from websockets.exceptions import ConnectionClosed

    transport = client.protocol.transport
    assert transport is not None
    try:
        async with asyncio.timeout(timeout):
            while True:
                frame = transport.open(await client.ws.recv())
                if frame is None or frame.request_id != 1 << 40 or not frame.end:
                    continue
                if isinstance(frame.message, ErrorReply):
                    return "error", ErrorCode(frame.message.code).name, frame.message.message
                return "accepted", type(frame.message).__name__, ""
    except ConnectionClosed as exc:
        return "closed", _code_name(_close_code_of(exc)), ""
    except TimeoutError:
        return "no answer", "", f"nothing within {timeout:g} s"


async def run_malformed(url: str, keys: KeyPair, server_key: PublicKey, *, vocab: int, hidden_size: int,
                        max_tokens: int, model: str) -> list[CaseResult]:
    """Send each malformed case on a fresh connection that holds an open session (an empty
    one for the hidden-state cases: split computing starts from no tokens)."""
    results: list[CaseResult] = []
    for name, build in malformed_cases(vocab=vocab, hidden_size=hidden_size, max_tokens=max_tokens, model=model):
        client = await HostileClient.open(url, keys, server_key)
        try:
            prompt = None if name.startswith("hidden") else np.array([1, 2, 3], np.int32)
            opened = await client.request(OpenSession(model=model, prompt=prompt))
            await client.send_plaintext(build(getattr(opened, "session_id", "s")))
            results.append(CaseResult(name, *await _answer(client)))
        finally:
            await client.aclose()
    return results


def _code_name(code: int) -> str:
    try:
        return CloseCode(code).name
    except ValueError:
        return str(code)
