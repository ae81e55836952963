"""Security end to end against a real `CloudServer`: who gets in, what an attacker on the path
can do to frames and to the server key, key files, and what never reaches the logs."""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from faultproxy import FaultProxy
from benchmarks.hostile import HostileClient
from tether.edge import EdgeClient
from tether.errors import TetherError
from tether.protocol import (
    AppendTokens,
    Chat,
    ChatMessage,
    CloseCode,
    InsecureKeyFile,
    KeyPair,
    OpenSession,
    ServerKeyMismatch,
    UnknownClientKey,
    connect,
)
from tether.protocol._frames import encode_frame

MODEL = "tiny-cloud"


async def test_unknown_client_key_is_refused(cloud_server, server_keys, client_keys, edge) -> None:  # type: ignore[no-untyped-def]
    server = await cloud_server(allowlist=[client_keys.public])
    stranger = KeyPair.generate()
    with pytest.raises(UnknownClientKey) as refused:
        await connect(server.url, stranger, server_public_key=server_keys.public)
    assert stranger.public.fingerprint in str(refused.value)
    with pytest.raises(TetherError):
        await EdgeClient.connect(server.url, server_key=server_keys.public.to_text(), edge_model=edge,
                                 client_keys=stranger)
    async with await connect(server.url, client_keys, server_public_key=server_keys.public) as conn:
        await conn.request(OpenSession(model=MODEL))  # the allowlisted key is served
    assert server._server.refused == 2


@pytest.mark.parametrize("attack", ["replay", "reorder"])
async def test_replayed_and_reordered_frames_close_that_connection(cloud_server, server_keys, client_keys,  # type: ignore[no-untyped-def]
                                                                   attack: str) -> None:
    server = await cloud_server()
    bystander = await connect(server.url, KeyPair.generate(), server_public_key=server_keys.public)
    client = await HostileClient.open(server.url, client_keys, server_keys.public)
    opened = await client.request(OpenSession(model=MODEL, prompt=np.array([1, 2], np.int32)))
    sid = opened.session_id  # type: ignore[attr-defined]
    transport = client.protocol.transport
    assert transport is not None

    def record(request_id: int) -> bytes:
        frame = encode_frame(AppendTokens(session_id=sid, tokens=np.array([3], np.int32)), request_id=request_id)
        return bytes(transport.seal_plaintext(frame.tobytes()))

    first, second = record(100), record(101)
    if attack == "replay":
        await client.send_raw(first)
        await client.send_raw(first)
        expected = CloseCode.FRAME_REPLAYED
    else:
        await client.send_raw(second)  # counter skips ahead of the one expected
        expected = CloseCode.FRAME_REORDERED
    assert await client.close_code() == expected
    await bystander.request(OpenSession(model=MODEL))  # others are unaffected
    await bystander.close()


@pytest.mark.parametrize("pattern", ["IK", "XX"])
async def test_man_in_the_middle_with_another_key_is_detected(cloud_server, server_keys, client_keys,  # type: ignore[no-untyped-def]
                                                              pattern: str, edge) -> None:
    """The attacker relays the client to a server of its own (its own key) at the address the
    client dials. The pinned fingerprint detects it, naming both keys."""
    real = await cloud_server()
    impostor_keys = KeyPair.generate()
    from tether.cloud._manager import SessionManager
    from tether.cloud._server import CloudServer

    impostor = CloudServer(SessionManager(real.manager.model), keys=impostor_keys)
    await impostor.start()
    relay = await FaultProxy(impostor.port).start()  # the path the client's packets take
    try:
        with pytest.raises(ServerKeyMismatch) as caught:
            await connect(relay.url, client_keys, server_public_key=server_keys.public, pattern=pattern)
        text = str(caught.value)
        assert server_keys.public.fingerprint in text and impostor_keys.public.fingerprint in text
        with pytest.raises(TetherError):
            await EdgeClient.connect(relay.url, server_key=server_keys.public.to_text(), edge_model=edge)
        # A relay to the real server is harmless: the client gets through, end to end encrypted.
        honest = await FaultProxy(real.port).start()
        async with await connect(honest.url, client_keys, server_public_key=server_keys.public, pattern=pattern) as c:
            await c.request(OpenSession(model=MODEL))
        await honest.aclose()
    finally:
        await relay.aclose()
        await impostor.close(grace=0.5)


def test_loose_key_file_permissions_are_refused(tmp_path: Path) -> None:
    keys = KeyPair.generate()
    keys.save(tmp_path / "server")
    private = tmp_path / "server" / "private.key"
    assert private.stat().st_mode & 0o077 == 0  # written 0600
    os.chmod(private, 0o644)
    with pytest.raises(InsecureKeyFile, match="readable by group or others"):
        KeyPair.load(tmp_path / "server")
    # `tether serve` refuses to start with it (before loading any model).
    result = subprocess.run([sys.executable, "-c", "from tether.cli import main; main()", "serve", "--keys",
                             str(tmp_path / "server"), "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "readable by group or others" in result.stderr


async def test_no_key_material_or_prompt_text_in_logs(cloud_server, server_keys, client_keys, edge,  # type: ignore[no-untyped-def]
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # everything any tether (or library) logger emits
    secret_prompt = "the launch code is PURPLE-ELEPHANT-4471"
    token = "tok-3c1b9e0f5d7a"
    server = await cloud_server(allowlist=[client_keys.public], token=token)
    async with await EdgeClient.connect(server.url, server_key=server_keys.public.to_text(), edge_model=edge,
                                        client_keys=client_keys, token=token) as client:
        await client.generate(secret_prompt, max_new_tokens=8)
        await client.generate(secret_prompt, mode="cloud", max_new_tokens=4)
    async with await connect(server.url, client_keys, server_public_key=server_keys.public, token=token) as conn:
        await conn.request(Chat(model=MODEL, messages=(ChatMessage(role="user", content=secret_prompt),), max_tokens=3))
        with pytest.raises(TetherError):  # an error path: the session does not exist
            await conn.request(AppendTokens(session_id="nope", tokens=[1]))
    with pytest.raises(TetherError):  # refused paths: bad token, unknown key
        await connect(server.url, client_keys, server_public_key=server_keys.public, token="wrong-" + token)
    with pytest.raises(TetherError):
        await connect(server.url, KeyPair.generate(), server_public_key=server_keys.public, token=token)
    assert len(caplog.records) > 5  # the session was logged...

    def private_forms(keys: KeyPair) -> list[str]:
        raw = keys._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return [raw.hex(), base64.b64encode(raw).decode(), base64.b64encode(raw).decode().rstrip("=")[:20], str(raw)]

    forbidden = [*private_forms(server_keys), *private_forms(client_keys), token, secret_prompt,
                 "PURPLE-ELEPHANT", "launch code"]
    logged = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {' '.join(_text(v) for v in vars(r).values())}" for r in caplog.records
    )
    for text in forbidden:  # ...but nothing secret in any message, argument or extra field
        assert text not in logged, f"{text[:12]}... appears in the logs"


def _text(value: object) -> str:
    try:
        return str(value)
    except ReferenceError:  # a weak proxy to something already gone
        return ""
