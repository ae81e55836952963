"""Thresholds from a cloud budget or a quality target, and the realised cloud share on held-out prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tether.routing import (
    Query,
    SignalRouter,
    calibrate_cloud_fraction,
    calibrate_quality,
    cloud_fraction,
    probe_query,
    threshold_for_cloud_fraction,
    threshold_for_quality,
)
from benchmarks.lab.curves import query_curve, random_curve


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_quantile_threshold_is_exact_on_the_calibration_set(fraction: float) -> None:
    scores = np.random.default_rng(0).normal(size=501)
    t = threshold_for_cloud_fraction(scores, fraction)
    assert cloud_fraction(scores, t) == pytest.approx(round(fraction * 501) / 501)


def test_ties_at_the_boundary() -> None:
    scores = [0.0, 1.0, 1.0, 1.0, 2.0]
    t = threshold_for_cloud_fraction(scores, 0.4)  # 2 of 5: cannot split the tie at 1.0
    assert cloud_fraction(scores, t) in (0.2, 0.8)
    assert threshold_for_cloud_fraction(scores, 0.0) == -math.inf
    assert threshold_for_cloud_fraction(scores, 1.0) == math.inf
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        threshold_for_cloud_fraction(scores, 1.5)
    with pytest.raises(ValueError, match="at least one score"):
        threshold_for_cloud_fraction([], 0.5)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.6])
def test_realised_fraction_on_held_out_scores(fraction: float) -> None:
    rng = np.random.default_rng(1)
    calib, held_out = rng.gamma(2.0, size=1000), rng.gamma(2.0, size=1000)
    t = threshold_for_cloud_fraction(calib, fraction)
    assert abs(cloud_fraction(held_out, t) - fraction) < 0.04


def test_realised_fraction_on_held_out_prompts_with_the_tiny_edge(tiny_edge_hf) -> None:  # type: ignore[no-untyped-def]
    """Calibrate a training-free router on 120 prompts; 120 other prompts land near the target."""
    from tether.runtime import TorchCausalLM

    rt = TorchCausalLM(tiny_edge_hf)
    rng = np.random.default_rng(2)
    router = SignalRouter("draft_mean_logprob", draft_tokens=3)

    def scores(n: int) -> np.ndarray:
        out = []
        for _ in range(n):
            prompt = [int(x) for x in rng.integers(1000, 2000, size=int(rng.integers(3, 9)))]
            probe, state, _ = probe_query(rt, prompt, draft_tokens=3)
            rt.release(state)
            out.append(router.score(Query(text="", probe=probe)))
        return np.array(out)

    calib, held = scores(120), scores(120)
    for target in (0.2, 0.5):
        calibrate_cloud_fraction(router, calib, target)
        realised = float(np.mean([router.decide_score(s).value == "cloud" for s in held]))
        assert abs(realised - target) <= 0.1, (target, realised)  # sampling error at n=120 is ~0.045


def test_quality_target() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    edge = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1], dtype=float)
    cloud = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1, 0], dtype=float)
    cal = threshold_for_quality(scores, edge, cloud, 1.0)  # 100% of cloud-only quality (0.8)
    assert cal.reached and cal.cloud_fraction == pytest.approx(0.1) and cal.quality == pytest.approx(0.8)
    assert 0.1 < cal.threshold < 0.2
    best = threshold_for_quality(scores, edge, cloud, 0.9, relative=False)
    assert best.cloud_fraction == pytest.approx(0.2) and 0.2 < best.threshold < 0.3
    abs_cal = threshold_for_quality(scores, edge, cloud, 0.7, relative=False)
    assert abs_cal.cloud_fraction == 0.0 and abs_cal.threshold == -math.inf
    never = threshold_for_quality(scores, edge, cloud, 0.95, relative=False)
    assert not never.reached and never.threshold == math.inf
    router = SignalRouter()
    calibrate_quality(router, scores, edge, cloud, 1.0)
    assert router.threshold == cal.threshold
    assert router.calibration["method"] == "quality" and router.calibration["expected_cloud_fraction"] == pytest.approx(0.1)


def test_curves_and_apgr() -> None:
    edge = np.array([1, 0, 0, 1], dtype=float)
    cloud = np.array([1, 1, 1, 1], dtype=float)
    perfect = query_curve("perfect", [0.9, 0.1, 0.2, 0.8], edge, cloud)
    assert perfect.quality_at(0.5) == 1.0
    assert perfect.fraction_to_reach(1.0) == pytest.approx(0.5)
    assert perfect.apgr() == pytest.approx(0.75)  # PGR 0, .5, 1, 1, 1 at x = 0, .25, .5, .75, 1
    rnd = random_curve(0.5, 1.0)
    assert rnd.apgr() == pytest.approx(0.5)
    assert rnd.fraction_to_reach(0.95) == pytest.approx(0.9)
    worst = query_curve("worst", [0.1, 0.9, 0.8, 0.2], edge, cloud)
    assert worst.apgr() < 0.5
