"""`RemoteCloudSession` checks what a server replies before believing it (a lying server is
served by the plain protocol here, so the checks are seen from the device's side only)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from tether.contract import BackendError, InvalidReply, SamplingParams, SessionEvicted
from tether.edge import RemoteCloud
from tether.protocol import (
    OPERATIONS,
    ErrorCode,
    Generate,
    Generated,
    KeyPair,
    OpenSession,
    Operation,
    RequestFailed,
    RolledBack,
    Rollback,
    ServerConnection,
    SessionOpened,
    Verified,
    VerifyDraft,
    serve,
)

VOCAB = 100


class LyingServer:
    """Answers verify with whatever `accepted` / `next_token` it is told to."""

    def __init__(self, *, accepted_extra: int = 0, next_token: int = 7, evict: str | None = None) -> None:
        self.accepted_extra = accepted_extra
        self.next_token = next_token
        self.evict = evict

    async def handle(self, conn: ServerConnection) -> None:
        await conn.serve_requests(self.reply)

    def reply(self, request: Any) -> Any:
        msg = request.message
        if isinstance(msg, OpenSession):
            return SessionOpened(session_id="s1", model="m", vocab_size=VOCAB, max_context=64,
                                 capabilities=("verify", "generate"), length=0)
        if self.evict is not None:
            raise RequestFailed(ErrorCode.SESSION_EVICTED, "session s1 was evicted", reason=self.evict)
        if isinstance(msg, VerifyDraft):
            k = int(msg.tokens.shape[0])
            return Verified(session_id="s1", accepted=k + self.accepted_extra if self.accepted_extra else k - 1,
                            next_token=self.next_token, length=k + 1)
        if isinstance(msg, Generate):
            return self._stream()
        if isinstance(msg, Rollback):
            return RolledBack(session_id="s1", length=msg.length)
        raise RequestFailed(ErrorCode.UNSUPPORTED, "not here")

    async def _stream(self) -> AsyncIterator[Any]:
        yield Generated(session_id="s1", length=1, finish_reason="length",
                        tokens=np.asarray([self.next_token], dtype=np.int64))


async def _session(server: LyingServer) -> tuple[Any, Any, Any]:
    keys = KeyPair.generate()
    srv = await serve(server.handle, "127.0.0.1", 0, server_keys=keys, capabilities=("verify", "generate"),
                      models=("m",))
    cloud = await RemoteCloud.connect(srv.url, KeyPair.generate(), server_public_key=keys.public)
    session = await cloud.new_session()
    await session.open(sampling=SamplingParams())
    return srv, cloud, session


async def _close(srv: Any, cloud: Any) -> None:
    await cloud.aclose()
    await srv.close()


async def test_an_honest_reply_is_believed() -> None:
    srv, cloud, session = await _session(LyingServer())
    try:
        r = await session.verify([1, 2, 3])
        assert (r.accepted, r.next_token, r.is_bonus, r.length) == (2, 7, False, 4)
    finally:
        await _close(srv, cloud)


async def test_more_accepted_than_drafted_is_an_invalid_reply() -> None:
    srv, cloud, session = await _session(LyingServer(accepted_extra=2))
    try:
        with pytest.raises(InvalidReply, match="accepted 5 tokens of a 3-token draft"):
            await session.verify([1, 2, 3])
    finally:
        await _close(srv, cloud)


@pytest.mark.parametrize("token", [VOCAB, VOCAB + 10_000])
async def test_a_token_outside_the_vocabulary_is_an_invalid_reply(token: int) -> None:
    srv, cloud, session = await _session(LyingServer(next_token=token))
    try:
        with pytest.raises(InvalidReply, match=f"token id {token}, outside the vocabulary of {VOCAB}"):
            await session.verify([1, 2, 3])
        with pytest.raises(InvalidReply, match="outside the vocabulary"):
            async for _ in session.generate(1):
                pass
        assert issubclass(InvalidReply, BackendError)  # the link policy abandons such a session
    finally:
        await _close(srv, cloud)


@pytest.mark.parametrize("reason", ["idle", "shutdown", "memory"])
async def test_the_eviction_reason_travels_as_a_field(reason: str) -> None:
    srv, cloud, session = await _session(LyingServer(evict=reason))
    try:
        with pytest.raises(SessionEvicted) as info:
            await session.verify([1])
        assert info.value.reason == reason and f"({reason})" not in str(info.value)
    finally:
        await _close(srv, cloud)


async def test_a_new_table_row_reaches_the_device_with_no_edit_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operation is its table row: the remote session forwards a row it has no method for."""
    row = Operation("truncate", Rollback, lambda sid, n: Rollback(session_id=sid, length=n),
                    lambda m, b: ((m.length,), {}),
                    lambda sid, n, m, c: RolledBack(session_id=sid, length=n),
                    lambda reply, m, info: reply.length)
    monkeypatch.setitem(OPERATIONS, "truncate", row)
    srv, cloud, session = await _session(LyingServer())
    try:
        assert await session.truncate(3) == 3 and session.length == 3
        with pytest.raises(AttributeError):
            session.not_an_operation  # noqa: B018 - the lookup itself must fail
    finally:
        await _close(srv, cloud)
