"""Reaching a remote cloud: `tether serve` over the encrypted protocol.

What belongs here: turning (url, pinned server key, client identity, link emulation) into a
`CloudConnector`. The device-side session is `RemoteCloud` (`_remote_session.py`) over the
protocol; this module only wires them for the SDK.
"""

from __future__ import annotations

import os
from typing import Any

from tether.edge._remote import CloudConnector
from tether.edge._remote_session import RemoteCloud
from tether.protocol import KeyPair, LinkEmulator


async def connect_remote(
    url: str,
    *,
    server_key: Any,
    client_keys: KeyPair | str | os.PathLike[str] | None = None,
    token: str | None = None,
    link: LinkEmulator | None = None,
    open_timeout: float = 10.0,
) -> CloudConnector:
    """Connect now (fails fast) and return a connector that reconnects on demand.

    Args:
        url: ``ws://host:port`` or ``wss://host:port``.
        server_key: the server's pinned public key (text, `PublicKey` or key file).
        client_keys: this device's identity (a `KeyPair` or its key file); None makes an
            ephemeral one (accepted by servers without an allowlist).
        token: bearer token, if the server wants one.
        link: emulate delay / jitter / bandwidth on the connection.
        open_timeout: seconds for the whole handshake.

    Raises:
        tether.contract.CloudError: the server could not be reached or refused us.
    """
    if client_keys is None:
        keys = KeyPair.generate()
    elif isinstance(client_keys, KeyPair):
        keys = client_keys
    else:
        keys = KeyPair.load(client_keys)
    options: dict[str, Any] = {"open_timeout": open_timeout}
    if token is not None:
        options["token"] = token
    if link is not None:
        options["link"] = link
    remote: CloudConnector = await RemoteCloud.connect(url, keys, server_public_key=server_key, **options)
    return remote  # its sessions count the connection's real bytes for the stats
