"""Per-query routers: send the whole query to the edge or to the cloud.

What belongs here: `Query` (what a query router may read), the training-free
`SignalRouter`, the learned `LearnedQueryRouter`, and the `RandomRouter` baseline. What
does not: computing probes or embeddings (`_signals.py`, `_embed.py`), thresholds
(`_calibration.py`).

References: Hybrid LLM (Ding et al., ICLR 2024) routes on a learned difficulty score of the
query; RouteLLM (Ong et al., 2024) trains routers from preference labels and calibrates
their threshold as a quantile of scores on unlabelled traffic. Training-free signals
follow the uncertainty-based cascades (e.g. FrugalGPT's scorer replaced by the small
model's own log-probabilities and entropy over a short draft).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from tether.routing._base import Decision, Router
from tether.routing._classifier import Classifier, FitOptions
from tether.routing._signals import SIGNALS, EdgeProbe, FloatArray

#: Feature groups a learned query router can use.
QUERY_FEATURES: tuple[str, ...] = ("embedding", "hidden_mean", "hidden_last", "signals")


@dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    """A query as routers see it.

    Attributes:
        text: the user's request (the last user message).
        probe: the edge model's probe of the templated prompt (see `probe_query`), when a
            router needs it.
        embedding: the MiniLM embedding of `text`, when a router needs it.
    """

    text: str
    probe: EdgeProbe | None = None
    embedding: FloatArray | None = field(default=None, repr=False)


class QueryRouter(Router):
    """A router over whole queries. `needs` says which parts of a `Query` it reads."""

    level: ClassVar[str] = "query"

    @property
    def needs(self) -> frozenset[str]:
        """Subset of {"probe", "hidden", "embedding"}: what `score` reads from a `Query`."""
        return frozenset()

    @property
    def draft_tokens(self) -> int:
        """Edge draft length its probe needs (0: no draft)."""
        return 0

    def score(self, query: Query) -> float:
        """How well the edge is expected to answer `query` (higher = edge is enough)."""
        return float(self.score_many([query])[0])

    def score_many(self, queries: Sequence[Query]) -> npt.NDArray[np.float64]:
        return np.array([self.score(q) for q in queries], dtype=np.float64)

    def decide(self, query: Query, threshold: float | None = None) -> Decision:
        """Edge or cloud for `query` at `threshold` (default: the router's)."""
        return self.decide_score(self.score(query), threshold)

    def _need_probe(self, q: Query) -> EdgeProbe:
        if q.probe is None:
            raise ValueError(f"router {self.kind!r} needs the edge probe of the query (Query.probe)")
        return q.probe


class SignalRouter(QueryRouter):
    """Training-free: the score is one of the edge's own signals (`SIGNALS`), higher = easier.

    Args:
        signal: ``"prompt_logprob"`` (minus the log-perplexity of the prompt),
            ``"draft_mean_logprob"`` / ``"draft_min_logprob"`` (over the edge's greedy
            draft), ``"draft_neg_entropy"``, or ``"draft_mean_margin"``.
        draft_tokens: length of the edge draft the signal is measured on.
        threshold: see `Router`.
    """

    kind: ClassVar[str] = "signal"

    def __init__(self, signal: str = "draft_mean_logprob", *, draft_tokens: int = 16, threshold: float | None = None) -> None:
        super().__init__(threshold=threshold)
        if signal not in SIGNALS:
            raise ValueError(f"unknown signal {signal!r}; choose one of {', '.join(SIGNALS)}")
        if draft_tokens < (0 if signal == "prompt_logprob" else 1):
            raise ValueError(f"draft_tokens must be >= 1 for {signal!r}, got {draft_tokens}")
        self.signal = signal
        self._draft_tokens = draft_tokens

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"probe"})

    @property
    def draft_tokens(self) -> int:
        return 0 if self.signal == "prompt_logprob" else self._draft_tokens

    def builtin_scores(self) -> npt.NDArray[np.float64] | None:
        """The shipped scores of this signal, if they were measured with this draft length."""
        from tether.routing._calibration import builtin_query_draft_tokens, builtin_scores

        if self.signal != "prompt_logprob" and self._draft_tokens != builtin_query_draft_tokens():
            return None
        return builtin_scores("query", self.signal)

    def score(self, query: Query) -> float:
        return self._need_probe(query).signal(self.signal)

    def config(self) -> dict[str, Any]:
        return {"signal": self.signal, "draft_tokens": self._draft_tokens}


class RandomRouter(QueryRouter):
    """Baseline: a uniform score in [0, 1) from a hash of the query text and a seed.

    Deterministic per query (so a calibrated fraction holds across runs) and independent
    of difficulty: its quality-cost curve is the straight line between edge-only and
    cloud-only, APGR 0.5 in expectation.
    """

    kind: ClassVar[str] = "random"

    def __init__(self, seed: int = 0, *, threshold: float | None = None) -> None:
        super().__init__(threshold=threshold)
        self.seed = seed

    def score(self, query: Query) -> float:
        h = hashlib.sha256(f"{self.seed}\0{query.text}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    def builtin_scores(self) -> npt.NDArray[np.float64] | None:
        """Scores are uniform in [0, 1): their quantiles are known without any traffic."""
        return np.linspace(0.0, 1.0, 1001)

    def config(self) -> dict[str, Any]:
        return {"seed": self.seed}


def query_features(query: Query, features: Sequence[str]) -> FloatArray:
    """The feature vector of `query` for the given feature groups (`QUERY_FEATURES`), concatenated."""
    parts: list[FloatArray] = []
    for f in features:
        if f == "embedding":
            if query.embedding is None:
                raise ValueError("feature 'embedding' needs Query.embedding (MiniLM)")
            parts.append(np.asarray(query.embedding, dtype=np.float32))
        elif f in ("hidden_mean", "hidden_last"):
            probe = query.probe
            h = None if probe is None else getattr(probe, f)
            if h is None:
                raise ValueError(f"feature {f!r} needs an edge probe with hidden states (a torch edge model)")
            parts.append(np.asarray(h, dtype=np.float32))
        elif f == "signals":
            if query.probe is None:
                raise ValueError("feature 'signals' needs Query.probe")
            parts.append(query.probe.signal_vector())
        else:
            raise ValueError(f"unknown feature {f!r}; choose from {', '.join(QUERY_FEATURES)}")
    return np.concatenate(parts).astype(np.float32)


class LearnedQueryRouter(QueryRouter):
    """A classifier's probability that the edge's answer is good enough (label 1 in its training data).

    Tether's benchmark labels a query 1 when the edge's answer passes its unit tests; the
    first label, "as good as the cloud's answer", also marked the tasks both models fail
    as easy, which made it unlearnable from 71 tasks (docs/routing.md).

    Args:
        features: feature groups (`QUERY_FEATURES`): MiniLM ``"embedding"`` of the text,
            the edge's ``"hidden_mean"`` / ``"hidden_last"`` over the prompt, its scalar
            ``"signals"``.
        classifier: the trained classifier (see `fit`).
        draft_tokens: edge draft length behind the ``"signals"`` feature.
        threshold: see `Router`.
    """

    kind: ClassVar[str] = "learned-query"

    def __init__(self, features: Sequence[str], classifier: Classifier, *, draft_tokens: int = 16,
                 threshold: float | None = None) -> None:
        super().__init__(threshold=threshold)
        bad = [f for f in features if f not in QUERY_FEATURES]
        if bad or not features:
            raise ValueError(f"features must be a non-empty subset of {QUERY_FEATURES}, got {list(features)}")
        self.features = tuple(features)
        self.classifier = classifier
        self._draft_tokens = draft_tokens

    @classmethod
    def fit(cls, queries: Sequence[Query], labels: Sequence[float], features: Sequence[str],
            options: FitOptions = FitOptions(), *, draft_tokens: int = 16) -> LearnedQueryRouter:
        """Train on queries labelled 1 where the edge's answer was good enough, 0 where it was not."""
        x = np.stack([query_features(q, features) for q in queries])
        return cls(features, Classifier.fit(x, labels, options), draft_tokens=draft_tokens)

    @property
    def needs(self) -> frozenset[str]:
        out = set()
        if "embedding" in self.features:
            out.add("embedding")
        if any(f.startswith("hidden") for f in self.features):
            out |= {"probe", "hidden"}
        if "signals" in self.features:
            out.add("probe")
        return frozenset(out)

    @property
    def draft_tokens(self) -> int:
        return self._draft_tokens if "signals" in self.features else 0

    def score_many(self, queries: Sequence[Query]) -> npt.NDArray[np.float64]:
        if not queries:
            return np.zeros(0)
        x = np.stack([query_features(q, self.features) for q in queries])
        return self.classifier.predict_proba(x).astype(np.float64)

    def score(self, query: Query) -> float:
        return float(self.score_many([query])[0])

    def config(self) -> dict[str, Any]:
        return {"features": list(self.features), "draft_tokens": self._draft_tokens}

    def tensors(self) -> dict[str, npt.NDArray[Any]]:
        return dict(self.classifier.params)

    @classmethod
    def from_parts(cls, config: Mapping[str, Any], tensors: Mapping[str, npt.NDArray[Any]]) -> LearnedQueryRouter:
        return cls(config["features"], Classifier(tensors), draft_tokens=int(config.get("draft_tokens", 16)))
