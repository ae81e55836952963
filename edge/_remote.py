"""One generation's cloud session, kept alive across link failures.

What belongs here: `CloudConnector` (where sessions come from), `ResilienceOptions`, and
`CloudLink`, which opens the session, runs each request under a timeout, counts what the
cloud reports, and on a failure marks the link down and reconnects in the background with
exponential backoff, re-syncing a fresh session to the committed tokens.
What does not: deciding what to do while down (the strategies run the edge alone).

Link-failure policy: a request refused with `ServerOverloaded` (a rate limit or a full
server; the server refuses it before doing any work) is retried on the same session after a
short backoff, up to `overload_retries` times, so a busy server costs latency, not the
cloud's exact output. Any other error of a request except `InvalidRequest`,
`UnsupportedOperation` and `SessionLimitExceeded` (the request itself was wrong and would
fail again on any session; a reachable cloud is not a dropped link) takes the link down.
The session it happened on is abandoned, never reused: a timed-out request may still run
on the server, so only a fresh session has a known state.

Context limits are not link failures: the session's ``max_tokens`` is learned when it
opens, before the prompt is sent (a prompt too long for it raises `ContextLengthExceeded`
before any compute), and the strategies never ask past it (`room`): they end the
generation with ``"length"`` there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, runtime_checkable

from tether.contract import (
    CloudSessionAPI,
    InvalidRequest,
    SamplingParams,
    ServerOverloaded,
    SessionInfo,
    SessionLimitExceeded,
    UnsupportedOperation,
)
from tether.edge._errors import CloudUnavailableError, ContextLengthExceeded
from tether.edge._stats import GenerationStats

log = logging.getLogger("tether.edge")

T = TypeVar("T")


@runtime_checkable
class CloudConnector(Protocol):
    """A source of cloud sessions: in-process, remote over the encrypted protocol, or emulated."""

    async def new_session(self) -> CloudSessionAPI:
        """A fresh, not yet opened session; reconnects the transport if it is down.

        Raises any error when the cloud cannot be reached.
        """
        ...

    async def aclose(self) -> None:
        """Close the transport and everything it holds."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ResilienceOptions:
    """What the client does when the cloud stops answering.

    Attributes:
        on_disconnect: ``"degrade"`` finishes the generation on the edge alone (tokens
            tagged edge-only, ``stats.degraded``) and resumes the cloud when it is back;
            ``"raise"`` raises `CloudUnavailableError` instead.
        request_timeout: seconds a single cloud request (verify, append, one generated
            chunk) may take before the link counts as down.
        connect_timeout: seconds to open (and re-sync) a session.
        backoff_initial, backoff_factor, backoff_max: reconnect delays (with +-25% jitter),
            also the waits between retries of an overloaded request.
        overload_retries: how often a request the server refused as overloaded is retried
            before the link counts as down (0: never).
    """

    on_disconnect: Literal["degrade", "raise"] = "degrade"
    request_timeout: float = 30.0
    connect_timeout: float = 30.0
    backoff_initial: float = 0.05
    backoff_factor: float = 2.0
    backoff_max: float = 2.0
    overload_retries: int = 4

    def __post_init__(self) -> None:
        if self.on_disconnect not in ("degrade", "raise"):
            raise ValueError(f"on_disconnect must be 'degrade' or 'raise', got {self.on_disconnect!r}")
        for name in ("request_timeout", "connect_timeout", "backoff_initial", "backoff_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.backoff_factor < 1:
            raise ValueError(f"backoff_factor must be >= 1, got {self.backoff_factor!r}")
        if self.overload_retries < 0:
            raise ValueError(f"overload_retries must be >= 0, got {self.overload_retries!r}")


class LinkDown(Exception):
    """Internal: the request failed and the link is now down (never escapes the SDK)."""


def _is_request_error(exc: BaseException) -> bool:
    """An error that says the request was wrong, not that the link failed: it propagates."""
    return isinstance(exc, (InvalidRequest, UnsupportedOperation, SessionLimitExceeded, ContextLengthExceeded))


async def _aclose(agen: AsyncIterator[object]) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def _byte_counts(session: object) -> tuple[int, int]:
    """(bytes sent, bytes received) if the session's transport counts them, else (0, 0)."""
    up = getattr(session, "bytes_sent", 0)
    down = getattr(session, "bytes_received", 0)
    return (int(up) if isinstance(up, int) else 0, int(down) if isinstance(down, int) else 0)


class CloudLink:
    """The cloud session of one generation, with timeouts, accounting and reconnection.

    Args:
        connector: where sessions come from.
        sampling: the target's sampling params (every session, including re-synced ones).
        options: timeouts and the disconnect policy.
        stats: the generation's stats (rtt, bytes, failures, reconnects are recorded).
        committed: returns the committed token ids (prompt + output) at call time; used
            to re-sync a fresh session.
    """

    def __init__(
        self,
        connector: CloudConnector,
        sampling: SamplingParams,
        options: ResilienceOptions,
        stats: GenerationStats,
        committed: Callable[[], Sequence[int]],
    ) -> None:
        self.connector = connector
        self.sampling = sampling
        self.options = options
        self.stats = stats
        self._committed = committed
        self.session: CloudSessionAPI | None = None
        self.info: SessionInfo | None = None
        self.max_tokens: int | None = None  # the session's token limit, once a session opened
        self._opened: tuple[CloudSessionAPI, SessionInfo] | None = None  # open, prompt not sent yet
        self._fresh: tuple[CloudSessionAPI, SessionInfo, int] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False
        self._counted: dict[int, tuple[int, int]] = {}

    @property
    def up(self) -> bool:
        return self.session is not None

    # -- opening and re-syncing --------------------------------------------------------

    def room(self, committed: int) -> int | None:
        """Tokens the cloud session can still take after `committed` ones (None: not known)."""
        return None if self.max_tokens is None else self.max_tokens - committed

    async def _new(self, n_tokens: int) -> tuple[CloudSessionAPI, SessionInfo]:
        """A fresh, opened session (nothing computed yet) that has room for `n_tokens`.

        Raises:
            ContextLengthExceeded: the session's ``max_tokens`` is below `n_tokens`.
        """
        # Getting a session may build an in-process cloud or dial a server: the connector
        # bounds that itself; opening is bounded here.
        session = await self.connector.new_session()
        try:
            info = await asyncio.wait_for(session.open(sampling=self.sampling), self.options.connect_timeout)
            if info.max_tokens > 0:  # 0: the backend does not know its context length
                self.max_tokens = info.max_tokens
                if n_tokens > info.max_tokens:
                    raise ContextLengthExceeded(prompt_tokens=n_tokens, limit=info.max_tokens, where="cloud session")
        except BaseException:
            await self._close_quietly(session)
            raise
        return session, info

    async def _fill(self, session: CloudSessionAPI, ids: Sequence[int]) -> None:
        if not ids:
            return
        try:
            await asyncio.wait_for(session.append(list(ids), prefill=True), self.options.connect_timeout)
        except BaseException:
            await self._close_quietly(session)
            raise

    async def _open(self, ids: Sequence[int]) -> tuple[CloudSessionAPI, SessionInfo]:
        session, info = await self._new(len(ids))
        await self._fill(session, ids)
        return session, info

    async def open(self, prompt_tokens: int) -> bool:
        """Open the session before the prompt is sent, learning its limit; True if the cloud is up.

        Call it before any compute (`start` calls it when it was not called).

        Raises:
            ContextLengthExceeded: a prompt of `prompt_tokens` does not fit the session.
            CloudUnavailableError: it failed and the policy is ``"raise"``.
        """
        try:
            self._opened = await self._new(prompt_tokens)
        except Exception as exc:
            if _is_request_error(exc):
                raise
            self._down(exc)
            return False
        return True

    async def start(self, prompt_ids: Sequence[int]) -> bool:
        """Open a session (unless `open` did) and prefill `prompt_ids`; True if the cloud is up.

        Raises:
            ContextLengthExceeded: the prompt does not fit the session (nothing was computed).
            CloudUnavailableError: it failed and the policy is ``"raise"``.
        """
        if self._opened is None and not await self.open(len(prompt_ids)):
            return False
        assert self._opened is not None
        (session, info), self._opened = self._opened, None
        try:
            await self._fill(session, prompt_ids)
        except Exception as exc:
            if _is_request_error(exc):
                raise
            self._down(exc)
            return False
        self.session, self.info = session, info
        self._account(session)
        return True

    def _down(self, exc: BaseException) -> None:
        self.stats.link_failures += 1
        old, self.session = self.session, None
        if old is not None:
            self._account(old)
            asyncio.get_running_loop().create_task(self._close_quietly(old))
        if self.options.on_disconnect == "raise":
            raise CloudUnavailableError(f"the cloud is unreachable: {type(exc).__name__}: {exc}", cause=exc) from exc
        log.warning("cloud link down (%s: %s); continuing on the edge", type(exc).__name__, exc)
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _close_quietly(self, session: CloudSessionAPI) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.close(), 5.0)

    async def _reconnect(self) -> None:
        delay = self.options.backoff_initial
        while not self._closed:
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            ids = list(self._committed())
            try:
                session, info = await self._open(ids)
            except Exception as exc:
                if _is_request_error(exc):
                    # The cloud is reachable but cannot hold what was committed (e.g. the
                    # edge ran past its max_tokens while it was down): retrying cannot help.
                    log.info("cloud reachable but cannot re-sync (%s: %s); staying on the edge",
                             type(exc).__name__, exc)
                    return
                # still down: back off and retry
                log.debug("reconnect failed: %s: %s", type(exc).__name__, exc)
                delay = min(self.options.backoff_max, delay * self.options.backoff_factor)
                continue
            if self._closed:
                await self._close_quietly(session)
                return
            self._fresh = (session, info, len(ids))
            return

    async def resume(self) -> bool:
        """If a background reconnect succeeded, catch the fresh session up and use it.

        Returns True when the link is up afterwards.
        """
        if self.session is not None:
            return True
        if self._fresh is None:
            return False
        session, info, synced = self._fresh
        self._fresh = None
        ids = list(self._committed())
        try:
            if len(ids) > synced:
                await asyncio.wait_for(session.append(ids[synced:], prefill=False), self.options.request_timeout)
        except Exception as exc:
            if _is_request_error(exc):  # reachable, but it cannot hold what was committed meanwhile
                log.info("cloud back but cannot re-sync (%s: %s); staying on the edge", type(exc).__name__, exc)
                await self._close_quietly(session)
                return False
            self.session = session
            self._down(exc)
            return False
        self.session, self.info = session, info
        self.stats.reconnects += 1
        log.info("cloud link back; verification resumes")
        return True

    # -- requests ------------------------------------------------------------------------

    def _account(self, session: object) -> None:
        up, down = _byte_counts(session)
        last_up, last_down = self._counted.get(id(session), (0, 0))
        self.stats.bytes_up += up - last_up
        self.stats.bytes_down += down - last_down
        self._counted[id(session)] = (up, down)

    async def call(self, fn: Callable[[CloudSessionAPI], Awaitable[T]]) -> T:
        """Run one request on the session under the request timeout.

        Raises:
            LinkDown: the link is (now) down; a reconnect is under way.
            CloudUnavailableError: it failed and the policy is ``"raise"``.
            InvalidRequest, UnsupportedOperation: the request itself was wrong.
        """
        session = self.session
        if session is None:
            raise LinkDown()
        retries = 0
        while True:
            try:
                result = await asyncio.wait_for(fn(session), self.options.request_timeout)
                break
            except ServerOverloaded as exc:
                if retries >= self.options.overload_retries:
                    self._down(exc)
                    raise LinkDown() from exc
                await self._overload_backoff(retries, exc)
                retries += 1
            except Exception as exc:
                if _is_request_error(exc):
                    raise
                self._down(exc)
                raise LinkDown() from exc
        self._account(session)
        return result

    async def _overload_backoff(self, retries: int, exc: ServerOverloaded) -> None:
        delay = min(self.options.backoff_max, self.options.backoff_initial * self.options.backoff_factor ** retries)
        self.stats.overload_retries += 1
        log.debug("cloud overloaded (%s); retry %d in %.2f s", exc, retries + 1, delay)
        await asyncio.sleep(delay * random.uniform(0.75, 1.25))

    async def stream(self, fn: Callable[[CloudSessionAPI], AsyncIterator[T]]) -> AsyncIterator[T]:
        """Iterate a streaming request, each item under the request timeout (see `call`)."""
        session = self.session
        if session is None:
            raise LinkDown()
        agen = fn(session)
        retries, started = 0, False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(agen.__anext__(), self.options.request_timeout)
                except StopAsyncIteration:
                    return
                except ServerOverloaded as exc:
                    # Only a stream refused before its first item is retried: nothing ran yet.
                    if started or retries >= self.options.overload_retries:
                        self._down(exc)
                        raise LinkDown() from exc
                    await _aclose(agen)
                    await self._overload_backoff(retries, exc)
                    retries += 1
                    agen = fn(session)
                    continue
                except Exception as exc:
                    if _is_request_error(exc):
                        raise
                    self._down(exc)
                    raise LinkDown() from exc
                started = True
                self._account(session)
                yield item
        finally:
            await _aclose(agen)

    def record_timing(self, wall_s: float, compute_s: float, queue_s: float, forward_passes: int) -> None:
        """Record one request's cloud cost and its network share of the wall time."""
        self.stats.record_cloud(forward_passes=forward_passes, compute_s=compute_s, queue_s=queue_s)
        self.stats.rtt_samples.append(max(0.0, wall_s - compute_s - queue_s))

    async def close(self) -> None:
        """Close the session and stop reconnecting."""
        self._closed = True
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if self._fresh is not None:
            await self._close_quietly(self._fresh[0])
            self._fresh = None
        if self._opened is not None:
            await self._close_quietly(self._opened[0])
            self._opened = None
        if self.session is not None:
            self._account(self.session)
            await self._close_quietly(self.session)
            self.session = None


def now() -> float:
    return time.perf_counter()
