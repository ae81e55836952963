"""Generation modes as small strategies over one decoding loop.

What belongs here: the `Strategy` protocol (start, step, close), the `edge` and `cloud`
strategies, and the edge-only fallback both cloud-backed modes share while the link is
down. Speculative drafting lives in `_speculative.py`; the loop that drives any strategy
(budget, stop conditions, text) in `_loop.py`.

A strategy commits tokens: each `step` returns the tokens it committed, in order, with
their origin. It may commit more than the loop ends up using (an end-of-sequence token
mid-block); the loop stops and closes it. A step that returns no token says the context is
full (the cloud session reached its ``max_tokens``): the generation ends with ``"length"``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from tether.contract import GenerateChunk
from tether.edge._edge_model import EdgeModel
from tether.edge._proposer import EdgeDrafter
from tether.edge._remote import CloudLink, LinkDown, now
from tether.edge._stats import GenerationStats
from tether.edge._types import Origin


@dataclass(frozen=True, slots=True)
class Committed:
    """One committed token and where it came from."""

    token_id: int
    origin: Origin


class Strategy(Protocol):
    """A generation mode: commits output tokens in steps."""

    async def start(self, prompt_ids: Sequence[int]) -> None:
        """Prepare for a generation after `prompt_ids` (prefill)."""
        ...

    async def step(self, budget: int) -> list[Committed]:
        """Commit at least one more token (at most about `budget` are wanted); none when
        the context is full."""
        ...

    async def close(self) -> None:
        """Release everything the strategy holds; called once, also after errors."""
        ...


class EdgeStrategy:
    """``edge`` mode: the edge model alone, one token per step."""

    def __init__(self, edge: EdgeModel, drafter: EdgeDrafter, stats: GenerationStats) -> None:
        self.edge, self.drafter, self.stats = edge, drafter, stats

    async def start(self, prompt_ids: Sequence[int]) -> None:
        await self.edge.run(self.drafter.start, prompt_ids)

    async def step(self, budget: int) -> list[Committed]:
        toks = await self.edge.run(self.drafter.generate_committed, 1)
        self.stats.edge_forward_passes = self.drafter.forward_passes
        self.stats.edge_compute_s = self.drafter.compute_s
        return [Committed(t, Origin.EDGE_ONLY) for t in toks]

    async def close(self) -> None:
        await self.edge.run(self.drafter.release)


class EdgeFallback:
    """Edge-only decoding for a cloud-backed mode while its link is down."""

    def __init__(self, edge: EdgeModel, drafter: EdgeDrafter, stats: GenerationStats) -> None:
        self.edge, self.drafter, self.stats = edge, drafter, stats
        self.started = False

    def _sync(self, ids: Sequence[int]) -> None:
        d = self.drafter
        if not self.started or d.ids[: d.committed] != list(ids[: d.committed]):
            d.start(ids)
            self.started = True
        elif len(ids) > d.committed:
            d.append_committed(ids[d.committed :])

    async def step(self, ids: Sequence[int]) -> list[Committed]:
        """One edge-only token after the committed `ids` (prompt + output so far)."""

        def run() -> list[int]:
            self._sync(ids)
            return self.drafter.generate_committed(1)

        toks = await self.edge.run(run)
        self.stats.edge_forward_passes = self.drafter.forward_passes
        self.stats.edge_compute_s = self.drafter.compute_s
        return [Committed(t, Origin.EDGE_ONLY) for t in toks]


class CloudStrategy:
    """``cloud`` mode: the cloud generates; the edge stands in while the link is down."""

    def __init__(
        self,
        link: CloudLink,
        fallback: EdgeFallback,
        stats: GenerationStats,
        eos_ids: Sequence[int],
        ids: list[int],
    ) -> None:
        self.link, self.fallback, self.stats = link, fallback, stats
        self.eos_ids = tuple(eos_ids)
        self.ids = ids  # prompt + committed output; shared with the link for re-syncs
        self._stream: AsyncIterator[GenerateChunk] | None = None
        self._first_chunk = False

    async def start(self, prompt_ids: Sequence[int]) -> None:
        self.ids[:] = list(prompt_ids)
        await self.link.start(prompt_ids)

    async def step(self, budget: int) -> list[Committed]:
        if not self.link.up and not await self.link.resume():
            return await self._fallback()
        room = self.link.room(len(self.ids))
        if room is not None and room <= 0:
            return []  # the session is full: the generation ends with "length"
        if self._stream is None:
            self._stream = self.link.stream(lambda s: s.generate(budget, stop_ids=self.eos_ids))
            self._first_chunk = True
        t0 = now()
        try:
            chunk = await self._stream.__anext__()
        except StopAsyncIteration:
            self._stream = None
            return await self.step(budget)
        except LinkDown:
            self._stream = None
            return await self._fallback()
        wall = now() - t0
        self.stats.record_cloud(forward_passes=chunk.forward_passes, compute_s=chunk.compute_s)
        if self._first_chunk:
            self.stats.rtt_samples.append(max(0.0, wall - chunk.compute_s))
            self._first_chunk = False
        self.stats.rounds += 1
        if chunk.finish_reason is not None:
            self._stream = None
            if not chunk.token_ids:  # a session at its limit (one whose size was not known)
                return []
        self.ids.extend(chunk.token_ids)
        return [Committed(int(t), Origin.CLOUD_GENERATED) for t in chunk.token_ids]

    async def _fallback(self) -> list[Committed]:
        out = await self.fallback.step(self.ids)
        self.ids.extend(c.token_id for c in out)
        return out

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        await self.link.close()
        if self.fallback.started:
            await self.fallback.edge.run(self.fallback.drafter.release)
