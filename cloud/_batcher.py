"""Cross-session batching: forward passes that arrive close together run as one `extend_batch`.

What belongs here: the queue, the batching window and the single model thread. What does
not: what the logits mean (sessions), accounting of memory (the session manager).

Every model call of a server goes through one `Batcher`, which runs them on one worker
thread, one at a time: KV states are never touched by two threads at once, and the asyncio
loop stays free while torch (which releases the GIL) computes. When the worker is idle and
a request arrives, it waits up to `window_s` for others (from the first request's arrival),
then runs up to `max_batch` sequences / `max_batch_tokens` new tokens in one ragged forward
pass. Requests that pile up while a batch runs go into the next one without extra waiting.
On a CPU decode is memory-bound: one batched step reads the weights once for all sessions.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from tether.contract import CloudError
from tether.cloud._metrics import Metrics
from tether.runtime import CausalLM, KVState

log = logging.getLogger("tether.cloud.batcher")

T = TypeVar("T")


class _ItemState(enum.IntEnum):
    QUEUED = 0
    RUNNING = 1
    DONE = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardOutput:
    """Result of one sequence's share of a forward pass.

    Attributes:
        logits: [len(token_ids), vocab] float32.
        compute_s: wall time of the (batched) forward it ran in.
        queue_s: time from submission to the start of that forward.
        batch_size: sequences in that forward.
    """

    logits: torch.Tensor
    compute_s: float
    queue_s: float
    batch_size: int


@dataclass(eq=False, slots=True)
class _Item:
    """One queued request: a forward of `token_ids` on `state`, or an exclusive call `fn`."""

    future: asyncio.Future[Any]
    enqueued: float
    state: KVState | None = None
    token_ids: list[int] = field(default_factory=list)
    fn: Callable[[], Any] | None = None
    status: _ItemState = _ItemState.QUEUED


class Batcher:
    """Runs every model call of a server on one worker thread, batching forwards across sessions.

    Args:
        model: the runtime; only this batcher may call it once started.
        batching: False runs each forward alone (the baseline batching is measured against).
        window_s: how long an idle worker waits for more requests after the first (seconds).
        window_frac: the wait is at least this fraction of the recent forward time, so a
            slow model (where a half-empty batch wastes most) waits a little longer for
            the sessions that are on their way; still cut short once `expected` are queued.
        max_batch: most sequences per forward.
        max_batch_tokens: most new tokens per forward; a request larger than this runs alone.
        metrics: where batch sizes, queue waits and forward latencies are recorded.
        expected: how many requests (queued included) are likely to arrive soon, e.g. the
            number of recently active sessions; the window is skipped once that many are
            queued, so a lone session never waits. None always waits the full window.
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        batching: bool = True,
        window_s: float = 0.003,
        window_frac: float = 0.0,
        max_batch: int = 8,
        max_batch_tokens: int = 512,
        metrics: Metrics | None = None,
        expected: Callable[[], int] | None = None,
    ) -> None:
        self.model = model
        self.expected = expected
        self.batching = batching
        self.window_s = window_s
        self.window_frac = window_frac
        self._forward_s = 0.0  # moving average of the forward wall time
        self.max_batch = max_batch if batching else 1
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics
        self._queue: collections.deque[_Item] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self._running: list[_Item] = []
        self.forwards = 0  # batched forward passes run
        self.sequences = 0  # sequences run in them

    # -- lifecycle ------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._closed:
            raise CloudError("the model worker is shut down")
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tether-model")
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tether-batcher")

    async def aclose(self) -> None:
        """Fail queued requests, wait for the running forward, stop the worker thread."""
        self._closed = True
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(CloudError("the model worker is shut down"))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
            self._executor = None
        # The forward that was running has finished (the thread is joined): fail its callers.
        for item in self._running:
            self._fail(item, CloudError("the model worker is shut down"))
        self._running = []

    # -- submitting -----------------------------------------------------------------------

    def submit(self, state: KVState, token_ids: Sequence[int]) -> asyncio.Future[ForwardOutput]:
        """Queue a forward of `token_ids` on `state`; the future gets its `ForwardOutput`.

        The caller must not touch `state` until the future is done (see `withdraw`).
        """
        self._ensure_started()
        loop = asyncio.get_running_loop()
        item = _Item(future=loop.create_future(), enqueued=time.perf_counter(), state=state,
                     token_ids=list(token_ids))
        self._queue.append(item)
        assert self._wakeup is not None
        self._wakeup.set()
        return item.future

    async def extend(self, state: KVState, token_ids: Sequence[int]) -> ForwardOutput:
        """Forward `token_ids` on `state` (batched with other sessions); cancellation-safe.

        If cancelled while queued the request is dropped; if its forward already runs,
        this waits for it to finish (so the state is not in use) and then re-raises.
        """
        fut = self.submit(state, token_ids)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if not self.withdraw(fut):
                try:
                    await asyncio.shield(fut)
                except BaseException:  # noqa: BLE001 - we re-raise the cancellation below
                    pass
            raise

    async def call(self, fn: Callable[[], T]) -> tuple[T, float, float]:
        """Run `fn()` alone on the model thread; returns ``(result, compute_s, queue_s)``."""
        self._ensure_started()
        loop = asyncio.get_running_loop()
        item = _Item(future=loop.create_future(), enqueued=time.perf_counter(), fn=fn)
        self._queue.append(item)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            out: tuple[T, float, float] = await asyncio.shield(item.future)
        except asyncio.CancelledError:
            if not self.withdraw(item.future):
                try:
                    await asyncio.shield(item.future)
                except BaseException:  # noqa: BLE001
                    pass
            raise
        return out

    def withdraw(self, future: asyncio.Future[Any]) -> bool:
        """Remove a still-queued request; False if its forward already started or finished."""
        for item in self._queue:
            if item.future is future:
                self._queue.remove(item)
                if not future.done():
                    future.cancel()
                return True
        return False

    @property
    def queued(self) -> int:
        """Requests waiting for the worker."""
        return len(self._queue)

    # -- the worker loop ------------------------------------------------------------------

    def _target(self) -> int:
        if self.expected is None:
            return self.max_batch
        return max(1, min(self.max_batch, self.expected()))

    def _take_batch(self) -> list[_Item]:
        first = self._queue.popleft()
        batch = [first]
        if first.fn is not None or not self.batching:
            return batch
        tokens = len(first.token_ids)
        keep: list[_Item] = []
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            n = len(item.token_ids)
            if item.fn is not None or tokens + n > self.max_batch_tokens or any(b.state is item.state for b in batch):
                keep.append(item)
                continue
            batch.append(item)
            tokens += n
        self._queue.extendleft(reversed(keep))
        return batch

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._queue[0]
            if self.batching and first.fn is None and self.max_batch > 1:
                # Give other sessions a moment to join, measured from the first arrival.
                window = max(self.window_s, self.window_frac * self._forward_s)
                while len(self._queue) < self._target():
                    remaining = first.enqueued + window - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
                if not self._queue:
                    continue
            batch = self._take_batch()
            self._running = batch
            start = time.perf_counter()
            for item in batch:
                item.status = _ItemState.RUNNING
            assert self._executor is not None
            try:
                if batch[0].fn is not None:
                    fn = batch[0].fn
                    result: Any = await loop.run_in_executor(self._executor, fn)
                    elapsed = time.perf_counter() - start
                    self._finish(batch[0], (result, elapsed, start - batch[0].enqueued))
                    continue
                outputs = await loop.run_in_executor(self._executor, self._forward, batch)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting callers
                for item in batch:
                    self._fail(item, exc)
                continue
            elapsed = time.perf_counter() - start
            self._forward_s = elapsed if self._forward_s == 0.0 else 0.8 * self._forward_s + 0.2 * elapsed
            self.forwards += 1
            self.sequences += len(batch)
            m = self.metrics
            if m is not None:
                m.batch_size.observe(len(batch))
                m.batch_tokens.observe(sum(len(i.token_ids) for i in batch))
                m.forward_latency.observe(elapsed)
            for item, out in zip(batch, outputs, strict=True):
                if isinstance(out, BaseException):
                    self._fail(item, out)
                    continue
                queue_s = start - item.enqueued
                if m is not None:
                    m.queue_wait.observe(queue_s)
                self._finish(item, ForwardOutput(logits=out, compute_s=elapsed, queue_s=queue_s,
                                                 batch_size=len(batch)))

    def _forward(self, batch: list[_Item]) -> list[torch.Tensor | BaseException]:
        """On the model thread: one batched forward; on failure, each sequence alone."""
        states = [i.state for i in batch]
        assert all(s is not None for s in states)
        if len(batch) == 1:
            return [self.model.extend(batch[0].state, batch[0].token_ids)]  # type: ignore[arg-type]
        try:
            return list(self.model.extend_batch(states, [i.token_ids for i in batch]))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - isolate the request that failed
            log.debug("batched forward failed; retrying its %d sequences one by one", len(batch))
        out: list[torch.Tensor | BaseException] = []
        for item in batch:
            try:
                out.append(self.model.extend(item.state, item.token_ids))  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out

    @staticmethod
    def _finish(item: _Item, value: Any) -> None:
        item.status = _ItemState.DONE
        if not item.future.done():
            item.future.set_result(value)

    @staticmethod
    def _fail(item: _Item, exc: BaseException) -> None:
        item.status = _ItemState.DONE
        if not item.future.done():
            item.future.set_exception(exc)
