"""Quality-cost curves of routers and their summaries (APGR, cloud share to reach a quality).

What belongs here: pure functions from (cloud fraction, quality) points to the measures
RouteLLM reports. What does not: producing the points (the benchmark does).

- PGR(x), performance gap recovered at cloud fraction x: (q(x) - q_edge) / (q_cloud - q_edge).
- APGR: the area under PGR(x) for x in [0, 1] (trapezoid over the curve's points, which
  start at edge-only (0, q_edge) and end at cloud-only (1, q_cloud)). A random router
  has a straight line: APGR = 0.5. Higher is better; above 1 is possible when routing
  beats both (some queries the edge gets right and the cloud wrong).
- Cloud fraction to reach a quality: the smallest x on the (linearly interpolated) curve
  with q(x) >= target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Curve:
    """Points (cloud fraction, quality), sorted by fraction, from edge-only (0) to cloud-only (1)."""

    name: str
    fractions: tuple[float, ...]
    qualities: tuple[float, ...]

    @classmethod
    def from_points(cls, name: str, points: Sequence[tuple[float, float]], *, edge: float, cloud: float) -> Curve:
        """A curve through `points`, closed with (0, edge) and (1, cloud) where missing."""
        pts = dict()
        pts[0.0], pts[1.0] = edge, cloud
        for x, q in points:
            pts[float(x)] = float(q)
        xs = sorted(pts)
        return cls(name, tuple(xs), tuple(pts[x] for x in xs))

    def quality_at(self, fraction: float) -> float:
        return float(np.interp(fraction, self.fractions, self.qualities))

    def apgr(self) -> float:
        """Area under the performance-gap-recovered curve (NaN when edge and cloud tie)."""
        q0, q1 = self.quality_at(0.0), self.quality_at(1.0)
        if q1 == q0:
            return math.nan
        pgr = (np.asarray(self.qualities) - q0) / (q1 - q0)
        return float(np.trapezoid(pgr, np.asarray(self.fractions)))

    def fraction_to_reach(self, target: float) -> float | None:
        """The smallest cloud fraction with quality >= `target` on the interpolated curve; None if never."""
        xs, qs = self.fractions, self.qualities
        if qs[0] >= target:
            return xs[0]
        for i in range(1, len(xs)):
            if qs[i] >= target:
                if qs[i] == qs[i - 1]:
                    return xs[i]
                return xs[i - 1] + (xs[i] - xs[i - 1]) * (target - qs[i - 1]) / (qs[i] - qs[i - 1])
        return None

    def best_within(self, max_fraction: float) -> tuple[float, float]:
        """The measured point of highest quality with fraction <= `max_fraction`: (fraction, quality)."""
        cands = [(q, -x) for x, q in zip(self.fractions, self.qualities) if x <= max_fraction + 1e-12]
        q, nx = max(cands)
        return -nx, q


def query_curve(name: str, scores: Sequence[float], edge_quality: Sequence[float], cloud_quality: Sequence[float]) -> Curve:
    """The curve of a query router: send the k lowest-scoring queries to the cloud, k = 0..n.

    Ties in score are broken by input order, as a threshold cannot split them; the curve
    is what sweeping the threshold would realise up to that tie-break.
    """
    from tether.routing._calibration import routed_quality

    fr, q, _ = routed_quality(scores, edge_quality, cloud_quality)
    return Curve(name, tuple(float(x) for x in fr), tuple(float(v) for v in q))


def random_curve(edge: float, cloud: float) -> Curve:
    """The expected curve of a random router: the straight line from edge-only to cloud-only."""
    return Curve("random", (0.0, 1.0), (edge, cloud))
