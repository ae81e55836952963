"""Fixtures for the reliability tests: a tiny byte-vocabulary cloud and a noisy edge copy of it,
and real `CloudServer`s on loopback (helpers live in reliabilitykit.py)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "cloud"))

from cloudkit import build_byte_tokenizer, build_tiny_byte_model  # noqa: E402
from tests.edge.conftest import noisy_copy  # noqa: E402


@pytest.fixture(scope="session")
def byte_tok():  # type: ignore[no-untyped-def]
    return build_byte_tokenizer()


@pytest.fixture(scope="session")
def cloud_hf():  # type: ignore[no-untyped-def]
    return build_tiny_byte_model(seed=0)


@pytest.fixture(scope="session")
def edge_hf(cloud_hf):  # type: ignore[no-untyped-def]
    return noisy_copy(cloud_hf, scale=0.1, seed=2)


@pytest.fixture
def edge(edge_hf, byte_tok):  # type: ignore[no-untyped-def]
    from tether.edge import EdgeModel
    from tether.runtime import TorchCausalLM

    model = EdgeModel(TorchCausalLM(edge_hf, name="tiny-edge"), byte_tok)
    yield model
    model.close()


@pytest.fixture
async def cloud_server(cloud_hf, byte_tok, server_keys) -> AsyncIterator[Callable[..., Awaitable[Any]]]:  # type: ignore[no-untyped-def]
    """Start `CloudServer`s (tiny model, port 0) with config changes and protocol options;
    all are closed after the test."""
    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager
    from tether.cloud._server import CloudServer
    from tether.runtime import TorchCausalLM

    servers: list[Any] = []

    async def start(*, allowlist: Any = None, token: str | None = None, protocol_options: dict[str, Any] | None = None,
                    **config: Any) -> Any:
        config.setdefault("batch_window_s", 0.0)
        manager = SessionManager(TorchCausalLM(cloud_hf, name="tiny-cloud"), tokenizer=byte_tok,
                                 config=CloudConfig(**config))
        server = CloudServer(manager, keys=server_keys, allowlist=allowlist, token=token,
                             protocol_options=protocol_options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close(grace=1.0)
