"""``mode="route-query"`` and ``mode="route-token"`` through the edge client, on the tiny model pair.

The hand-off test checks the defining property of token routing: at every position the
router sent to the cloud, the committed token is exactly the cloud model's greedy token
given the committed prefix; everywhere else it is the edge's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tether.edge import MODE_REGISTRY, EdgeClient, InProcessCloud, Origin
from tether.edge.route._strategies import RoutingStats
from tether.errors import ConfigurationError
from tether.routing import (
    ConfidenceTokenRouter,
    FitOptions,
    LearnedTokenRouter,
    RandomRouter,
    RoutingOptions,
    SignalRouter,
    calibrate_cloud_fraction,
    cloud_fraction,
)
from tether.routing._calibration import builtin_scores


def greedy_next(hf_model, ids: list[int]) -> int:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return int(hf_model(torch.tensor([ids])).logits[0, -1].argmax())


async def test_route_token_extremes_equal_edge_and_cloud_modes(edge_model, cloud_manager) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, InProcessCloud(cloud_manager))
    edge = await client.generate("hello routing", mode="edge", max_new_tokens=16)
    cloud = await client.generate("hello routing", mode="cloud", max_new_tokens=16)
    assert edge.token_ids != cloud.token_ids  # the pair disagrees somewhere: the test means something
    none = await client.generate("hello routing", mode="route-token", max_new_tokens=16,
                                 routing=RoutingOptions(threshold=-math.inf))
    assert none.token_ids == edge.token_ids
    assert set(none.origins) == {Origin.EDGE_ROUTED} and not none.stats.degraded
    assert isinstance(none.stats, RoutingStats) and none.stats.cloud_token_fraction == 0.0
    every = await client.generate("hello routing", mode="route-token", max_new_tokens=16,
                                  routing=RoutingOptions(threshold=math.inf))
    assert every.token_ids == cloud.token_ids
    s = every.stats
    assert isinstance(s, RoutingStats)
    assert s.routed_positions == list(range(len(every.token_ids)))
    assert s.cloud_token_fraction == 1.0 and s.cloud_calls == len(every.token_ids)


@pytest.mark.parametrize("threshold", [0.25, 0.35, 0.45])
async def test_route_token_hand_off_commits_the_clouds_token(edge_model, cloud_manager, tiny_cloud_hf, tiny_edge_hf,
                                                            threshold: float) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, InProcessCloud(cloud_manager))
    prompt = "route my tokens"
    prompt_ids = edge_model.tokenizer.encode(prompt)
    r = await client.generate(prompt, mode="route-token", max_new_tokens=24, chat_template=False,
                              routing=RoutingOptions(token_router=ConfidenceTokenRouter(), threshold=threshold))
    s = r.stats
    assert isinstance(s, RoutingStats)
    assert len(s.token_scores) == len(r.token_ids)
    routed = set(s.routed_positions)
    assert routed == {i for i, sc in enumerate(s.token_scores) if sc < threshold}
    for i, tok in enumerate(r.token_ids):
        prefix = prompt_ids + list(r.token_ids[:i])
        if i in routed:
            assert tok == greedy_next(tiny_cloud_hf, prefix), f"position {i}: not the cloud's token"
            assert r.origins[i] in (Origin.EDGE_ACCEPTED, Origin.CLOUD_CORRECTED)
            assert (r.origins[i] is Origin.EDGE_ACCEPTED) == (tok == greedy_next(tiny_edge_hf, prefix))
        else:
            assert tok == greedy_next(tiny_edge_hf, prefix), f"position {i}: not the edge's token"
            assert r.origins[i] is Origin.EDGE_ROUTED
    assert s.cloud_calls == len(routed) and s.cloud_forward_passes == len(routed)
    assert 0 < len(routed) < len(r.token_ids), (threshold, len(routed))  # both kinds of position occur
    assert s.cloud_token_fraction == pytest.approx(len(routed) / len(r.token_ids))
    d = s.to_dict()["routing"]
    assert isinstance(d, dict) and d["routed_positions"] == s.routed_positions and d["router"] == "confidence"


async def test_route_token_with_a_learned_head(edge_model, cloud_manager) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(200, 64)).astype(np.float32)
    router = LearnedTokenRouter.fit(rng.uniform(size=(200, 3)).astype(np.float32), hidden,
                                    (hidden[:, 0] > 0).astype(np.float32), options=FitOptions(epochs=30))
    client = EdgeClient(edge_model, InProcessCloud(cloud_manager))
    r = await client.generate("learned", mode="route-token", max_new_tokens=12,
                              routing=RoutingOptions(token_router=router, threshold=0.5))
    s = r.stats
    assert isinstance(s, RoutingStats) and len(s.token_scores) == len(r.token_ids)
    assert all(0.0 <= x <= 1.0 for x in s.token_scores)


async def test_route_token_sampling_hand_off(edge_model, cloud_manager) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, InProcessCloud(cloud_manager))
    r = await client.generate("sample", mode="route-token", max_new_tokens=12, temperature=1.0, seed=1,
                              routing=RoutingOptions(threshold=math.inf))
    s = r.stats
    assert isinstance(s, RoutingStats)
    # every position went through verify: accepted edge tokens (+ bonus) or corrections
    assert set(r.origins) <= {Origin.EDGE_ACCEPTED, Origin.CLOUD_CORRECTED, Origin.CLOUD_GENERATED}
    assert s.cloud_calls >= 1 and s.cloud_token_fraction == 1.0 or s.cloud_calls > 0


async def test_route_token_cloud_fraction_from_calibration(edge_model, cloud_manager) -> None:  # type: ignore[no-untyped-def]
    router = ConfidenceTokenRouter()
    calibrate_cloud_fraction(router, np.linspace(0.0, 1.0, 101), 0.5)
    opts = RoutingOptions(token_router=router, cloud_fraction=0.25)
    assert opts.resolve_token()[1] == pytest.approx(0.25, abs=0.01)
    # The default routers ship calibration scores: a fraction needs no calibration step.
    shipped = builtin_scores("token", "confidence")
    assert shipped is not None
    assert cloud_fraction(shipped, RoutingOptions(cloud_fraction=0.2).resolve_token()[1]) == pytest.approx(0.2, abs=0.02)
    with pytest.raises(ConfigurationError, match="holds no calibration scores"):
        RoutingOptions(query_router=SignalRouter(draft_tokens=4), cloud_fraction=0.2).resolve_query()
    with pytest.raises(ConfigurationError, match="not both"):
        RoutingOptions(threshold=0.1, cloud_fraction=0.2)
    client = EdgeClient(edge_model, InProcessCloud(cloud_manager))
    # No threshold, fraction or saved threshold: the default router runs at the mode's default.
    r = await client.generate("x", mode="route-token", max_new_tokens=2)
    assert r.stats.threshold == MODE_REGISTRY["route-token"].default_threshold  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="has no threshold"):  # not on another router's scale
        client.stream("x", mode="route-token", routing=RoutingOptions(token_router=ConfidenceTokenRouter()))


class CountingCloud:
    """A connector that counts the cloud sessions opened through it."""

    def __init__(self, inner: InProcessCloud) -> None:
        self.inner, self.sessions = inner, 0

    async def new_session(self):  # type: ignore[no-untyped-def]
        self.sessions += 1
        return await self.inner.new_session()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("mode", ["route-query", "route-token"])
async def test_cloud_fraction_zero_and_one_out_of_the_box(edge_model, cloud_manager, mode: str) -> None:  # type: ignore[no-untyped-def]
    """f=0 keeps everything on the edge without opening a cloud session; f=1 sends everything."""
    cloud = CountingCloud(InProcessCloud(cloud_manager))
    client = EdgeClient(edge_model, cloud)  # type: ignore[arg-type]
    none = await client.generate("hello routing", mode=mode, max_new_tokens=8,  # type: ignore[arg-type]
                                 routing=RoutingOptions(cloud_fraction=0.0))
    assert set(none.origins) == {Origin.EDGE_ROUTED} and cloud.sessions == 0
    everything = await client.generate("hello routing", mode=mode, max_new_tokens=8,  # type: ignore[arg-type]
                                       routing=RoutingOptions(cloud_fraction=1.0))
    assert Origin.EDGE_ROUTED not in everything.origins and cloud.sessions == 1
    assert everything.stats.cloud_token_fraction == 1.0  # type: ignore[attr-defined]


async def test_route_query_edge_and_cloud(edge_model, cloud_manager) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, InProcessCloud(cloud_manager))
    edge = await client.generate("which way", mode="edge", max_new_tokens=12)
    cloud = await client.generate("which way", mode="cloud", max_new_tokens=12)
    router = SignalRouter("draft_mean_logprob", draft_tokens=4)
    to_edge = await client.generate("which way", mode="route-query", max_new_tokens=12,
                                    routing=RoutingOptions(query_router=router, threshold=-math.inf))
    assert to_edge.token_ids == edge.token_ids  # the probe's draft is reused as the answer's start
    s = to_edge.stats
    assert isinstance(s, RoutingStats) and s.route == "edge" and s.query_score is not None
    assert set(to_edge.origins) == {Origin.EDGE_ROUTED} and s.cloud_token_fraction == 0.0
    assert s.cloud_forward_passes == 0
    # The probe's state is adopted by the edge chain: no token is run twice.
    assert s.edge_forward_passes == edge.stats.edge_forward_passes
    to_cloud = await client.generate("which way", mode="route-query", max_new_tokens=12,
                                     routing=RoutingOptions(query_router=router, threshold=math.inf))
    assert to_cloud.token_ids == cloud.token_ids
    assert to_cloud.stats.route == "cloud" and set(to_cloud.origins) == {Origin.CLOUD_GENERATED}  # type: ignore[attr-defined]
    # the decision is the router's: score vs threshold
    mid = await client.generate("which way", mode="route-query", max_new_tokens=12,
                                routing=RoutingOptions(query_router=router, threshold=s.query_score))
    assert mid.stats.route == "edge"  # type: ignore[attr-defined]  (score == threshold is not below it)


async def test_route_query_sampling_and_random_router(edge_model, cloud_manager) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, InProcessCloud(cloud_manager))
    r = await client.generate("abc", mode="route-query", max_new_tokens=8, temperature=0.8, seed=5,
                              routing=RoutingOptions(query_router=RandomRouter(), threshold=0.0))
    again = await client.generate("abc", mode="route-query", max_new_tokens=8, temperature=0.8, seed=5,
                                  routing=RoutingOptions(query_router=RandomRouter(), threshold=0.0))
    assert r.token_ids == again.token_ids and r.stats.route == "edge"  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="needs a query router"):
        RoutingOptions(query_router=ConfidenceTokenRouter()).resolve_query()


def test_batched_route_token_evaluator_follows_the_same_rule(tiny_cloud_hf, tiny_edge_hf) -> None:  # type: ignore[no-untyped-def]
    """The benchmark's batched evaluator: cloud's argmax at routed positions, edge's elsewhere."""
    from benchmarks.lab.collect import prefill_pair, route_tokens_batch
    from tether.runtime import TorchCausalLM

    edge, cloud = TorchCausalLM(tiny_edge_hf), TorchCausalLM(tiny_cloud_hf)
    router = ConfidenceTokenRouter()
    prompts = [[1000 + i, 1005, 1010 + i] for i in range(4)]
    pre = prefill_pair(edge, cloud, prompts, batch_size=3)
    runs = route_tokens_batch(edge, cloud, pre, router.score_token, 0.2, max_new_tokens=10, eos_ids=[151_645])
    again = route_tokens_batch(edge, cloud, pre, router.score_token, 0.2, max_new_tokens=10, eos_ids=[151_645])
    assert [r.token_ids for r in runs] == [r.token_ids for r in again]  # the prefilled states were forked, not used up
    n_routed = sum(len(r.routed) for r in runs)
    assert 0 < n_routed < sum(len(r.token_ids) for r in runs)
    for p, run in zip(prompts, runs):
        assert list(run.routed) == [i for i, s in enumerate(run.scores) if s < 0.2]
        for i, tok in enumerate(run.token_ids):
            model = tiny_cloud_hf if i in run.routed else tiny_edge_hf
            assert tok == greedy_next(model, p + list(run.token_ids[:i]))
    pre.release(edge, cloud)
