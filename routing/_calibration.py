"""Choosing a router's threshold: to a cloud budget on unlabelled traffic, or to a quality target.

What belongs here: pure functions over score arrays (and, for quality targets, per-input
edge/cloud quality), plus the two convenience calls that set a router's threshold and
record how it was chosen. What does not: computing scores.

Cloud fraction (RouteLLM's calibration): the threshold is the `fraction`-quantile of the
scores of representative unlabelled inputs, so that fraction of them scores below it and
goes to the cloud. With n scores, exactly round(fraction * n) of *those* inputs fall below;
on new traffic from the same distribution the realised fraction is within sampling error
(about sqrt(f(1-f)/n)).

Quality target: on labelled data with the quality of the edge's and the cloud's answer to
each input, send inputs to the cloud hardest-first (lowest score first) and pick the
smallest cloud fraction whose mean quality reaches the target.

Built-in scores: ``calibration.json`` (package data, written by
``benchmarks/lab/router_calibration.py``) holds the score distribution of every
training-free router on Tether's own task bank, measured with the default edge model, so a
cloud fraction works out of the box (`builtin_scores`).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import numpy.typing as npt

from tether.routing._base import Router

ArrayLike = npt.ArrayLike


def _scores(scores: ArrayLike) -> npt.NDArray[np.float64]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("calibration needs at least one score")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s


def threshold_for_cloud_fraction(scores: ArrayLike, fraction: float) -> float:
    """The threshold that sends `fraction` of these inputs to the cloud (scores below it).

    Args:
        scores: router scores of representative inputs (unlabelled).
        fraction: target cloud fraction in [0, 1].

    Returns:
        A threshold strictly between the k-th and (k+1)-th smallest score, k = round(f n)
        (-inf for 0, +inf for 1), so ties at the boundary are split as evenly as possible.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    s = np.sort(_scores(scores))
    k = int(round(fraction * s.size))
    if k <= 0:
        return -math.inf
    if k >= s.size:
        return math.inf
    lo, hi = s[k - 1], s[k]
    return float((lo + hi) / 2.0) if hi > lo else float(np.nextafter(lo, math.inf))


def cloud_fraction(scores: ArrayLike, threshold: float) -> float:
    """The fraction of `scores` below `threshold` (what goes to the cloud)."""
    s = _scores(scores)
    return float(np.mean(s < threshold))


@dataclass(frozen=True, slots=True, kw_only=True)
class QualityCalibration:
    """The outcome of calibrating to a quality target.

    Attributes:
        threshold: scores below it go to the cloud.
        cloud_fraction: share of the labelled inputs sent to the cloud.
        quality: mean quality at that threshold on the labelled inputs.
        target: the absolute quality aimed at.
        reached: False when even all-cloud misses the target (then threshold = +inf).
    """

    threshold: float
    cloud_fraction: float
    quality: float
    target: float
    reached: bool


def routed_quality(scores: ArrayLike, edge_quality: ArrayLike, cloud_quality: ArrayLike) -> tuple[
        npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Quality as inputs move to the cloud hardest-first.

    Returns:
        (fractions [n+1], qualities [n+1], sorted scores [n]): entry k has the k
        lowest-scoring inputs on the cloud.
    """
    s = _scores(scores)
    e = np.asarray(edge_quality, dtype=np.float64).reshape(-1)
    c = np.asarray(cloud_quality, dtype=np.float64).reshape(-1)
    if not (s.size == e.size == c.size):
        raise ValueError(f"scores, edge_quality and cloud_quality differ in length: {s.size}, {e.size}, {c.size}")
    order = np.argsort(s, kind="stable")
    gain = (c - e)[order]
    q = e.sum() + np.concatenate([[0.0], np.cumsum(gain)])
    n = s.size
    return np.arange(n + 1) / n, q / n, s[order]


def threshold_for_quality(
    scores: ArrayLike,
    edge_quality: ArrayLike,
    cloud_quality: ArrayLike,
    target: float,
    *,
    relative: bool = True,
) -> QualityCalibration:
    """The smallest cloud share whose quality on labelled data reaches `target`.

    Args:
        scores: router scores of the labelled inputs.
        edge_quality, cloud_quality: quality of each side's answer per input (e.g. 1/0 for
            pass/fail of unit tests).
        target: a fraction of the cloud-only quality when `relative` (0.95 = 95% of it),
            else an absolute mean quality.
    """
    fr, q, s_sorted = routed_quality(scores, edge_quality, cloud_quality)
    cloud_only = float(np.mean(np.asarray(cloud_quality, dtype=np.float64)))
    goal = target * cloud_only if relative else target
    ok = np.nonzero(q >= goal - 1e-12)[0]
    if ok.size == 0:
        return QualityCalibration(threshold=math.inf, cloud_fraction=1.0, quality=float(q[-1]), target=goal, reached=False)
    k = int(ok[0])
    n = s_sorted.size
    if k == 0:
        t = -math.inf
    elif k == n:
        t = math.inf
    else:
        lo, hi = s_sorted[k - 1], s_sorted[k]
        t = float((lo + hi) / 2.0) if hi > lo else float(np.nextafter(lo, math.inf))
    return QualityCalibration(threshold=t, cloud_fraction=float(fr[k]), quality=float(q[k]), target=goal, reached=True)


def calibrate_cloud_fraction(router: Router, scores: Sequence[float] | ArrayLike, fraction: float) -> float:
    """Set `router`'s threshold so `fraction` of these (unlabelled) inputs go to the cloud; returns it."""
    s = _scores(scores)
    t = threshold_for_cloud_fraction(s, fraction)
    router.set_threshold(t, method="cloud_fraction", target=fraction, n=int(s.size))
    router.remember_scores(s)
    return t


def calibrate_quality(router: Router, scores: ArrayLike, edge_quality: ArrayLike, cloud_quality: ArrayLike,
                      target: float, *, relative: bool = True) -> QualityCalibration:
    """Set `router`'s threshold to the cheapest one reaching `target` on labelled data."""
    cal = threshold_for_quality(scores, edge_quality, cloud_quality, target, relative=relative)
    router.set_threshold(cal.threshold, method="quality", target=target, relative=relative,
                         expected_cloud_fraction=cal.cloud_fraction, expected_quality=cal.quality,
                         reached=cal.reached, n=int(np.asarray(scores).size))
    return cal


#: The package-data file of built-in calibration scores (see the module docstring).
BUILTIN_CALIBRATION_FILE = "calibration.json"


@functools.lru_cache(maxsize=1)
def _builtin_document() -> dict[str, Any]:
    text = resources.files("tether.routing").joinpath(BUILTIN_CALIBRATION_FILE).read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    if doc.get("format") != "tether-router-calibration":
        raise ValueError(f"{BUILTIN_CALIBRATION_FILE} is not a Tether router calibration file")
    return doc


def builtin_scores(level: str, name: str) -> npt.NDArray[np.float64] | None:
    """The shipped calibration scores of a training-free router, sorted; None if none ship.

    Args:
        level: ``"query"`` (names are `SIGNALS`) or ``"token"`` (``"confidence"``, ``"margin"``).
        name: the router's signal or kind.

    Returns:
        Sorted quantiles of the router's scores on the task bank, measured with the default
        edge model (``calibration.json``'s ``edge_model``; another edge model shifts them).
    """
    table = _builtin_document().get(level, {})
    scores = table.get(name)
    return None if scores is None else np.sort(np.asarray(scores, dtype=np.float64))


def builtin_query_draft_tokens() -> int:
    """The draft length the shipped query scores were measured with (signals depend on it)."""
    return int(_builtin_document()["query_draft_tokens"])
