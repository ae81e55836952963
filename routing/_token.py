"""Per-token reward routers: at each position, is the edge's next token good enough?

What belongs here: `TokenRouter` and its implementations: training-free
`ConfidenceTokenRouter` (edge top-1 probability), `MarginTokenRouter` (top-1 minus top-2),
the learned `LearnedTokenRouter` (a head on the edge's hidden state predicting agreement
with the cloud's next token), and `RandomTokenRouter`. What does not: the generation loop
that asks the cloud for the routed tokens (`tether.edge.route._strategies`).

Reference: "Efficient Hybrid Inference for LLMs: Reward-Based Token Modelling with
Selective Cloud Assistance" (Banerjee et al., 2024): the small model generates; a reward
score of each token decides whether the large model supplies that token instead. Here the
learned reward is the probability that the edge's greedy token equals the cloud's (the
label is computed from pairs the two models generate, see `agreement_pairs`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch

from tether.routing._base import Decision, Router
from tether.routing._classifier import Classifier, FitOptions
from tether.routing._signals import FloatArray, token_signals

#: Feature groups of a learned token router.
TOKEN_FEATURES: tuple[str, ...] = ("hidden", "signals")


class TokenRouter(Router):
    """A router over single output positions. Scores read the edge's logits (and hidden state)."""

    level: ClassVar[str] = "token"

    @property
    def needs_hidden(self) -> bool:
        """Whether `score_token` reads the edge's hidden state."""
        return False

    def score_token(self, logits: torch.Tensor, hidden: torch.Tensor | None = None) -> float:
        """Score the position whose edge logits are `logits` [V] (hidden state [H])."""
        assert logits.ndim == 1, f"logits must be [vocab], got {tuple(logits.shape)}"
        sig = token_signals(logits[None, :]).as_matrix()
        h = None if hidden is None else hidden.detach().float().reshape(1, -1).cpu().numpy()
        return float(self.score_features(sig, h)[0])

    def score_features(self, signals: FloatArray, hidden: FloatArray | None = None) -> npt.NDArray[np.float64]:
        """Scores of n positions from their signals [n, 3] (top_prob, margin, entropy) and hidden [n, H]."""
        raise NotImplementedError

    def decide_token(self, logits: torch.Tensor, hidden: torch.Tensor | None = None,
                     threshold: float | None = None) -> Decision:
        return self.decide_score(self.score_token(logits, hidden), threshold)


class _SignalTokenRouter(TokenRouter):
    """Training-free: the score is one column of the token signals (top_prob, margin,
    entropy); its calibration scores ship with the package. Not registered (no `kind`)."""

    _column: ClassVar[int]

    def score_features(self, signals: FloatArray, hidden: FloatArray | None = None) -> npt.NDArray[np.float64]:
        return np.asarray(signals, dtype=np.float64)[:, self._column]

    def builtin_scores(self) -> npt.NDArray[np.float64] | None:
        from tether.routing._calibration import builtin_scores

        return builtin_scores("token", self.kind)

    def config(self) -> dict[str, Any]:
        return {}


class ConfidenceTokenRouter(_SignalTokenRouter):
    """Training-free: the edge's probability of its own top token."""

    kind: ClassVar[str] = "confidence"
    _column: ClassVar[int] = 0


class MarginTokenRouter(_SignalTokenRouter):
    """Training-free: the gap between the edge's top-1 and top-2 probabilities."""

    kind: ClassVar[str] = "margin"
    _column: ClassVar[int] = 1


class RandomTokenRouter(TokenRouter):
    """Baseline: an independent uniform score per position (seeded)."""

    kind: ClassVar[str] = "random-token"

    def __init__(self, seed: int = 0, *, threshold: float | None = None) -> None:
        super().__init__(threshold=threshold)
        self.seed = seed
        self._rng = random.Random(seed)

    def score_features(self, signals: FloatArray, hidden: FloatArray | None = None) -> npt.NDArray[np.float64]:
        return np.array([self._rng.random() for _ in range(len(signals))])

    def builtin_scores(self) -> npt.NDArray[np.float64] | None:
        """Scores are uniform in [0, 1): their quantiles are known without any traffic."""
        return np.linspace(0.0, 1.0, 1001)

    def config(self) -> dict[str, Any]:
        return {"seed": self.seed}


class LearnedTokenRouter(TokenRouter):
    """The reward model: P(edge's greedy token == cloud's greedy token) from the edge's state.

    Args:
        features: ``"hidden"`` (the edge's last-layer hidden state) and/or ``"signals"``
            (top-1 probability, margin, entropy).
        classifier: trained with `fit` on `AgreementPairs`.
        threshold: see `Router`.
    """

    kind: ClassVar[str] = "learned-token"

    def __init__(self, features: tuple[str, ...] | list[str], classifier: Classifier, *,
                 threshold: float | None = None) -> None:
        super().__init__(threshold=threshold)
        if not features or any(f not in TOKEN_FEATURES for f in features):
            raise ValueError(f"features must be a non-empty subset of {TOKEN_FEATURES}, got {list(features)}")
        self.features = tuple(features)
        self.classifier = classifier

    @property
    def needs_hidden(self) -> bool:
        return "hidden" in self.features

    def _x(self, signals: FloatArray, hidden: FloatArray | None) -> FloatArray:
        parts = []
        if "hidden" in self.features:
            if hidden is None:
                raise ValueError("this token router needs the edge's hidden states (a torch edge model)")
            parts.append(np.asarray(hidden, dtype=np.float32))
        if "signals" in self.features:
            parts.append(np.asarray(signals, dtype=np.float32))
        return np.concatenate(parts, axis=1)

    @classmethod
    def fit(cls, signals: FloatArray, hidden: FloatArray | None, agree: npt.ArrayLike,
            features: tuple[str, ...] = ("hidden", "signals"), options: FitOptions = FitOptions()) -> LearnedTokenRouter:
        """Train on per-position signals [n, 3], hidden [n, H] and agreement labels [n]."""
        probe = cls(features, Classifier({"mean": np.zeros(1), "std": np.ones(1), "w1": np.zeros((1, 1)), "b1": np.zeros(1)}))
        x = probe._x(signals, hidden)
        return cls(features, Classifier.fit(x, agree, options))

    def score_features(self, signals: FloatArray, hidden: FloatArray | None = None) -> npt.NDArray[np.float64]:
        return self.classifier.predict_proba(self._x(signals, hidden)).astype(np.float64)

    def config(self) -> dict[str, Any]:
        return {"features": list(self.features)}

    def tensors(self) -> dict[str, npt.NDArray[Any]]:
        return dict(self.classifier.params)

    @classmethod
    def from_parts(cls, config: Mapping[str, Any], tensors: Mapping[str, npt.NDArray[Any]]) -> LearnedTokenRouter:
        return cls(tuple(config["features"]), Classifier(tensors))


#: Training-free token routers by name (`make_token_router`).
BUILTIN_TOKEN_ROUTERS: tuple[str, ...] = ("confidence", "margin", "random")


def make_token_router(name: str, *, seed: int = 0) -> TokenRouter:
    """A training-free token router by name: ``"confidence"``, ``"margin"`` or ``"random"``."""
    if name == "confidence":
        return ConfidenceTokenRouter()
    if name == "margin":
        return MarginTokenRouter()
    if name == "random":
        return RandomTokenRouter(seed)
    raise ValueError(f"unknown token router {name!r}; choose confidence, margin, random, or load a file")
