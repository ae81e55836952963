"""The byte-level example in docs/protocol.md is what this implementation produces.

Fixed static and ephemeral keys and a fixed timestamp make an IK handshake deterministic;
the test runs the real handshake flows and transport and compares every value with the hex
in the document, so the example cannot drift from the code (or the code from the example).
"""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tether.protocol import KeyPair, Limits, RekeyPolicy
from tether.protocol._frames import decode_frame, encode_frame
from tether.protocol._handshake import client_handshake, server_handshake
from tether.protocol._messages import Hello
from tether.protocol._replay import tai64n
from tether.protocol._transport import Transport

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
MARKER = "<!-- byte-level example: checked by tests/protocol/test_doc_example.py -->"


def example() -> dict[str, str]:
    """Every value of the documented example, as hex, in document order."""
    client = KeyPair.from_private_bytes(bytes(range(1, 33)))
    server = KeyPair.from_private_bytes(bytes(range(33, 65)))
    e_client = X25519PrivateKey.from_private_bytes(bytes(range(65, 97)))
    e_server = X25519PrivateKey.from_private_bytes(bytes(range(97, 129)))
    timestamp = tai64n(1_767_225_600 * 10**9)  # 2026-01-01T00:00:00Z
    initiator = client_handshake(client, server.public, pattern="IK", timestamp=timestamp, ephemeral=e_client)
    responder = server_handshake(server, ephemeral=e_server)
    next(responder)
    message1 = next(initiator)
    assert message1 is not None
    message2 = responder.send(message1)
    assert message2 is not None and next(initiator) is None
    try:
        initiator.send(message2)
    except StopIteration as stop:
        ours = stop.value
    try:
        next(responder)
    except StopIteration as stop:
        theirs = stop.value
    assert ours.handshake_hash == theirs.handshake_hash
    hello = Hello(client="example/1.0", capabilities=("cost",), max_frame_bytes=33554432, token="example-token")
    frame = encode_frame(hello).tobytes()
    send = Transport(ours.send, ours.receive, limits=Limits(), rekey=RekeyPolicy())
    (record,) = send.seal(encode_frame(hello))
    receive = Transport(theirs.send, theirs.receive, limits=Limits(), rekey=RekeyPolicy())
    opened = receive.open(record)
    assert opened is not None and opened.message == decode_frame(frame, Limits()).message
    return {
        "client static private": client.private_bytes().hex(),
        "client static public": client.public.raw.hex(),
        "server static private": server.private_bytes().hex(),
        "server static public": server.public.raw.hex(),
        "client ephemeral private": e_client.private_bytes_raw().hex(),
        "server ephemeral private": e_server.private_bytes_raw().hex(),
        "timestamp (TAI64N)": timestamp.hex(),
        "message 1 (preamble + Noise)": message1.hex(),
        "message 2": message2.hex(),
        "handshake hash": ours.handshake_hash.hex(),
        "Hello frame (plaintext)": frame.hex(),
        "first record": bytes(record).hex(),
    }


def documented() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    assert MARKER in text, f"{DOC} lost its byte-level example"
    block = text.split(MARKER, 1)[1].split("```", 2)[1]
    values: dict[str, str] = {}
    key = None
    for line in block.splitlines()[1:]:
        match = re.fullmatch(r"(.+?):\s*([0-9a-f]*)", line.strip())
        if match and not re.fullmatch(r"[0-9a-f]+", line.strip()):
            key = match.group(1).strip()
            values[key] = match.group(2)
        elif line.strip():
            assert key is not None, f"hex continuation before any name: {line!r}"
            values[key] += line.strip()
    return values


def test_the_documented_example_is_what_the_implementation_produces() -> None:
    assert documented() == example()


def test_the_example_has_the_documented_sizes() -> None:
    values = example()
    assert len(bytes.fromhex(values["message 1 (preamble + Noise)"])) == 8 + 32 + 48 + 12 + 16
    assert len(bytes.fromhex(values["message 2"])) == 32 + 16
    record = bytes.fromhex(values["first record"])
    assert len(record) == len(bytes.fromhex(values["Hello frame (plaintext)"])) + 28
    assert "example-token".encode().hex() not in values["message 1 (preamble + Noise)"]


if __name__ == "__main__":  # print the block for docs/protocol.md
    for name, value in example().items():
        lines = [value[i : i + 64] for i in range(0, len(value), 64)] or [""]
        print(f"{name}: {lines[0]}")
        for line in lines[1:]:
            print(f"    {line}")
