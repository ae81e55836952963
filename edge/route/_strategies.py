"""Routing modes over the one decoding loop: ``route-query`` and ``route-token``.

What belongs here: `RouteQueryStrategy` (score the whole query on the edge, then answer on
the edge or hand the query to the cloud), `RouteTokenStrategy` (the edge generates; a
position whose reward score is below the threshold gets the cloud's token through the
session's ``score`` / ``verify``), and `RoutingStats`. What does not: the routers and their
calibration (`tether.routing`).

route-token hand-off, greedy sessions: the cloud session lags the edge by the tokens the
edge produced since the last hand-off. At a routed position the edge sends them in one
``score(pending, top_k=1)`` call: one cloud forward pass commits them and returns the
cloud's argmax after them, which is the token committed at the routed position. It is
tagged ``edge-accepted`` when it equals the edge's own argmax there, else
``cloud-corrected``. Sampling sessions append the pending tokens and ``verify`` the edge's
sampled token with its exact q (one forward pass): the committed token is then distributed
exactly as the cloud's p at that position; a bonus token after an acceptance is kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tether.contract import SparseProbs
from tether.edge._edge_model import EdgeModel
from tether.edge._proposer import DraftSettings, EdgeDrafter
from tether.edge._remote import CloudLink, LinkDown, now
from tether.edge._stats import GenerationStats
from tether.edge._strategies import Committed, Strategy
from tether.edge._types import Origin
from tether.routing import Decision, Query, QueryRouter, RoutingOptions, TokenRouter, probe_query
from tether.sampling import SparseDist

ROUTING_MODES: tuple[str, ...] = ("route-query", "route-token")


@dataclass(slots=True)
class RoutingStats(GenerationStats):
    """`GenerationStats` plus what the router decided.

    Attributes:
        router: the router's kind.
        threshold: the threshold it ran at.
        route: route-query: ``"edge"`` or ``"cloud"``, where the whole query went.
        query_score: route-query: the query's score.
        token_scores: route-token: the score of each output position, in order.
        routed_positions: route-token: output indices whose token the cloud supplied
            because the router asked it to (bonus tokens are not routed positions).
        cloud_calls: cloud requests made for routing (hand-offs).
    """

    router: str = ""
    threshold: float | None = None
    route: str | None = None
    query_score: float | None = None
    token_scores: list[float] = field(default_factory=list)
    routed_positions: list[int] = field(default_factory=list)
    cloud_calls: int = 0

    @property
    def cloud_token_fraction(self) -> float | None:
        """Share of output tokens chosen by the cloud (route-query sent to the cloud: 1.0)."""
        n = self.completion_tokens
        if not n:
            return None
        if self.route is not None:
            return 1.0 if self.route == "cloud" else 0.0
        cloud = len(self.routed_positions) + self.tokens_by_origin[Origin.CLOUD_GENERATED.value]
        return min(1.0, cloud / n)

    def to_dict(self) -> dict[str, object]:
        out = GenerationStats.to_dict(self)
        out["routing"] = {
            "router": self.router, "threshold": self.threshold, "route": self.route,
            "query_score": self.query_score, "token_scores": list(self.token_scores),
            "routed_positions": list(self.routed_positions), "cloud_calls": self.cloud_calls,
            "cloud_token_fraction": self.cloud_token_fraction,
        }
        return out


class RouteQueryStrategy:
    """``route-query``: probe the query on the edge, then answer on the edge or in the cloud.

    The probe (prefill + a short greedy draft) is not wasted when the edge answers: with
    greedy decoding the draft *is* the start of the edge's answer.

    Args:
        edge: the edge model.
        router: the query router; threshold: its threshold.
        query_text: the user's request (for embedding routers).
        make_cloud: builds the ``cloud``-mode strategy used when the query is routed there.
        settings, generator: the edge's warping and random generator.
        stats: the generation's stats.
        eos_ids: end-of-sequence ids (end the draft).
        embedder: MiniLM embedder for routers that need embeddings.
    """

    def __init__(self, *, edge: EdgeModel, router: QueryRouter, threshold: float, query_text: str,
                 make_cloud: Callable[[], Strategy], settings: DraftSettings, generator: torch.Generator,
                 stats: RoutingStats, eos_ids: Sequence[int], embedder: Any = None) -> None:
        self.edge, self.router, self.threshold = edge, router, threshold
        self.query_text, self.make_cloud = query_text, make_cloud
        self.settings, self.stats, self.eos_ids = settings, stats, tuple(eos_ids)
        self.embedder = embedder
        self.decoder = EdgeDrafter(edge.runtime, settings, generator)
        self.cloud: Strategy | None = None
        self._pending: list[int] = []  # draft tokens to emit first (edge route, greedy)
        stats.router, stats.threshold = router.kind, threshold

    async def start(self, prompt_ids: Sequence[int]) -> None:
        needs = self.router.needs
        probe = state = None
        if "probe" in needs:
            def run_probe() -> Any:
                t0 = time.perf_counter()
                out = probe_query(self.edge.runtime, prompt_ids, max(1, self.router.draft_tokens), self.eos_ids)
                self.decoder.compute_s += time.perf_counter() - t0
                self.decoder.forward_passes += len(out[0].draft_ids)  # the prefill, each draft token but the last
                return out
            probe, state, _ = await self.edge.run(run_probe)
        embedding = None
        if "embedding" in needs:
            from tether.routing import default_embedder

            emb = self.embedder or default_embedder()
            embedding = (await self.edge.run(emb.embed, [self.query_text]))[0]
        score = self.router.score(Query(text=self.query_text, probe=probe, embedding=embedding))
        self.stats.query_score = score
        decision = self.router.decide_score(score, self.threshold)
        self.stats.route = decision.value
        if decision is Decision.CLOUD:
            if state is not None:
                await self.edge.run(self.edge.runtime.release, state)
            self._sync_stats()
            self.cloud = self.make_cloud()
            await self.cloud.start(prompt_ids)
            return
        draft = list(probe.draft_ids) if probe is not None else []
        if draft and self.settings.greedy and state is not None:
            # The state holds prompt + draft[:-1]; the answer continues after draft[-1].
            self._pending = draft
            await self.edge.run(self.decoder.adopt, [*prompt_ids, *draft], state)
        else:
            if state is not None:
                await self.edge.run(self.edge.runtime.release, state)
            await self.edge.run(self.decoder.start, prompt_ids)
        self._sync_stats()

    def _sync_stats(self) -> None:
        self.stats.edge_forward_passes = self.decoder.forward_passes
        self.stats.edge_compute_s = self.decoder.compute_s

    async def step(self, budget: int) -> list[Committed]:
        if self.cloud is not None:
            return await self.cloud.step(budget)
        if self._pending:
            out, self._pending = self._pending, []
            return [Committed(t, Origin.EDGE_ROUTED) for t in out]

        def one() -> int:
            tok, _ = self.decoder.choose()
            self.decoder.append_committed([tok])
            return tok

        tok = await self.edge.run(one)
        self._sync_stats()
        return [Committed(tok, Origin.EDGE_ROUTED)]

    async def close(self) -> None:
        if self.cloud is not None:
            await self.cloud.close()
        await self.edge.run(self.decoder.release)


class RouteTokenStrategy:
    """``route-token``: the edge generates; low-reward positions get the cloud's token.

    Args:
        edge: the edge model.
        router: the token router; threshold: its threshold.
        link: the cloud link (session opened with the prompt in `start`).
        settings, generator: the edge's warping and random generator.
        stats: the generation's stats.
        ids: prompt + committed output, shared with the link for re-syncs.
    """

    def __init__(self, *, edge: EdgeModel, router: TokenRouter, threshold: float, link: CloudLink,
                 settings: DraftSettings, generator: torch.Generator, stats: RoutingStats, ids: list[int]) -> None:
        self.edge, self.router, self.threshold, self.link = edge, router, threshold, link
        self.settings, self.stats, self.ids = settings, stats, ids
        self.decoder = EdgeDrafter(edge.runtime, settings, generator, want_hidden=bool(router.needs_hidden))
        self.synced = 0  # committed tokens the cloud session holds
        self.n_out = 0
        stats.router, stats.threshold = router.kind, threshold

    def committed_ids(self) -> list[int]:
        return list(self.ids)

    async def start(self, prompt_ids: Sequence[int]) -> None:
        self.ids[:] = list(prompt_ids)
        # At threshold -inf (cloud_fraction=0) no score is below it: no session is opened.
        # Otherwise the session opens before any compute: a prompt too long for it raises here.
        uses_cloud = self.threshold > -math.inf
        if uses_cloud:
            await self.link.open(len(prompt_ids))
        await self.edge.run(self.decoder.start, prompt_ids)
        if uses_cloud and await self.link.start(prompt_ids):
            self.synced = len(prompt_ids)
        self._sync_stats()

    def _sync_stats(self) -> None:
        self.stats.edge_forward_passes = self.decoder.forward_passes
        self.stats.edge_compute_s = self.decoder.compute_s

    async def step(self, budget: int) -> list[Committed]:
        room = self.link.room(len(self.ids))
        if room is not None and room <= 0:
            return []  # the cloud session could not hold another token: end with "length"

        def look() -> tuple[float, int, SparseDist | None]:
            logits = self.decoder.next_logits()  # runs the tokens committed last step
            score = self.router.score_token(logits, self.decoder.hidden)
            tok, dist = self.decoder.choose()
            return score, tok, dist

        score, edge_tok, dist = await self.edge.run(look)
        self.stats.token_scores.append(score)
        out: list[Committed] | None = None
        if self.router.decide_score(score, self.threshold) is Decision.CLOUD:
            out = await self._hand_off(edge_tok, dist)
            if out is None:  # link down: the edge's token, flagged as degraded
                out = [Committed(edge_tok, Origin.EDGE_ONLY)]
            else:
                self.stats.routed_positions.append(self.n_out)
        else:
            out = [Committed(edge_tok, Origin.EDGE_ROUTED)]
        toks = [c.token_id for c in out]
        self.ids.extend(toks)
        self.n_out += len(out)
        await self.edge.run(self.decoder.append_committed, toks)
        self._sync_stats()
        return out

    async def _hand_off(self, edge_tok: int, dist: SparseDist | None) -> list[Committed] | None:
        """Ask the cloud for the token at this position; None when the link is down."""
        if not self.link.up:
            if not await self.link.resume():
                return None
            self.synced = len(self.ids)  # a fresh session was re-synced to the committed ids
        pending = self.ids[self.synced :]
        t0 = now()
        try:
            if self.settings.greedy:
                res = await self.link.call(lambda s: s.score(pending, top_k=1))
                wall = now() - t0
                self.link.record_timing(wall, res.compute_s, res.queue_s, res.forward_passes)
                self.synced = len(self.ids)
                cloud_tok = int(res.top_ids[-1][0])
                out = [Committed(cloud_tok, Origin.EDGE_ACCEPTED if cloud_tok == edge_tok else Origin.CLOUD_CORRECTED)]
            else:
                assert dist is not None
                q = SparseProbs(ids=(tuple(dist.token_ids.tolist()),), probs=(tuple(dist.probs.tolist()),))

                # A verify commits up to two tokens; with room for one, the cloud samples it alone.
                room = self.link.room(len(self.ids))
                draft, draft_q = ([edge_tok], q) if room is None or room >= 2 else ([], None)

                async def append_verify(s: Any) -> Any:
                    if pending:
                        await s.append(pending, prefill=False)
                    return await s.verify(draft, draft_q)

                res = await self.link.call(append_verify)
                wall = now() - t0
                self.link.record_timing(wall, res.compute_s, res.queue_s, res.forward_passes)
                if not draft:
                    tok = int(res.next_token)
                    out = [Committed(tok, Origin.EDGE_ACCEPTED if tok == edge_tok else Origin.CLOUD_CORRECTED)]
                elif res.accepted:
                    out = [Committed(edge_tok, Origin.EDGE_ACCEPTED), Committed(int(res.next_token), Origin.CLOUD_GENERATED)]
                else:
                    out = [Committed(int(res.next_token), Origin.CLOUD_CORRECTED)]
                self.synced = len(self.ids) + len(out)
        except LinkDown:
            return None
        self.stats.cloud_calls += 1
        self.stats.rounds += 1
        return out

    async def close(self) -> None:
        await self.link.close()
        await self.edge.run(self.decoder.release)


def build_routing_strategy(
    mode: str,
    *,
    edge: EdgeModel,
    options: RoutingOptions,
    stats: GenerationStats,
    settings: DraftSettings,
    generator: torch.Generator,
    query_text: str,
    make_link: Callable[[Callable[[], Sequence[int]]], CloudLink],
    make_cloud: Callable[[], Strategy],
    default_threshold: float | None = None,
) -> Strategy:
    """The strategy of a routing mode, wired from injected parts (the mode registry calls this).

    Args:
        mode: ``"route-query"`` or ``"route-token"``.
        make_link: builds a `CloudLink` given the callable returning the committed ids.
        make_cloud: builds the ``cloud``-mode strategy (route-query's cloud branch).
        default_threshold: the mode's default, used when `options` give no threshold and
            the default router has none of its own.

    Raises:
        ConfigurationError: the router cannot be resolved or has no threshold.
    """
    assert isinstance(stats, RoutingStats), "routing modes record into RoutingStats"
    if mode == "route-query":
        qrouter, threshold = options.resolve_query(default_threshold)
        return RouteQueryStrategy(edge=edge, router=qrouter, threshold=threshold, query_text=query_text,
                                  make_cloud=make_cloud, settings=settings, generator=generator, stats=stats,
                                  eos_ids=edge.eos_token_ids, embedder=options.embedder)
    if mode == "route-token":
        trouter, threshold = options.resolve_token(default_threshold)
        ids: list[int] = []
        link = make_link(lambda: ids)
        return RouteTokenStrategy(edge=edge, router=trouter, threshold=threshold, link=link, settings=settings,
                                  generator=generator, stats=stats, ids=ids)
    raise ValueError(f"not a routing mode: {mode!r}")


def query_text(prompt: Any) -> str:
    """The text a query router reads: the prompt string, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    for m in reversed(list(prompt)):
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        if role == "user":
            content = m.get("content") if isinstance(m, dict) else getattr(m, "content", "")
            return str(content)
    return ""
