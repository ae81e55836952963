"""The Batcher on a recording fake model: grouping, limits, failure isolation, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from tether.cloud import Batcher
from tether.errors import RuntimeStateError
from tether.runtime import CausalLM, KVState, ModelInfo


class _State(KVState):
    def __init__(self) -> None:
        self.n = 0

    @property
    def length(self) -> int:
        return self.n


class FakeLM(CausalLM):
    """Logits are all zeros; records the batch sizes it saw and the thread it ran on."""

    def __init__(self, delay: float = 0.0) -> None:
        self.info = ModelInfo(name="fake", vocab_size=4, num_layers=1, hidden_size=2, eos_token_ids=(3,),
                              max_positions=10)
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.delay = delay

    def new_state(self) -> _State:
        return _State()

    def extend(self, state: KVState, token_ids):  # type: ignore[no-untyped-def]
        return self.extend_batch([state], [token_ids])[0]

    def extend_batch(self, states, token_ids):  # type: ignore[no-untyped-def]
        self.threads.add(threading.current_thread().name)
        if any(s.n + len(t) > self.info.max_positions for s, t in zip(states, token_ids)):
            raise RuntimeStateError("too long")
        time.sleep(self.delay)
        self.batches.append(len(states))
        for s, t in zip(states, token_ids):
            s.n += len(t)
        return [torch.zeros(len(t), 4) for t in token_ids]

    def truncate(self, state, length):  # type: ignore[no-untyped-def]
        state.n = length

    def fork(self, state):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def release(self, state):  # type: ignore[no-untyped-def]
        pass


async def test_requests_within_the_window_share_one_forward() -> None:
    lm = FakeLM()
    b = Batcher(lm, window_s=0.05, max_batch=8)
    outs = await asyncio.gather(*(b.extend(lm.new_state(), [1, 2]) for _ in range(5)))
    assert lm.batches == [5] and all(o.batch_size == 5 and o.logits.shape == (2, 4) for o in outs)
    assert lm.threads == {"tether-model_0"}
    await b.aclose()


async def test_max_batch_and_token_budget_split_batches() -> None:
    lm = FakeLM()
    b = Batcher(lm, window_s=0.05, max_batch=3, max_batch_tokens=4)
    await asyncio.gather(*(b.extend(lm.new_state(), [1]) for _ in range(7)))
    assert sorted(lm.batches, reverse=True)[:2] == [3, 3] and sum(lm.batches) == 7
    lm.batches.clear()
    await asyncio.gather(b.extend(lm.new_state(), [1, 2, 3]), b.extend(lm.new_state(), [1, 2, 3]))
    assert lm.batches == [1, 1]  # 6 tokens exceed the budget of 4
    await b.aclose()


async def test_batching_off_runs_each_alone() -> None:
    lm = FakeLM()
    b = Batcher(lm, batching=False)
    await asyncio.gather(*(b.extend(lm.new_state(), [1]) for _ in range(4)))
    assert lm.batches == [1, 1, 1, 1]
    await b.aclose()


async def test_a_failing_sequence_does_not_fail_the_others() -> None:
    lm = FakeLM()
    b = Batcher(lm, window_s=0.05)
    bad = lm.new_state()
    bad.n = 9
    results = await asyncio.gather(b.extend(lm.new_state(), [1]), b.extend(bad, [1, 2]),
                                   b.extend(lm.new_state(), [1]), return_exceptions=True)
    assert isinstance(results[1], RuntimeStateError)
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
    await b.aclose()


async def test_lone_session_does_not_wait_for_the_window() -> None:
    lm = FakeLM()
    b = Batcher(lm, window_s=1.0, expected=lambda: 1)
    t0 = time.perf_counter()
    await b.extend(lm.new_state(), [1])
    assert time.perf_counter() - t0 < 0.5
    await b.aclose()


async def test_cancel_while_queued_withdraws_and_while_running_waits() -> None:
    lm = FakeLM(delay=0.2)
    b = Batcher(lm, batching=False)
    s1, s2 = lm.new_state(), lm.new_state()
    t1 = asyncio.ensure_future(b.extend(s1, [1]))
    t2 = asyncio.ensure_future(b.extend(s2, [1]))
    await asyncio.sleep(0.05)  # t1 runs, t2 waits
    t2.cancel()
    t1.cancel()
    for t in (t1, t2):
        with pytest.raises(asyncio.CancelledError):
            await t
    assert s1.n == 1  # the running forward completed before t1's cancellation surfaced
    assert s2.n == 0  # the queued one never ran
    await b.aclose()


async def test_call_runs_exclusively_and_close_fails_queued() -> None:
    lm = FakeLM(delay=0.1)
    b = Batcher(lm, batching=False)
    value, compute, queue = await b.call(lambda: 42)
    assert value == 42 and compute >= 0 and queue >= 0
    running = asyncio.ensure_future(b.extend(lm.new_state(), [1]))
    queued = asyncio.ensure_future(b.extend(lm.new_state(), [1]))
    await asyncio.sleep(0.02)
    await b.aclose()
    for t in (queued, running):
        with pytest.raises(Exception, match="shut down"):
            await t


async def test_window_grows_with_the_forward_time() -> None:
    lm = FakeLM(delay=0.2)
    b = Batcher(lm, window_s=0.0, window_frac=0.5, max_batch=8, expected=lambda: 3)
    await b.extend(lm.new_state(), [1])  # learns that a forward takes ~0.2 s
    lm.batches.clear()
    first = asyncio.ensure_future(b.extend(lm.new_state(), [1]))
    await asyncio.sleep(0.05)  # well inside the ~0.1 s window
    late = asyncio.ensure_future(b.extend(lm.new_state(), [1]))
    await asyncio.gather(first, late)
    assert lm.batches == [2]
    await b.aclose()
