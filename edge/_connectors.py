"""Where cloud sessions come from: an in-process session manager or a lazily built connector.

What belongs here: small `CloudConnector` implementations that need nothing of the cloud's
code (a manager is any object with ``session()``). The remote connector over the encrypted
protocol is `RemoteCloud` (`_remote_session.py`); the cloud service started in this process
and reached over loopback (`Client.local()`) is `tether.compose.LoopbackCloud`, which
imports both sides; link emulation wraps any connector (`_link.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tether.contract import CloudSessionAPI
from tether.edge._remote import CloudConnector


class InProcessCloud:
    """Sessions of a `tether.cloud.SessionManager` running in this process (no network).

    Args:
        manager: a started session manager (``await manager.start()``).
        owns: close the manager in `aclose`.
    """

    def __init__(self, manager: Any, *, owns: bool = False) -> None:
        self.manager = manager
        self.owns = owns

    async def new_session(self) -> CloudSessionAPI:
        session: CloudSessionAPI = self.manager.session()
        return session

    async def aclose(self) -> None:
        if self.owns:
            await self.manager.aclose()


class LazyCloud:
    """A connector built on first use (so ``mode="edge"`` never loads the cloud model).

    Args:
        build: coroutine function returning the real connector; called once.
    """

    def __init__(self, build: Callable[[], Awaitable[CloudConnector]]) -> None:
        self._build = build
        self._inner: CloudConnector | None = None
        self._lock = asyncio.Lock()

    @property
    def started(self) -> bool:
        return self._inner is not None

    async def get(self) -> CloudConnector:
        """The real connector, building it now if needed."""
        async with self._lock:
            if self._inner is None:
                self._inner = await self._build()
            return self._inner

    async def new_session(self) -> CloudSessionAPI:
        return await (await self.get()).new_session()

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()
