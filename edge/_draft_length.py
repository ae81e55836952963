"""How many tokens to draft each round: fixed, the transformers heuristic, or cost-model adaptive.

What belongs here: `DraftLengthPolicy` implementations, pure and clock-free (they are fed
measurements, they never take them), so each is testable alone.
What does not: drafting itself, or timing it (the speculative strategy measures).

The adaptive policy maximises expected committed tokens per second. With a per-token
acceptance rate alpha (Leviathan et al. 2023, eq. 1) a draft of k tokens commits
E[k] = (1 - alpha^(k+1)) / (1 - alpha) tokens per verify (accepted drafts plus the
correction or bonus token). One round costs the network round trip, the cloud's verify
time V(k) — measured per k, since on a CPU it is not flat in k — and the draft time that
pipelining did not hide. The policy picks the k in [1, limit] with the best ratio.
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


class AdaptiveDraftLength:
    """Choose k to maximise expected committed tokens per second, from live measurements.

    Estimates, each an exponentially weighted average (weight `decay` on the past):
    the acceptance rate alpha (maximum likelihood of the geometric acceptance model:
    accepted / (accepted + rejections), starting from a prior), the edge's draft time per
    token, the network time per request, and the verify time V(k) for each k seen. V(k)
    for an unseen k is interpolated between seen ones, and extrapolated with a mild
    optimistic slope, so the policy explores longer drafts until measurements stop it.

    Args:
        max_k: the longest draft ever chosen.
        pipelined: the strategy drafts ahead while a verify is in flight, so draft time
            is hidden whenever the next block was prefetched (probability ~alpha^(k+1)).
        prior_alpha, prior_weight: the acceptance prior and its weight in rounds.
        decay: weight of the past in every running estimate (0 < decay < 1).
        unseen_slope: relative verify-cost growth per extra token assumed for k beyond
            the longest measured.
        reprobe_every: every this many rounds, try a neighbour of the best k whose
            verify time was not measured in that long.

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
        unseen_slope: float = 0.05,
        reprobe_every: int = 16,
    ) -> None:
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.max_k = max_k
        self.pipelined = pipelined
        self.decay = decay
        self.unseen_slope = unseen_slope
        self._acc = prior_alpha * prior_weight
        self._rej = (1.0 - prior_alpha) * prior_weight
        self._draft_s: float | None = None
        self._network_s: float | None = None
        self._verify_s: dict[int, float] = {}
        self._seen_at: dict[int, int] = {}
        self._rounds = 0
        self.reprobe_every = reprobe_every

    # -- estimates -------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        """Current per-token acceptance estimate."""
        return self._acc / (self._acc + self._rej)

    def verify_cost(self, k: int) -> float:
        """Estimated cloud seconds to verify k drafts (0 before any measurement).

        Between measured lengths: linear interpolation. Below the shortest measured: in
        proportion to the tokens in the pass (k drafts + 1 pending), which is optimistic
        for short drafts, so they get tried. Above the longest: a mild `unseen_slope`
        per extra token, optimistic for long drafts too.
        """
        seen = self._verify_s
        if not seen:
            return 0.0
        if k in seen:
            return seen[k]
        lower = [j for j in seen if j < k]
        upper = [j for j in seen if j > k]
        if lower and upper:
            a, b = max(lower), min(upper)
            t = (k - a) / (b - a)
            return seen[a] + t * (seen[b] - seen[a])
        if lower:
            a = max(lower)
            return seen[a] * (1.0 + self.unseen_slope * (k - a))
        b = min(upper)
        return seen[b] * (k + 1) / (b + 1)

    def expected_rate(self, k: int) -> float:
        """Expected committed tokens per second (per arbitrary unit before measurements)."""
        alpha = self.alpha
        tokens = expected_tokens(alpha, k)
        draft = self._draft_s if self._draft_s is not None else 0.0
        network = self._network_s if self._network_s is not None else 0.0
        verify = self.verify_cost(k)
        wait = network + verify
        if self.pipelined:
            hit = alpha ** (k + 1)
            # A hit was drafted ahead during the wait: only the excess shows.
            draft_time = hit * max(0.0, (k + 1) * draft - wait) + (1.0 - hit) * k * draft
        else:
            draft_time = k * draft
        seconds = wait + draft_time
        if seconds <= 0.0:
            # Nothing measured yet: a tiny per-token cost keeps k finite.
            seconds = 1.0 + 0.1 * k
        return tokens / seconds

    # -- policy ----------------------------------------------------------------------

    def choose(self, *, limit: int) -> int:
        top = max(1, min(limit, self.max_k))
        best_k, best_rate = 1, -math.inf
        for k in range(1, top + 1):
            rate = self.expected_rate(k)
            if rate > best_rate * (1.0 + 1e-9):
                best_k, best_rate = k, rate
        # Re-probe a neighbour whose measurement went stale, so the cost curve follows
        # the load (one round in `reprobe_every`).
        self._rounds += 1
        if self._rounds % self.reprobe_every == 0:
            for k in (best_k + 1, best_k - 1):
                if 1 <= k <= top and self._rounds - self._seen_at.get(k, -10**9) > self.reprobe_every:
                    return k
        return best_k

    def update(self, observation: RoundObservation) -> None:
        d = self.decay
        rejected = 1.0 if observation.accepted < observation.drafted else 0.0
        self._acc = d * self._acc + observation.accepted
        self._rej = d * self._rej + rejected
        if observation.draft_s_per_token is not None:
            self._draft_s = _ema(self._draft_s, observation.draft_s_per_token, d)
        self._network_s = _ema(self._network_s, max(0.0, observation.network_s), d)
        k = observation.drafted
        if k >= 1:
            self._verify_s[k] = _ema(self._verify_s.get(k), max(0.0, observation.verify_s), 0.7)
            self._seen_at[k] = self._rounds

    def __repr__(self) -> str:
        return f"AdaptiveDraftLength(alpha={self.alpha:.2f}, max_k={self.max_k})"


def _ema(old: float | None, new: float, weight_old: float) -> float:
    return new if old is None else weight_old * old + (1.0 - weight_old) * new
