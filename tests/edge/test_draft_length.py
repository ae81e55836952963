"""Draft-length policies, fed measurements directly (no models, no clock)."""

from __future__ import annotations

import pytest

from tether.edge import AdaptiveDraftLength, FixedDraftLength, HeuristicDraftLength, RoundObservation
from tether.edge._draft_length import expected_tokens


def obs(k: int, acc: int, verify: float, *, draft: float = 0.03, network: float = 0.05) -> RoundObservation:
    return RoundObservation(drafted=k, accepted=acc, draft_s_per_token=draft, verify_s=verify, network_s=network)


def test_expected_tokens() -> None:
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12


def test_fixed_and_heuristic() -> None:
    assert FixedDraftLength(4).choose(limit=2) == 2
    h = HeuristicDraftLength(initial=5)
    h.update(obs(5, 5, 0.1))
    assert h.choose(limit=32) == 7
    h.update(obs(7, 2, 0.1))
    assert h.choose(limit=32) == 6
    for _ in range(10):
        h.update(obs(1, 0, 0.1))
    assert h.choose(limit=32) == 1
    with pytest.raises(ValueError):
        FixedDraftLength(0)


def feed(policy: AdaptiveDraftLength, alpha: float, cost: dict[int, float], rounds: int = 60) -> None:
    """Simulate rounds with a deterministic acceptance pattern at rate ~alpha."""
    debt = 0.0
    for _ in range(rounds):
        k = policy.choose(limit=16)
        acc = 0
        for _ in range(k):
            debt += alpha
            if debt >= 1.0:
                debt -= 1.0
                acc += 1
            else:
                break
        policy.update(obs(k, acc, cost.get(k, cost[max(cost)])))


def test_adaptive_prefers_short_drafts_when_verify_cost_is_steep() -> None:
    steep = {1: 0.29, 2: 0.32, 3: 0.58, 4: 0.58, 5: 0.7, 6: 0.75, 7: 0.8, 8: 0.8}
    steep.update({k: 0.82 for k in range(9, 17)})
    p = AdaptiveDraftLength(pipelined=True)
    feed(p, 0.6, steep)
    assert p.choose(limit=16) <= 2
    assert 0.45 < p.alpha < 0.75


def test_adaptive_drafts_long_when_verify_is_flat_and_acceptance_high() -> None:
    flat = {k: 0.3 for k in range(1, 17)}
    p = AdaptiveDraftLength(pipelined=True)
    feed(p, 0.95, flat)
    assert p.choose(limit=16) >= 6


def test_adaptive_respects_limit_and_rtt_pushes_k_up() -> None:
    cost = {k: 0.05 + 0.02 * k for k in range(1, 17)}
    near, far = AdaptiveDraftLength(), AdaptiveDraftLength()
    for _ in range(30):
        for policy, net in ((near, 0.0), (far, 0.5)):
            for k in range(1, 17):
                policy.update(obs(k, int(0.7 * k), cost[k], network=net))
    assert far.choose(limit=16) > near.choose(limit=16)
    assert far.choose(limit=3) <= 3
