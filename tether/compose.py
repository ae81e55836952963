"""Composition: the pieces that wire the device and the service together in one process.

What belongs here: `LoopbackCloud`, the cloud service started in this process and reached
through the real encrypted protocol on 127.0.0.1 (what `tether.edge.Client.local()` runs).
It is the one product module that imports both `tether.edge` and `tether.cloud`: the edge
never imports the cloud and the cloud never imports the edge (tests/test_doors.py), so
whatever needs both lives here. `EdgeClient.local` reaches it with a lazy import, so
``import tether.edge`` loads no server.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tether.cloud import CloudConfig, CloudServer, SessionManager
from tether.contract import CloudSessionAPI
from tether.edge import InProcessCloud, RemoteCloud
from tether.protocol import Allowlist, KeyPair, LinkEmulator

__all__ = ["LoopbackCloud"]

log = logging.getLogger("tether.compose")
T = TypeVar("T")


class LoopbackCloud(InProcessCloud):
    """The cloud service started in this process, reached through the real protocol on loopback.

    `EdgeClient.local()` uses it: a `CloudServer` with an ephemeral key pair listens on
    127.0.0.1 (an ephemeral port) and admits only this connector's own ephemeral client
    key; the edge connects to it exactly as to a remote `tether serve` (Noise handshake,
    encrypted frames, the same session messages), so the embedded default exercises the
    deployed path, and the stats count real bytes.

    The server runs its own event loop on its own thread: its request handling and
    encryption then never wait behind the edge's loop (the model compute is on the cloud's
    model thread either way; torch and onnxruntime release the GIL while they compute).
    It is an `InProcessCloud` because the model is in this process: split mode shares its
    runtime (`manager`) instead of loading the half model a second time.

    Use `LoopbackCloud.start(...)`; `aclose()` closes the connection, then the server.
    """

    def __init__(self, manager: Any, server: Any, remote: Any, thread: _LoopThread) -> None:
        super().__init__(manager, owns=False)  # the server closes the manager
        self.server = server
        self.remote = remote
        self._thread = thread
        self._closed = False

    @classmethod
    async def start(
        cls,
        load: Callable[[], tuple[Any, Any, str]],
        *,
        threads: int | None = None,
        link: LinkEmulator | None = None,
    ) -> LoopbackCloud:
        """Load the model (``load() -> (runtime, tokenizer, name)``, run on a worker thread),
        serve it on loopback and connect to it.

        Args:
            load: builds the cloud runtime; called once, off the event loop.
            threads: torch threads of the cloud's model thread (None: unchanged).
            link: emulate delay / jitter / bandwidth on the loopback connection.
        """
        runtime, tokenizer, name = await asyncio.to_thread(load)
        client_keys = KeyPair.generate()
        thread = _LoopThread()
        server: Any = None
        try:
            manager, server = await thread.run(_serve(runtime, tokenizer, name, threads, client_keys.public))
            options: dict[str, Any] = {} if link is None else {"link": link}
            remote = await RemoteCloud.connect(server.url, client_keys, server_public_key=server.keys.public,
                                               **options)
        except BaseException:
            await thread.stop(server)  # a started server is drained and closed, its model thread too
            raise
        return cls(manager, server, remote, thread)

    async def new_session(self) -> CloudSessionAPI:
        session: CloudSessionAPI = await self.remote.new_session()
        return session

    async def aclose(self) -> None:
        """Close the connection, drain and stop the server, then its thread (bounded waits)."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self.remote.aclose(), _CLOSE_TIMEOUT_S)
        except (Exception, asyncio.TimeoutError):  # noqa: BLE001 - the server goes away next anyway
            pass
        await self._thread.stop(self.server)


_CLOSE_TIMEOUT_S = 10.0


async def _serve(runtime: Any, tokenizer: Any, name: str, threads: int | None, client: Any) -> tuple[Any, Any]:
    """On the server's loop: a session manager and a `CloudServer` on 127.0.0.1, started,
    admitting only the `client` public key (other local processes cannot use it)."""
    # No batching window: one edge, one session; waiting for company only adds latency.
    manager = SessionManager(runtime, tokenizer=tokenizer, model_name=name, config=CloudConfig(batch_window_s=0.0))
    server = CloudServer(manager, keys=KeyPair.generate(), host="127.0.0.1", port=0, allowlist=Allowlist([client]))
    await server.start()
    if threads is not None:
        import torch

        await manager.batcher.call(lambda: torch.set_num_threads(threads))
    return manager, server


class _LoopThread:
    """An event loop on a daemon thread, for the loopback server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tether-loopback-cloud", daemon=True)
        self.thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the thread's loop and await its result from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def stop(self, server: Any) -> None:
        """Close `server` (if any) on its loop, then stop the loop and join the thread."""
        if self.loop.is_closed():
            return
        if server is not None:
            try:
                await asyncio.wait_for(self.run(server.close(grace=_CLOSE_TIMEOUT_S / 2)), _CLOSE_TIMEOUT_S)
            except (Exception, asyncio.TimeoutError):  # noqa: BLE001 - stop the loop regardless
                log.warning("the loopback cloud server did not close cleanly", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join, _CLOSE_TIMEOUT_S)
        if not self.thread.is_alive():
            self.loop.close()
