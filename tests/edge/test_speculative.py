"""Speculative drafting against the real in-process cloud session (tiny models).

The edge is a noisy copy of the cloud model: acceptance is around one half, so every
path (acceptance, correction, bonus, pipelined hit and miss) runs.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from tether.edge import EdgeClient, InProcessCloud, Origin, SpeculativeOptions
from tether.sampling import warp


def random_prompt(rng: random.Random) -> str:
    return "".join(chr(rng.randint(33, 126)) for _ in range(rng.randint(1, 40)))


OPTIONS = [
    SpeculativeOptions(),  # adaptive + pipelined
    SpeculativeOptions(draft_length=4, pipeline=False),
    SpeculativeOptions(draft_length=3, pipeline=True),
    SpeculativeOptions(draft_length="heuristic", min_confidence=0.3),
    SpeculativeOptions(draft_length=1, pipeline=True),
]


async def test_greedy_equals_cloud_on_random_prompts(edge_model, cloud_manager) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, InProcessCloud(cloud_manager))
    rng = random.Random(1234)
    drafted = accepted = 0
    origins: Counter[Origin] = Counter()
    for i in range(40):
        prompt = random_prompt(rng)
        n = rng.randint(1, 30)
        cloud = await client.generate(prompt, mode="cloud", max_new_tokens=n)
        spec = await client.generate(prompt, mode="speculative", max_new_tokens=n, speculative=OPTIONS[i % len(OPTIONS)])
        assert spec.token_ids == cloud.token_ids, (i, prompt, n)
        assert spec.finish_reason == cloud.finish_reason
        assert spec.text == cloud.text
        s = spec.stats
        assert not s.degraded and s.completion_tokens == len(spec.token_ids)
        drafted += s.drafted_tokens
        accepted += s.accepted_tokens
        origins.update(spec.origins)
        if s.completion_tokens >= 8:
            assert s.cloud_forward_passes <= s.completion_tokens
    assert 0.2 < accepted / drafted < 0.95
    assert origins[Origin.EDGE_ACCEPTED] and origins[Origin.CLOUD_CORRECTED] and origins[Origin.CLOUD_GENERATED]
    assert not origins[Origin.EDGE_ONLY]


async def test_identical_pair_accepts_everything_and_pipelining_hits(cloud_manager, tiny_cloud_hf, toy_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from tether.edge import EdgeModel
    from tether.runtime import TorchCausalLM

    edge = EdgeModel(TorchCausalLM(tiny_cloud_hf, name="same"), toy_tokenizer)
    try:
        client = EdgeClient(edge, InProcessCloud(cloud_manager))
        r = await client.generate("abcdef", max_new_tokens=40, speculative=SpeculativeOptions(draft_length=4))
        s = r.stats
        assert s.acceptance_rate == 1.0
        assert s.prefetch_hits >= s.rounds - 2  # after the first round every block was drafted ahead
        assert s.cloud_forward_passes <= 40 / 5 + 1
        assert s.mean_accepted_length is not None and s.mean_accepted_length >= 3.5
    finally:
        edge.close()


async def test_stats_are_consistent(edge_model, cloud_manager) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, InProcessCloud(cloud_manager))
    gen = client.stream("stats please", max_new_tokens=30)
    toks = [t async for t in gen]
    r = gen.result
    s = r.stats
    assert [t.origin for t in toks] == list(r.origins)
    by_origin = Counter(o.value for o in r.origins)
    assert {k: v for k, v in s.tokens_by_origin.items() if v} == dict(by_origin)
    assert s.rounds == len(s.draft_lengths) and s.drafted_tokens == sum(s.draft_lengths)
    assert s.cloud_forward_passes == s.rounds
    assert s.accepted_tokens >= by_origin.get("edge-accepted", 0)
    assert s.rtt_s is not None and s.cloud_compute_s > 0
    d = s.to_dict()
    assert d["completion_tokens"] == len(r.token_ids) and d["rounds"] == s.rounds


def exact_next_distribution(hf_model, ids: list[int], temperature: float, top_k: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, -1]
    return warp(logits, temperature=temperature, top_k=top_k, dtype=torch.float64)


async def test_sampling_preserves_the_cloud_distribution(edge_model, cloud_manager, tiny_cloud_hf) -> None:  # type: ignore[no-untyped-def]
    """Chi-square: speculative samples of the first two tokens follow the cloud's p exactly."""
    from scipy.stats import chisquare

    temperature, top_k = 1.0, 6
    client = EdgeClient(edge_model, InProcessCloud(cloud_manager))
    prompt = "q"
    prompt_ids = edge_model.tokenizer.encode(prompt)
    p1 = exact_next_distribution(tiny_cloud_hf, prompt_ids, temperature, top_k)
    support1 = torch.nonzero(p1).flatten().tolist()
    # Exact marginal of the second token: sum over t1 of p(t1) p(t2 | t1).
    p2 = torch.zeros_like(p1)
    for t1 in support1:
        p2 += p1[t1] * exact_next_distribution(tiny_cloud_hf, prompt_ids + [t1], temperature, top_k)
    n = 400
    first: Counter[int] = Counter()
    second: Counter[int] = Counter()
    rejected = 0
    opts = SpeculativeOptions(draft_length=2, pipeline=True)
    for seed in range(n):
        r = await client.generate(prompt, chat_template=False, max_new_tokens=2, temperature=temperature,
                                  top_k=top_k, seed=seed, speculative=opts)
        assert len(r.token_ids) == 2
        first[r.token_ids[0]] += 1
        second[r.token_ids[1]] += 1
        rejected += r.stats.drafted_tokens - r.stats.accepted_tokens
    assert rejected > 30  # the edge's q differs from p: corrections happen
    for counts, p in ((first, p1), (second, p2)):
        cells = [t for t in torch.nonzero(p > 0.01).flatten().tolist()]
        observed = [counts[t] for t in cells] + [n - sum(counts[t] for t in cells)]
        expected = [float(p[t]) * n for t in cells] + [n * (1 - float(p[cells].sum()))]
        if expected[-1] < 1e-9:
            observed, expected = observed[:-1], expected[:-1]
        assert sum(counts[t] for t in counts if p[t] == 0) == 0  # nothing outside p's support
        stat = chisquare(observed, expected)
        assert stat.pvalue > 1e-3, (observed, expected)
