"""How many tokens to draft each round: fixed, the transformers heuristic, or cost-model adaptive.

What belongs here: `DraftLengthPolicy` implementations, pure and clock-free (they are fed
measurements, they never take them), so each is testable alone.
What does not: drafting itself, or timing it (the speculative strategy measures).

The adaptive policy maximises expected committed tokens per second. With a per-token
acceptance rate alpha (Leviathan et al. 2023, eq. 1) a draft of k tokens commits
E[k] = (1 - alpha^(k+1)) / (1 - alpha) tokens per verify (accepted drafts plus the
correction or bonus token). One round costs the network round trip, the cloud's verify
time V(k) — a line fitted over all rounds plus what each k measured beyond it, since on a
CPU it is neither flat in k nor quiet — and the draft time that pipelining did not hide.
The policy picks the k in [1, limit] with the best ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundObservation:
    """What one verify round measured.

    Attributes:
        drafted: draft tokens sent.
        accepted: draft tokens accepted.
        draft_s_per_token: edge seconds per drafted token (None if nothing was timed).
        verify_s: cloud seconds for the verify (compute plus queueing).
        network_s: the rest of the request's wall time (transfer and latency).
        prefetch_hit: the next draft was already drafted ahead when the result came.
    """

    drafted: int
    accepted: int
    draft_s_per_token: float | None
    verify_s: float
    network_s: float
    prefetch_hit: bool = False


@runtime_checkable
class DraftLengthPolicy(Protocol):
    """Chooses the next draft length and learns from each round."""

    def choose(self, *, limit: int) -> int:
        """The draft length for the next round, in [1, limit] (limit >= 1)."""
        ...

    def update(self, observation: RoundObservation) -> None:
        """Learn from a finished round."""
        ...


class FixedDraftLength:
    """Always draft `k` tokens (capped by the round's limit)."""

    def __init__(self, k: int = 4) -> None:
        if k < 1:
            raise ValueError(f"draft length must be >= 1, got {k}")
        self.k = k

    def choose(self, *, limit: int) -> int:
        return max(1, min(self.k, limit))

    def update(self, observation: RoundObservation) -> None:
        return None

    def __repr__(self) -> str:
        return f"FixedDraftLength(k={self.k})"


class HeuristicDraftLength:
    """transformers' "heuristic" schedule: +2 after a fully accepted draft, else -1 (min 1).

    The baseline the adaptive policy is compared against (transformers
    `AssistedCandidateGenerator.update_candidate_strategy`).
    """

    def __init__(self, initial: int = 5, maximum: int = 32) -> None:
        if initial < 1 or maximum < 1:
            raise ValueError("draft lengths must be >= 1")
        self.k = initial
        self.maximum = maximum

    def choose(self, *, limit: int) -> int:
        return max(1, min(self.k, limit))

    def update(self, observation: RoundObservation) -> None:
        if observation.drafted and observation.accepted == observation.drafted:
            self.k = min(self.maximum, self.k + 2)
        else:
            self.k = max(1, self.k - 1)

    def __repr__(self) -> str:
        return f"HeuristicDraftLength(k={self.k})"


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens committed by one verify of k drafts at acceptance rate alpha."""
    if alpha >= 1.0 - 1e-9:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def round_seconds(k: int, *, alpha: float, draft_s: float, network_s: float, verify_s: float, pipelined: bool) -> float:
    """Expected seconds of one round that drafts k tokens (the cost model's denominator).

    The wait is the network plus the verify. Without pipelining the k drafts come first.
    With it, a hit (all k accepted and the edge's bonus guess right: alpha^(k+1)) finds the
    next block drafted during the wait, so only drafting beyond the wait shows; a miss
    drafts the next block from scratch.
    """
    wait = network_s + verify_s
    if not pipelined:
        return wait + k * draft_s
    hit = alpha ** (k + 1)
    return wait + hit * max(0.0, (k + 1) * draft_s - wait) + (1.0 - hit) * k * draft_s


class AdaptiveDraftLength:
    """Choose k to maximise expected committed tokens per second, from live measurements.

    Estimates (exponentially weighted, weight `decay` on the past): the acceptance rate
    alpha (maximum likelihood of the geometric acceptance model: accepted / (accepted +
    rejections), starting from a prior), the edge's draft time per token, the network time
    per request, and the cloud's verify cost V(k).

    V(k) pools every round: a weighted least-squares line ``a + b * (k + 1)`` over all the
    (k, verify seconds) pairs seen (the pass holds k drafts and the pending token), pulled
    towards ``b = prior_slope * a`` while k has barely varied. Each k's own mean departure
    from the line is added back, shrunk by how often that k was measured, so a real step
    in the cost curve (a kernel change at some width) is learnt, while one noisy round on
    a shared CPU cannot make a k look cheap (per-k averages alone chase such luck: the
    policy then keeps the lucky k because it never re-measures the others).

    Args:
        max_k: the longest draft ever chosen.
        pipelined: the strategy drafts ahead while a verify is in flight, so draft time
            is hidden whenever the next block was prefetched (probability alpha^(k+1)).
        prior_alpha, prior_weight: the acceptance prior and its weight in rounds.
        decay: weight of the past in every running estimate (0 < decay < 1).
        prior_slope: the verify cost's growth per extra token relative to its fixed part,
            assumed until measurements at several k say otherwise.
        shrink: rounds of evidence a k needs before its own departure from the line
            counts half.
        probe_every: every this many rounds, try a neighbour of the best k (alternately
            one longer and one shorter), so the line sees more than one width.

    One policy is meant to live as long as its client: the cost curve and the draft
    speed belong to the deployment, and the acceptance estimate carries over as a prior.
    """

    def __init__(
        self,
        *,
        max_k: int = 16,
        pipelined: bool = True,
        prior_alpha: float = 0.6,
        prior_weight: float = 3.0,
        decay: float = 0.9,
        prior_slope: float = 0.1,
        shrink: float = 1.0,
        probe_every: int = 8,
    ) -> None:
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if prior_slope < 0 or shrink <= 0 or probe_every < 2:
            raise ValueError("prior_slope must be >= 0, shrink > 0 and probe_every >= 2")
        self.max_k = max_k
        self.pipelined = pipelined
        self.decay = decay
        self.prior_slope = prior_slope
        self.shrink = shrink
        self.probe_every = probe_every
        self._acc = prior_alpha * prior_weight
        self._rej = (1.0 - prior_alpha) * prior_weight
        self._draft_s: float | None = None
        self._network_s: float | None = None
        # Weighted sums over (n = k + 1, v = verify seconds) for the pooled line.
        self._sw = self._sn = self._snn = self._sv = self._snv = 0.0
        # Per k: weighted mean departure from the line, and its weight.
        self._resid: dict[int, float] = {}
        self._resid_w: dict[int, float] = {}
        self._rounds = 0

    # -- estimates -------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        """Current per-token acceptance estimate."""
        return self._acc / (self._acc + self._rej)

    def _line(self) -> tuple[float, float] | None:
        """``(a, b)`` of the pooled verify-cost line ``a + b * (k + 1)``; None before data."""
        if self._sw <= 0.0:
            return None
        mean_n, mean_v = self._sn / self._sw, self._sv / self._sw
        var = max(0.0, self._snn / self._sw - mean_n * mean_n)
        cov = self._snv / self._sw - mean_n * mean_v
        a0 = mean_v / (1.0 + self.prior_slope * mean_n)
        prior_weight = 1.0  # in squared tokens: a spread of +-1 in k weighs as much as the prior
        b = max(0.0, (cov + prior_weight * self.prior_slope * a0) / (var + prior_weight))
        a = max(0.0, mean_v - b * mean_n)
        return a, b

    def verify_cost(self, k: int) -> float:
        """Estimated cloud seconds to verify k drafts (0 before any measurement)."""
        line = self._line()
        if line is None:
            return 0.0
        a, b = line
        fitted = a + b * (k + 1)
        w = self._resid_w.get(k, 0.0)
        if w > 0.0:
            fitted += self._resid[k] * w / (w + self.shrink)
        return max(0.0, fitted)

    def expected_rate(self, k: int) -> float:
        """Expected committed tokens per second (per arbitrary unit before measurements)."""
        alpha = self.alpha
        tokens = expected_tokens(alpha, k)
        if self._sw <= 0.0:
            # Nothing timed yet: the prior's shape of the verify cost, in units of its fixed part.
            return tokens / (1.0 + self.prior_slope * (k + 1))
        seconds = round_seconds(k, alpha=alpha, draft_s=self._draft_s or 0.0, network_s=self._network_s or 0.0,
                                verify_s=self.verify_cost(k), pipelined=self.pipelined)
        return tokens / seconds if seconds > 0.0 else tokens

    def best(self, *, limit: int) -> int:
        """The k in [1, limit] with the highest expected rate (no side effects)."""
        top = max(1, min(limit, self.max_k))
        best_k, best_rate = 1, -math.inf
        for k in range(1, top + 1):
            rate = self.expected_rate(k)
            if rate > best_rate * (1.0 + 1e-9):
                best_k, best_rate = k, rate
        return best_k

    # -- policy ----------------------------------------------------------------------

    def choose(self, *, limit: int) -> int:
        k = self.best(limit=limit)
        self._rounds += 1
        if self._rounds % self.probe_every == 0:
            # Probe a neighbour, alternately longer and shorter, so the cost line is fitted
            # over more than one width (and follows the load).
            step = 1 if (self._rounds // self.probe_every) % 2 else -1
            top = max(1, min(limit, self.max_k))
            for probe in (k + step, k - step):
                if 1 <= probe <= top:
                    return probe
        return k

    def update(self, observation: RoundObservation) -> None:
        d = self.decay
        rejected = 1.0 if observation.accepted < observation.drafted else 0.0
        self._acc = d * self._acc + observation.accepted
        self._rej = d * self._rej + rejected
        if observation.draft_s_per_token is not None:
            self._draft_s = _ema(self._draft_s, observation.draft_s_per_token, d)
        self._network_s = _ema(self._network_s, max(0.0, observation.network_s), d)
        k = observation.drafted
        if k < 1:
            return
        v = max(0.0, observation.verify_s)
        line = self._line()
        n = float(k + 1)
        self._sw = d * self._sw + 1.0
        self._sn = d * self._sn + n
        self._snn = d * self._snn + n * n
        self._sv = d * self._sv + v
        self._snv = d * self._snv + n * v
        if line is not None:  # departure from the line as it stood before this round
            resid = v - (line[0] + line[1] * n)
            w = d * self._resid_w.get(k, 0.0) + 1.0
            self._resid[k] = self._resid.get(k, 0.0) + (resid - self._resid.get(k, 0.0)) / w
            self._resid_w[k] = w

    def __repr__(self) -> str:
        return f"AdaptiveDraftLength(alpha={self.alpha:.2f}, max_k={self.max_k})"


def _ema(old: float | None, new: float, weight_old: float) -> float:
    return new if old is None else weight_old * old + (1.0 - weight_old) * new
