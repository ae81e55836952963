"""Fuzz a live protocol server with >= 10,000 random and mutated frames, before and after the handshake.

The hostile client is the soak's (`benchmarks.hostile.fuzz_campaign`), here against a bare
protocol server rather than a `CloudServer`: every counted frame reaches the server's parser
(each connection sends valid random requests first and its one random or mutated frame
last, then a frame that is refused in any state, in case the mutation left a valid message).
Every refusal has to be a handshake or protocol close code (never 1011, never an exception
in the server loop), and afterwards a normal client is still served.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from benchmarks.hostile import fuzz_campaign
from tether.protocol import (
    Appended,
    AppendTokens,
    CloseCode,
    ErrorCode,
    KeyPair,
    Limits,
    Request,
    RequestFailed,
    ServerConnection,
    connect,
)

pytestmark = pytest.mark.slow

TARGET_FRAMES = 10_000
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


async def test_fuzz_live_server(live_server: Any, server_keys: KeyPair, client_keys: KeyPair,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)  # thousands of expected WARNING closes are not kept
    server = await live_server(fuzz_handler, limits=Limits(max_frame_bytes=256 * 1024))
    report = await fuzz_campaign(server.url, client_keys, server_keys.public, frames=TARGET_FRAMES, vocab=1000,
                                 model="tiny", seed=20240604, workers=WORKERS, valid_per_connection=8)

    assert report.frames >= TARGET_FRAMES, report.as_dict()
    unexpected = {code: n for code, n in report.close_codes.items() if code not in ALLOWED}
    assert not unexpected, f"connections closed with unexpected codes: {unexpected}"
    assert report.unclean == 0 and sum(report.close_codes.values()) == report.connections, report.as_dict()
    assert "INTERNAL" not in report.replies, report.replies
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:5]
    # The server is still healthy: a normal client is served.
    async with await connect(server.url, client_keys, server_public_key=server_keys.public) as conn:
        assert await conn.request(AppendTokens(session_id="s", tokens=[1, 2])) == Appended(session_id="s", length=2)
    print(f"\nfuzz: {report.frames} frames ({report.hostile} hostile) over {report.connections} connections; "
          f"close codes {dict(sorted(report.close_codes.items()))}")
