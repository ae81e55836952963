"""Link emulation at the session level: delay, jitter, bandwidth, and cutting the link.

What belongs here: `EmulatedLink`, a `CloudConnector` wrapper that makes every session
request cross an emulated network, for clouds that have no transport of their own (the
in-process one) and for cutting a link in tests. The arithmetic of arrival times is the
protocol's (`tether.protocol.LinkEmulator`, the same one `connect(..., link=...)` applies
to a real connection), so both kinds of emulation agree. `sever()` drops the link
(requests in flight and new ones fail, or hang until the client's timeout with
``mode="blackhole"``); `restore()` brings it back, for new sessions only.

What does not: the real transport. Sizes are estimates of the encoded messages (4 bytes
per token id, 8 per (id, prob) pair, a fixed header), close to the protocol's frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

from tether.contract import (
    Capabilities,
    ChatMessage,
    ChatResult,
    CloudSessionAPI,
    GenerateChunk,
    HiddenResult,
    SamplingParams,
    ScoreResult,
    SessionInfo,
    SparseProbs,
    VerifyResult,
)
from tether.edge._remote import CloudConnector
from tether.protocol import LinkEmulator

_HEADER = 48  # frame header + message tag + AEAD tag, roughly


class LinkSevered(ConnectionResetError):
    """The emulated link was cut."""


class EmulatedLink:
    """A `CloudConnector` whose sessions cross an emulated network.

    Args:
        inner: the real connector (in-process or remote).
        emulator: delay, jitter and bandwidth per direction (None: a perfect link that
            can still be severed). `EmulatedLink.with_rtt` builds a symmetric one.
    """

    def __init__(self, inner: CloudConnector, emulator: LinkEmulator | None = None) -> None:
        self.inner = inner
        self.emulator = emulator or LinkEmulator()
        self._up_shaper, self._down_shaper = self.emulator.shapers(client_side=True)
        self._up = asyncio.Event()
        self._up.set()
        self._mode: Literal["reset", "blackhole"] = "reset"
        self._epoch = 0  # bumped by each sever: requests of an older epoch fail
        self.bytes_sent = 0
        self.bytes_received = 0
        self.sessions_opened = 0

    @classmethod
    def with_rtt(
        cls, inner: CloudConnector, rtt_s: float, *, jitter_s: float = 0.0, bandwidth_bps: float | None = None,
        seed: int | None = None,
    ) -> EmulatedLink:
        """A symmetric link: half the round trip each way, jitter per message, bandwidth each way."""
        return cls(inner, LinkEmulator.symmetric(delay=rtt_s / 2, jitter=jitter_s, bandwidth=bandwidth_bps, seed=seed))

    # -- control -------------------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    def sever(self, mode: Literal["reset", "blackhole"] = "reset") -> None:
        """Cut the link: "reset" fails requests at once, "blackhole" makes them hang."""
        self._mode = mode
        self._epoch += 1
        self._up.clear()

    def restore(self) -> None:
        """Bring the link back (sessions from before the cut stay dead)."""
        self._up.set()

    # -- transit -------------------------------------------------------------------------

    async def _fail(self) -> None:
        if self._mode == "blackhole":
            await asyncio.Event().wait()  # hangs until the caller times out
        raise LinkSevered("emulated link is down")

    async def transit(self, nbytes: int, epoch: int, *, upstream: bool) -> None:
        """Carry `nbytes` one way, failing if the link is or goes down."""
        if not self._up.is_set() or epoch != self._epoch:
            await self._fail()
        shaper = self._up_shaper if upstream else self._down_shaper
        if shaper is not None:
            loop = asyncio.get_running_loop()
            now = loop.time()
            delay = shaper.schedule(nbytes, now) - now
            if delay > 0:
                await asyncio.sleep(delay)
        if not self._up.is_set() or epoch != self._epoch:
            await self._fail()

    # -- CloudConnector --------------------------------------------------------------------

    async def new_session(self) -> CloudSessionAPI:
        if not self._up.is_set():
            await self._fail()
        inner = await self.inner.new_session()
        self.sessions_opened += 1
        return _EmulatedSession(self, inner, self._epoch)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _ids_bytes(n: int) -> int:
    return 4 * n


class _EmulatedSession:
    """A session whose every request crosses the emulated link; counts its bytes."""

    def __init__(self, link: EmulatedLink, inner: CloudSessionAPI, epoch: int) -> None:
        self._link = link
        self._inner = inner
        self._epoch = epoch
        self.bytes_sent = 0
        self.bytes_received = 0

    async def _up(self, nbytes: int) -> None:
        nbytes += _HEADER
        self.bytes_sent += nbytes
        self._link.bytes_sent += nbytes
        await self._link.transit(nbytes, self._epoch, upstream=True)

    async def _down(self, nbytes: int) -> None:
        nbytes += _HEADER
        self.bytes_received += nbytes
        self._link.bytes_received += nbytes
        await self._link.transit(nbytes, self._epoch, upstream=False)

    @property
    def length(self) -> int:
        return self._inner.length

    @property
    def capabilities(self) -> Capabilities:
        return self._inner.capabilities

    async def open(self, *, sampling: SamplingParams = SamplingParams(), model: str | None = None) -> SessionInfo:
        await self._up(32)
        info = await self._inner.open(sampling=sampling, model=model)
        await self._down(96)
        return info

    async def append(self, token_ids: Sequence[int], *, prefill: bool = True) -> int:
        await self._up(_ids_bytes(len(token_ids)))
        n = await self._inner.append(token_ids, prefill=prefill)
        await self._down(8)
        return n

    async def verify(self, draft_ids: Sequence[int], draft_probs: SparseProbs | None = None) -> VerifyResult:
        q = 0 if draft_probs is None else sum(8 * len(r) for r in draft_probs.ids)
        await self._up(_ids_bytes(len(draft_ids)) + q)
        result = await self._inner.verify(draft_ids, draft_probs)
        await self._down(32)
        return result

    async def score(self, token_ids: Sequence[int], *, top_k: int = 5, commit: bool = True) -> ScoreResult:
        await self._up(_ids_bytes(len(token_ids)) + 8)
        result = await self._inner.score(token_ids, top_k=top_k, commit=commit)
        await self._down(8 * len(result.token_logprobs) + 8 * sum(len(r) for r in result.top_ids))
        return result

    async def generate(self, n: int, *, stop_ids: Sequence[int] = ()) -> AsyncIterator[GenerateChunk]:
        await self._up(8 + _ids_bytes(len(stop_ids)))
        agen = self._inner.generate(n, stop_ids=stop_ids)
        try:
            async for chunk in agen:
                await self._down(16 + _ids_bytes(len(chunk.token_ids)))
                yield chunk
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()

    async def continue_hidden(self, hidden: Any, *, layer: int, top_k: int = 0) -> HiddenResult:
        await self._up(int(getattr(hidden, "nbytes", 0)) + 8)
        result = await self._inner.continue_hidden(hidden, layer=layer, top_k=top_k)
        await self._down(16 + 8 * len(result.top_ids))
        return result

    async def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        json_mode: bool = False,
    ) -> ChatResult:
        size = sum(len(m.content if isinstance(m, ChatMessage) else str(m.get("content", ""))) for m in messages)
        await self._up(size + 16)
        result = await self._inner.chat(messages, max_tokens=max_tokens, temperature=temperature, json_mode=json_mode)
        await self._down(len(result.text.encode()) + 16)
        return result

    async def rollback(self, length: int) -> int:
        await self._up(8)
        n = await self._inner.rollback(length)
        await self._down(8)
        return n

    async def close(self) -> None:
        # Closing is best effort and local: the server frees the session either way.
        await self._inner.close()
