"""The worst VerifyDraft the limits allow does not stall the server's event loop (issue 17,
item 2): while one client sends it, another client's pings every 50 ms all come back within
250 ms. The hostile client runs in its own process, so only the server's loop is measured."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from tether.protocol import Limits, connect

# k x m at the protocol limits (refused by the cloud's max_draft before anything is built),
# at the cloud's max_draft with the whole vocabulary (built and verified), with ids outside the
# vocabulary (refused before building), and a full 32 MiB frame whose width is over
# max_draft_width (refused from its declared shape, on a connection of its own).
ATTACKER = r"""
import asyncio, json, sys
import numpy as np
from tether.protocol import (ChannelError, KeyPair, OpenSession, PublicKey, RemoteError, SamplingParams,
                             VerifyDraft, connect)

def draft(sid, k, m):
    indices = np.tile(np.arange(m, dtype=np.int64), (k, 1))
    probs = np.full((k, m), 1.0 / m, dtype=np.float32)
    return VerifyDraft(session_id=sid, tokens=np.zeros(k, np.int64), draft_indices=indices, draft_probs=probs)

async def outcome(conn, message):
    try:
        await conn.request(message, timeout=60)
        return "ok"
    except RemoteError as exc:
        return f"error {exc.code}"
    except ChannelError as exc:
        return f"closed {getattr(exc, 'code', None)}"

async def main(url, key, server):
    keys, server = KeyPair.from_private_bytes(bytes.fromhex(key)), PublicKey(bytes.fromhex(server))
    results = []
    conn = await connect(url, keys, server_public_key=server)
    opened = await conn.request(OpenSession(model="tiny-cloud", sampling=SamplingParams(temperature=1.0),
                                            prompt=np.array([1, 2, 3], np.int32)))
    sid, vocab = opened.session_id, opened.vocab_size
    for _ in range(3):
        results.append(await outcome(conn, draft(sid, 128, 1024)))
        results.append(await outcome(conn, draft(sid, 32, vocab)))
        results.append(await outcome(conn, draft(sid, 32, 1024)))
    await conn.close()
    big = await connect(url, keys, server_public_key=server)
    results.append(await outcome(big, draft("s", 1, 2_700_000)))  # 32.4 MB frame
    print(json.dumps(results))

asyncio.run(main(*sys.argv[1:4]))
"""


async def test_worst_verify_draft_does_not_delay_another_clients_pings(cloud_server, server_keys,  # type: ignore[no-untyped-def]
                                                                       client_keys) -> None:
    server = await cloud_server()
    assert Limits().max_draft_tokens == 128 and Limits().max_draft_width == 1024
    pinger = await connect(server.url, client_keys, server_public_key=server_keys.public)
    attacker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ATTACKER, server.url, client_keys.private_bytes().hex(), server_keys.public.raw.hex(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    waits: list[float] = []
    communicate = asyncio.ensure_future(attacker.communicate())
    while not communicate.done():
        started = time.perf_counter()
        await pinger.ping(timeout=5)
        waits.append(time.perf_counter() - started)
        await asyncio.sleep(0.05)
    stdout, stderr = await communicate
    await pinger.close()
    assert attacker.returncode == 0, stderr.decode()[-2000:]
    results = json.loads(stdout.decode().strip().splitlines()[-1])
    # LIMIT_EXCEEDED (5) for k > max_draft, a verify for the full-vocabulary draft, BAD_REQUEST (1)
    # for ids outside the vocabulary, and the over-wide 32 MiB frame closes with 4034.
    assert results == ["error 5", "ok", "error 1"] * 3 + ["closed 4034"], results
    assert len(waits) >= 5  # the pinger measured while the attack ran (it takes about a second here)
    assert max(waits) < 0.25, sorted(waits)[-5:]
