"""Split mode over the real encrypted protocol: `EdgeClient.connect` to a `CloudServer` on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tether.edge import EdgeClient, Origin, SplitModel, SplitOptions, SplitStats
from tether.errors import ConfigurationError
from tether.protocol import KeyPair


@pytest.fixture
async def server(split_runtime) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager
    from tether.cloud._server import CloudServer

    manager = SessionManager(split_runtime, config=CloudConfig(batch_window_s=0.0))
    srv = CloudServer(manager, keys=KeyPair.generate())
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close(grace=1.0)


@pytest.fixture
def split_model(split_runtime) -> Any:  # type: ignore[no-untyped-def]
    model = SplitModel(split_runtime, name="tiny-split")
    yield model
    model.close()


async def test_every_compression_over_the_wire(server, edge_model, split_model) -> None:  # type: ignore[no-untyped-def]
    client = await EdgeClient.connect(server.url, server_key=server.keys.public.to_text(), edge_model=edge_model,
                                      split_model=split_model)
    async with client:
        cloud = await client.generate("over the wire", mode="cloud", max_new_tokens=12)
        sizes, tokens = {}, {}
        for name in ("fp32", "fp16", "bf16", "int8", "int8-deflate", "int4"):
            r = await client.generate("over the wire", mode="split", max_new_tokens=12,
                                      split=SplitOptions(split_layer=3, compression=name))
            s = r.stats
            assert isinstance(s, SplitStats) and not s.degraded and set(r.origins) == {Origin.CLOUD_GENERATED}
            if name == "fp32":
                assert r.token_ids == cloud.token_ids  # exact over the encrypted transport too
            sizes[name], tokens[name] = s.bytes_up, r.token_ids
        # what the transport counted shrinks with the codec (fp32 > fp16 = bf16 > int8 > int4)
        assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] > sizes["int4"]
        assert abs(sizes["fp16"] - sizes["bf16"]) < 64
        assert tokens["int8-deflate"] == tokens["int8"]  # the DEFLATE stage is lossless


async def test_auto_over_the_wire_and_early_exit(server, edge_model, split_model) -> None:  # type: ignore[no-untyped-def]
    client = await EdgeClient.connect(server.url, server_key=server.keys.public.to_text(), edge_model=edge_model,
                                      split_model=split_model, mode="split")
    async with client:
        r = await client.generate("auto remote", max_new_tokens=6, split=SplitOptions(compression="int4"))
        s = r.stats
        assert isinstance(s, SplitStats) and s.partition is not None and 1 <= s.split_layer <= 5  # type: ignore[operator]
        e = await client.generate("auto remote", max_new_tokens=6,
                                  split=SplitOptions(split_layer=5, exit_threshold=1e-9))
        assert set(e.origins) == {Origin.EDGE_EXIT}


async def test_remote_needs_a_split_model(server, edge_model) -> None:  # type: ignore[no-untyped-def]
    client = await EdgeClient.connect(server.url, server_key=server.keys.public.to_text(), edge_model=edge_model)
    async with client:
        with pytest.raises(ConfigurationError, match="split mode over a remote cloud needs the device's half"):
            await client.generate("x", mode="split", split=SplitOptions(split_layer=2))
