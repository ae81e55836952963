"""Noise XX and IK: known-answer vectors, interop with `noiseprotocol` both ways, transcripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from noise.connection import Keypair as NoiseKeypair
from noise.connection import NoiseConnection

import numpy as np

from tether.protocol import AppendTokens, ClientProtocol, HandshakeError, KeyPair, UsageError, Welcome
from tether.protocol._cipher import MAX_NONCE, CipherState, hkdf
from tether.protocol._frames import decode_frame, encode_frame
from tether.protocol._handshake import PROLOGUE_PREFIX, client_handshake, preamble, server_handshake
from tether.protocol._limits import Limits
from tether.protocol._messages import Hello
from tether.protocol._noise import PATTERNS, HandshakeState, public_bytes
from tether.protocol._session import State
from tether.protocol._transport import MAX_CHUNK, RECORD_HEADER

HERE = Path(__file__).parent
pytestmark = pytest.mark.filterwarnings("ignore:One of ephemeral keypairs")


def _key(hex_text: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_text))


@pytest.mark.parametrize("name", ["xx", "ik"])
def test_cacophony_vectors(name: str) -> None:
    """Every handshake and transport ciphertext matches the cacophony known answers."""
    vector = json.loads((HERE / f"cacophony_{name}.json").read_text())
    pattern = PATTERNS[name.upper()]
    rs = bytes.fromhex(vector["init_remote_static"]) if "init_remote_static" in vector else None
    initiator = HandshakeState(
        pattern,
        initiator=True,
        prologue=bytes.fromhex(vector["init_prologue"]),
        s=_key(vector["init_static"]),
        e=_key(vector["init_ephemeral"]),
        rs=rs,
    )
    responder = HandshakeState(
        pattern,
        initiator=False,
        prologue=bytes.fromhex(vector["resp_prologue"]),
        s=_key(vector["resp_static"]),
        e=_key(vector["resp_ephemeral"]),
    )
    sides = (initiator, responder)
    count = len(pattern.messages)
    for index, message in enumerate(vector["messages"][:count]):
        writer, reader = sides[index % 2], sides[1 - index % 2]
        ciphertext = writer.write_message(bytes.fromhex(message["payload"]))
        assert ciphertext.hex() == message["ciphertext"], f"message {index}"
        assert reader.read_message(ciphertext).hex() == message["payload"]
    assert initiator.handshake_hash == responder.handshake_hash
    i_send, i_recv = initiator.split()
    r_recv, r_send = responder.split()
    for index, message in enumerate(vector["messages"][count:], start=count):
        send, recv = (i_send, r_recv) if index % 2 == 0 else (r_send, i_recv)
        ciphertext = send.encrypt_with_ad(b"", bytes.fromhex(message["payload"]))
        assert ciphertext.hex() == message["ciphertext"], f"transport message {index}"
        assert recv.decrypt_with_ad(b"", ciphertext).hex() == message["payload"]


def test_hkdf_is_rfc5869_with_the_chaining_key_as_salt() -> None:
    ck, ikm = bytes(range(32)), bytes(range(100, 132))
    reference = HKDF(hashes.SHA256(), length=96, salt=ck, info=b"").derive(ikm)
    assert b"".join(hkdf(ck, ikm, 3)) == reference
    assert b"".join(hkdf(ck, ikm, 2)) == reference[:64]


def _noise(pattern: str, *, initiator: bool, static: KeyPair, prologue: bytes, remote: bytes | None = None,
           ephemeral: bytes | None = None) -> NoiseConnection:
    conn = NoiseConnection.from_name(f"Noise_{pattern}_25519_ChaChaPoly_SHA256".encode())
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(prologue)
    conn.set_keypair_from_private_bytes(NoiseKeypair.STATIC, static.private_bytes())
    if remote is not None:
        conn.set_keypair_from_public_bytes(NoiseKeypair.REMOTE_STATIC, remote)
    if ephemeral is not None:
        conn.set_keypair_from_private_bytes(NoiseKeypair.EPHEMERAL, ephemeral)
    conn.start_handshake()
    return conn


@pytest.mark.parametrize("pattern", ["XX", "IK"])
def test_our_initiator_with_noiseprotocol_responder(pattern: str) -> None:
    client, server = KeyPair.generate(), KeyPair.generate()
    prologue = b"interop prologue"
    ours = HandshakeState(
        PATTERNS[pattern], initiator=True, prologue=prologue, s=client.private_key,
        rs=server.public.raw if pattern == "IK" else None,
    )
    theirs = _noise(pattern, initiator=False, static=server, prologue=prologue)
    for index in range(len(PATTERNS[pattern].messages)):
        payload = f"payload {index}".encode()
        if index % 2 == 0:
            assert theirs.read_message(ours.write_message(payload)) == payload
        else:
            assert ours.read_message(theirs.write_message(payload)) == payload
    assert theirs.handshake_finished and ours.complete
    assert ours.handshake_hash == theirs.get_handshake_hash()
    assert ours.rs == server.public.raw
    send, receive = ours.split()
    for n in range(3):
        assert theirs.decrypt(send.encrypt_with_ad(b"", b"up %d" % n)) == b"up %d" % n
        assert receive.decrypt_with_ad(b"", theirs.encrypt(b"down %d" % n)) == b"down %d" % n


@pytest.mark.parametrize("pattern", ["XX", "IK"])
def test_noiseprotocol_initiator_with_our_responder(pattern: str) -> None:
    client, server = KeyPair.generate(), KeyPair.generate()
    prologue = b"interop prologue"
    theirs = _noise(pattern, initiator=True, static=client, prologue=prologue,
                    remote=server.public.raw if pattern == "IK" else None)
    ours = HandshakeState(PATTERNS[pattern], initiator=False, prologue=prologue, s=server.private_key)
    for index in range(len(PATTERNS[pattern].messages)):
        payload = f"payload {index}".encode()
        if index % 2 == 0:
            assert ours.read_message(theirs.write_message(payload)) == payload
        else:
            assert theirs.read_message(ours.write_message(payload)) == payload
    assert ours.rs == client.public.raw
    assert ours.handshake_hash == theirs.get_handshake_hash()
    receive, send = ours.split()
    assert receive.decrypt_with_ad(b"", theirs.encrypt(b"up")) == b"up"
    assert theirs.decrypt(send.encrypt_with_ad(b"", b"down")) == b"down"


@pytest.mark.parametrize("pattern", ["XX", "IK"])
def test_transcript_matches_noiseprotocol_byte_for_byte(pattern: str) -> None:
    """With every key fixed, both implementations produce the same bytes on the wire."""
    client = KeyPair.from_private_bytes(bytes(range(1, 33)))
    server = KeyPair.from_private_bytes(bytes(range(33, 65)))
    e_client, e_server = bytes(range(65, 97)), bytes(range(97, 129))
    prologue = PROLOGUE_PREFIX + preamble(pattern)
    payloads = [b"", b"", b"third"] if pattern == "XX" else [b"hello", b""]
    ours_i = HandshakeState(PATTERNS[pattern], initiator=True, prologue=prologue, s=client.private_key,
                            rs=server.public.raw if pattern == "IK" else None, e=_key(e_client.hex()))
    ours_r = HandshakeState(PATTERNS[pattern], initiator=False, prologue=prologue, s=server.private_key,
                            e=_key(e_server.hex()))
    theirs_i = _noise(pattern, initiator=True, static=client, prologue=prologue,
                      remote=server.public.raw if pattern == "IK" else None, ephemeral=e_client)
    theirs_r = _noise(pattern, initiator=False, static=server, prologue=prologue, ephemeral=e_server)
    transcript = []
    for index, payload in enumerate(payloads):
        if index % 2 == 0:
            ours, theirs = ours_i.write_message(payload), theirs_i.write_message(payload)
            ours_r.read_message(ours)
            theirs_r.read_message(theirs)
        else:
            ours, theirs = ours_r.write_message(payload), theirs_r.write_message(payload)
            ours_i.read_message(ours)
            theirs_i.read_message(theirs)
        assert ours == theirs, f"message {index} differs"
        transcript.append(ours)
    assert ours_i.handshake_hash == theirs_i.get_handshake_hash() == ours_r.handshake_hash
    # Message sizes are fixed by the pattern: e = 32, encrypted s = 48, tag = 16.
    if pattern == "XX":
        assert [len(m) for m in transcript] == [32, 32 + 48 + 16, 48 + 16 + 5]
    else:
        assert [len(m) for m in transcript] == [32 + 48 + 16 + 5, 32 + 16]


def test_prologue_mismatch_fails_the_handshake() -> None:
    """A downgrade that rewrites the preamble changes the prologue: authentication fails."""
    client, server = KeyPair.generate(), KeyPair.generate()
    ours_i = HandshakeState(PATTERNS["XX"], initiator=True, prologue=b"tether v1", s=client.private_key)
    ours_r = HandshakeState(PATTERNS["XX"], initiator=False, prologue=b"tether v0", s=server.private_key)
    ours_r.read_message(ours_i.write_message(b""))  # message 1 has no key yet: not authenticated
    with pytest.raises(HandshakeError, match="failed authentication"):
        ours_i.read_message(ours_r.write_message(b""))


def test_flows_with_different_prologue_prefix_fail() -> None:
    client, server = KeyPair.generate(), KeyPair.generate()
    flow = client_handshake(client, server.public, pattern="IK", prologue_prefix=b"tether-noise-v0\x00")
    first = next(flow)
    responder = server_handshake(server)
    next(responder)
    with pytest.raises(HandshakeError):
        responder.send(first)


def test_rekey_matches_noiseprotocol() -> None:
    client, server = KeyPair.generate(), KeyPair.generate()
    ours = HandshakeState(PATTERNS["XX"], initiator=True, prologue=b"", s=client.private_key)
    theirs = _noise("XX", initiator=False, static=server, prologue=b"")
    theirs.read_message(ours.write_message())
    ours.read_message(theirs.write_message())
    theirs.read_message(ours.write_message())
    send, _ = ours.split()
    send.rekey()
    theirs.noise_protocol.cipher_state_decrypt.rekey()
    assert theirs.decrypt(send.encrypt_with_ad(b"", b"after rekey")) == b"after rekey"


def test_nonce_exhaustion_is_refused() -> None:
    cipher = CipherState(bytes(32), n=MAX_NONCE)
    with pytest.raises(UsageError, match="nonce space exhausted"):
        cipher.encrypt_with_ad(b"", b"x")


def test_low_order_point_is_a_handshake_error() -> None:
    server = KeyPair.generate()
    responder = HandshakeState(PATTERNS["XX"], initiator=False, prologue=b"", s=server.private_key)
    responder.read_message(bytes(32))  # the all-zero point as the client's ephemeral
    with pytest.raises(HandshakeError, match="low-order"):
        responder.write_message(b"")


def test_handshake_state_enforces_turns() -> None:
    keys = KeyPair.generate()
    state = HandshakeState(PATTERNS["XX"], initiator=True, prologue=b"", s=keys.private_key)
    with pytest.raises(UsageError, match="not this side's turn"):
        state.read_message(b"\x00" * 32)
    assert len(public_bytes(keys.private_key)) == 32


def _records(message: bytes | bytearray) -> list[bytes]:
    """The Noise transport messages (ciphertexts) of one websocket message, in order."""
    out, pos = [], 0
    while pos < len(message):
        _, length = RECORD_HEADER.unpack_from(message, pos)
        out.append(bytes(message[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + length]))
        pos += RECORD_HEADER.size + length
    return out


@pytest.mark.parametrize("pattern", ["XX", "IK"])
def test_noiseprotocol_server_reads_the_token_from_the_first_transport_record(pattern: str) -> None:
    """A server built on `noiseprotocol`'s public API: IK message 1 carries only a 12-byte
    timestamp, XX message 3 nothing; the Hello with the token is the first transport record,
    and a frame larger than one Noise message arrives as records it can decrypt one by one."""
    client_keys, server_keys = KeyPair.generate(), KeyPair.generate()
    client = ClientProtocol(client_keys, server_keys.public, pattern=pattern, token="s3cret-token")
    theirs = _noise(pattern, initiator=False, static=server_keys, prologue=PROLOGUE_PREFIX + preamble(pattern))
    (first,) = client.data_to_send()
    payload = theirs.read_message(first[8:])
    if pattern == "IK":
        assert len(payload) == 12 and int.from_bytes(payload[:8], "big") >= 2**62  # TAI64N
    else:
        assert payload == b""
    assert b"s3cret-token" not in bytes(first)
    client.receive_data(theirs.write_message(b""))
    out = client.data_to_send()
    if pattern == "XX":
        assert theirs.read_message(out.pop(0)) == b""  # message 3: no payload
    assert theirs.handshake_finished
    (hello_record,) = out
    (ciphertext,) = _records(hello_record)
    hello = decode_frame(theirs.decrypt(ciphertext), Limits()).message
    assert isinstance(hello, Hello) and hello.token == "s3cret-token"
    # Welcome from the noiseprotocol side, one record: the client opens.
    welcome = encode_frame(Welcome(server="theirs", capabilities=(), models=(), max_frame_bytes=1 << 25,
                                   max_metadata_bytes=1 << 20, max_tensor_elements=1 << 24, max_in_flight=8,
                                   keepalive_interval=20.0)).tobytes()
    client.receive_data(RECORD_HEADER.pack(0, len(welcome) + 16) + theirs.encrypt(welcome))
    assert client.state is State.OPEN
    # A 160 KB frame each way, read and written with nothing but the library's public API.
    big = AppendTokens(session_id="s", tokens=np.arange(40_000, dtype=np.int32))
    client.send_request(big)
    (message,) = client.data_to_send()
    ciphertexts = _records(message)
    assert len(ciphertexts) == 3 and max(len(c) for c in ciphertexts) == 65_535
    plain = b"".join(theirs.decrypt(c) for c in ciphertexts)
    frame = decode_frame(plain, Limits())
    assert frame.message == big and frame.request_id == 1
    assert client.transport is not None
    reply = encode_frame(big, request_id=1).tobytes()  # any large frame, to the client's transport
    chunks = [reply[i : i + MAX_CHUNK] for i in range(0, len(reply), MAX_CHUNK)]
    down = b"".join(RECORD_HEADER.pack(n, len(c) + 16) + theirs.encrypt(c) for n, c in enumerate(chunks, start=1))
    opened = client.transport.open(down)
    assert opened is not None and opened.message == big
