"""Speculative drafting: the edge proposes k tokens, the cloud verifies them in one pass.

What belongs here: `SpeculativeOptions`, the `Scorer` seam with its cloud implementation,
and `SpeculativeStrategy`, which drives one round at a time: propose (`EdgeDrafter`), score
(the cloud session's `verify`, which applies the acceptance rule), then commit or roll back
the edge cache. What does not: the acceptance rule itself (a pure function in the cloud,
`tether.cloud._acceptance`) or the choice of k (`_draft_length.py`).

Losslessness (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023): the cloud accepts draft token x with probability
min(1, p(x)/q(x)) and otherwise draws from norm(max(0, p - q)), which yields exactly p for
*any* q it knows exactly. Greedy drafts are deterministic (q one-hot) and the rule keeps
the longest prefix equal to the cloud's argmax, so the output equals ``mode="cloud"``.

Pipelining (PipeInfer, Butler et al. 2024; DSI, Timor et al. 2024): while a verify is in
flight the edge keeps drafting as if the whole block and the edge's own guess for the bonus
token will be accepted. If they are, the next block is already drafted; otherwise the
drafted-ahead tokens are discarded and the cache rolled back. Drafting is thus hidden
behind the network round trip and the cloud's forward pass.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Protocol, Union

from tether.contract import SparseProbs, VerifyResult
from tether.edge.speculative._draft_length import (
    AdaptiveDraftLength,
    DraftLengthPolicy,
    FixedDraftLength,
    HeuristicDraftLength,
    RoundObservation,
)
from tether.edge._edge_model import EdgeModel
from tether.edge._proposer import EdgeDrafter
from tether.edge._remote import CloudLink, LinkDown, now
from tether.edge._stats import GenerationStats
from tether.edge._strategies import Committed, EdgeFallback
from tether.edge._types import Origin
from tether.sampling import SparseDist

DraftLength = Union[str, int, Callable[[], DraftLengthPolicy]]
"""``"adaptive"``, ``"heuristic"``, a fixed int k, or a factory of a `DraftLengthPolicy`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeculativeOptions:
    """How speculative mode drafts.

    Attributes:
        draft_length: ``"adaptive"`` (cost model, default), ``"heuristic"`` (transformers'
            +2/-1 schedule), an int for a fixed k, or a zero-argument factory returning a
            `DraftLengthPolicy` (one policy per generation).
        pipeline: draft ahead while a verify is in flight.
        min_confidence: end a draft block after the first token whose edge probability is
            below this (0 disables; transformers' `assistant_confidence_threshold`).
        max_draft: the longest block ever sent (also capped by the cloud's `max_draft`).
    """

    draft_length: DraftLength = "adaptive"
    pipeline: bool = True
    min_confidence: float = 0.0
    max_draft: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.draft_length, str) and self.draft_length not in ("adaptive", "heuristic"):
            raise ValueError(f"draft_length must be 'adaptive', 'heuristic', an int or a factory, got {self.draft_length!r}")
        if isinstance(self.draft_length, int) and self.draft_length < 1:
            raise ValueError(f"a fixed draft_length must be >= 1, got {self.draft_length}")
        if not 0.0 <= self.min_confidence < 1.0:
            raise ValueError(f"min_confidence must be in [0, 1), got {self.min_confidence}")
        if self.max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {self.max_draft}")

    def make_policy(self) -> DraftLengthPolicy:
        """A fresh draft-length policy for one generation."""
        d = self.draft_length
        if d == "adaptive":
            return AdaptiveDraftLength(max_k=self.max_draft, pipelined=self.pipeline)
        if d == "heuristic":
            return HeuristicDraftLength(maximum=self.max_draft)
        if isinstance(d, int):
            return FixedDraftLength(d)
        assert callable(d)
        return d()


@dataclass(frozen=True, slots=True, kw_only=True)
class Proposal:
    """A draft block: tokens and, when sampling, the exact q each was drawn from."""

    tokens: tuple[int, ...]
    dists: tuple[SparseDist, ...] | None = None

    def sparse_probs(self) -> SparseProbs | None:
        if self.dists is None:
            return None
        return SparseProbs(
            ids=tuple(tuple(d.token_ids.tolist()) for d in self.dists),
            probs=tuple(tuple(d.probs.tolist()) for d in self.dists),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Scored:
    """A verify outcome with the request's wall time."""

    result: VerifyResult
    wall_s: float


class Scorer(Protocol):
    """Scores a proposal: how much of it the target keeps, and the token after that."""

    async def score(self, proposal: Proposal) -> Scored:
        """Raises `LinkDown` when the scorer is unreachable."""
        ...


class CloudScorer:
    """A `Scorer` over the cloud session's `verify` (one forward pass per proposal)."""

    def __init__(self, link: CloudLink) -> None:
        self.link = link

    async def score(self, proposal: Proposal) -> Scored:
        q = proposal.sparse_probs()
        t0 = now()
        result = await self.link.call(lambda s: s.verify(list(proposal.tokens), q))
        wall = now() - t0
        self.link.record_timing(wall, result.compute_s, result.queue_s, result.forward_passes)
        return Scored(result=result, wall_s=wall)


@dataclass(slots=True)
class _Ahead:
    """A draft-ahead job running on the edge thread while a verify is in flight."""

    cancel: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future[int] | None = None

    async def stop(self) -> int:
        self.cancel.set()
        return await self.wait()

    async def wait(self) -> int:
        return await self.future if self.future is not None else 0


class SpeculativeStrategy:
    """``speculative`` mode: propose, score, commit or roll back; one round per step.

    Args:
        edge: the edge model (its thread runs every drafter call).
        drafter: the proposer (its chain is the committed output plus drafts).
        scorer: verifies proposals.
        link: the cloud link (checked for availability and re-synced after failures).
        fallback: edge-only decoding while the link is down.
        policy: chooses each block's length.
        options: pipelining and confidence settings.
        stats: the generation's stats.
        eos_ids: end-of-sequence ids (a block is cut after one).
        greedy: whether drafts are deterministic (no q is sent).
    """

    def __init__(
        self,
        *,
        edge: EdgeModel,
        drafter: EdgeDrafter,
        scorer: Scorer,
        link: CloudLink,
        fallback: EdgeFallback,
        policy: DraftLengthPolicy,
        options: SpeculativeOptions,
        stats: GenerationStats,
        eos_ids: Sequence[int],
        greedy: bool,
    ) -> None:
        self.edge, self.drafter, self.scorer, self.link = edge, drafter, scorer, link
        self.fallback = fallback
        self.policy, self.options, self.stats = policy, options, stats
        self.eos_ids = frozenset(eos_ids)
        self.greedy = greedy
        self._last_draft_s: float | None = None

    def committed_ids(self) -> list[int]:
        """Prompt + committed output (for re-syncing a fresh cloud session)."""
        return self.drafter.ids[: self.drafter.committed]

    async def start(self, prompt_ids: Sequence[int]) -> None:
        # Open the session first (no compute: a prompt too long for it raises
        # ContextLengthExceeded here), then edge and cloud prefill the prompt at the same time.
        await self.link.open(len(prompt_ids))
        edge_job = asyncio.ensure_future(self.edge.run(self.drafter.start, prompt_ids))
        try:
            await self.link.start(prompt_ids)
        finally:
            await edge_job
        self.fallback.started = True  # the drafter holds the chain: fallback decodes from it
        self._sync_edge_stats()

    def _sync_edge_stats(self) -> None:
        self.stats.edge_forward_passes = self.drafter.forward_passes
        self.stats.edge_compute_s = self.drafter.compute_s

    def _limit(self, budget: int) -> int:
        """The longest block this round may send; 0 when only the cloud's next token fits."""
        d = self.drafter
        limit = min(self.options.max_draft, max(1, budget - 1))
        info = self.link.info
        if info is not None:
            limit = min(limit, info.capabilities.max_draft)
        room = self.link.room(d.committed)
        if room is not None:
            limit = min(limit, room - 1)  # a verify commits up to k + 1 tokens
        # The edge holds the block, the bonus guess and a block drafted ahead.
        edge_room = self.edge.runtime.info.max_positions - d.committed
        return max(0, min(limit, (edge_room - 1) // 2))

    async def step(self, budget: int) -> list[Committed]:
        if not self.link.up and not await self.link.resume():
            return await self._edge_only()
        d = self.drafter
        room = self.link.room(d.committed)
        if room is not None and room <= 0:
            return []  # the cloud session is full: the generation ends with "length"
        limit = self._limit(budget)
        if limit == 0:
            return await self._cloud_token()
        k = self.policy.choose(limit=limit)
        min_conf = self.options.min_confidence
        # Propose: top the chain up to k speculative tokens (pipelining may have drafted them).
        have = len(d.speculative)
        draft_s: float | None = None
        if have < k and not self._chain_has_eos(have):
            t0 = now()
            n = await self.edge.run(d.draft, k - have, min_confidence=min_conf)
            if n:
                draft_s = (now() - t0) / n
                self._last_draft_s = draft_s
        prefetch_hit = have >= k
        if prefetch_hit:
            self.stats.prefetch_hits += 1
        block = self._cut_at_eos(d.block(k, min_confidence=min_conf))
        proposal = Proposal(
            tokens=tuple(block), dists=None if self.greedy else tuple(d.block_dists(len(block)))
        )
        # Draft ahead while the verify is in flight.
        ahead = _Ahead()
        if self.options.pipeline and not self._chain_has_eos(len(block)):
            # The bonus guess and a next block as long as this one (the policy's choice
            # moves slowly; asking it again here would count as a round).
            want = len(block) + 1 + k - len(d.speculative)
            if want > 0:
                ahead.future = asyncio.ensure_future(self.edge.run(d.draft, want, cancel=ahead.cancel))
        try:
            scored = await self.scorer.score(proposal)
        except LinkDown:
            await ahead.stop()
            return await self._lost_block(len(block))
        except BaseException:
            await ahead.stop()
            raise
        res = scored.result
        n_acc = res.accepted
        # On full acceptance the drafted-ahead tokens are the next block: let the job
        # finish it. On a rejection they are void: stop it after its current token.
        if n_acc < len(block):
            ahead.cancel.set()
        drafted_ahead = await ahead.stop() if n_acc < len(block) else await ahead.wait()
        self.stats.prefetched_tokens += drafted_ahead
        await self.edge.run(d.accept, n_acc, res.next_token)
        self._sync_edge_stats()
        self.stats.record_round(drafted=len(block), accepted=n_acc)
        verify_s = res.compute_s + res.queue_s
        if verify_s <= 0.0:
            # The backend does not report its compute time (e.g. over the wire): the
            # whole wall time counts as verify time, which ranks k the same way.
            verify_s = scored.wall_s
        self.policy.update(
            RoundObservation(
                drafted=len(block),
                accepted=n_acc,
                draft_s_per_token=draft_s if draft_s is not None else self._mean_draft_s(),
                verify_s=verify_s,
                network_s=max(0.0, scored.wall_s - verify_s),
                prefetch_hit=prefetch_hit,
            )
        )
        out = [Committed(t, Origin.EDGE_ACCEPTED) for t in block[:n_acc]]
        out.append(Committed(res.next_token, Origin.CLOUD_GENERATED if res.is_bonus else Origin.CLOUD_CORRECTED))
        return out

    async def _cloud_token(self) -> list[Committed]:
        """Room for one more token only: the cloud's next token, verified without a draft."""
        try:
            scored = await self.scorer.score(Proposal(tokens=()))
        except LinkDown:
            return await self._edge_only()
        res = scored.result
        await self.edge.run(self.drafter.accept, 0, res.next_token)
        self._sync_edge_stats()
        self.stats.record_round(drafted=0, accepted=0)
        return [Committed(res.next_token, Origin.CLOUD_GENERATED)]

    def _mean_draft_s(self) -> float | None:
        d = self.drafter
        return d.drafted_s / d.drafted_n if d.drafted_n else self._last_draft_s

    def _chain_has_eos(self, upto: int) -> bool:
        return any(t in self.eos_ids for t in self.drafter.speculative[:upto])

    def _cut_at_eos(self, block: list[int]) -> list[int]:
        for i, t in enumerate(block):
            if t in self.eos_ids:
                return block[: i + 1]
        return block

    async def _lost_block(self, n: int) -> list[Committed]:
        """The verify failed: the block's drafts stand as edge-only tokens."""
        toks = await self.edge.run(self.drafter.commit_speculative, n)
        await self.edge.run(self.drafter.drop_speculative)
        return [Committed(t, Origin.EDGE_ONLY) for t in toks]

    async def _edge_only(self) -> list[Committed]:
        out = await self.fallback.step(self.committed_ids())
        self._sync_edge_stats()
        return out

    async def close(self) -> None:
        await self.link.close()
        await self.edge.run(self.drafter.release)
