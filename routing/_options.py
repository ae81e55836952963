"""`RoutingOptions`: which router the edge SDK's routing modes use, and at what threshold.

What belongs here: the options value and how it resolves to a router and a threshold.
What does not: the generation strategies (`tether.edge.route._strategies`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.errors import ConfigurationError
from tether.routing._base import Router, load_router
from tether.routing._query import QueryRouter, SignalRouter
from tether.routing._signals import SIGNALS
from tether.routing._token import TokenRouter, make_token_router

if TYPE_CHECKING:
    from tether.routing._embed import MiniLMEmbedder

RouterSpec = Any  # a Router, a router file path, or a training-free router's name


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingOptions:
    """How ``mode="route-query"`` and ``mode="route-token"`` route.

    Attributes:
        query_router: a `QueryRouter`, the path of a saved router, or a training-free
            signal name (`SIGNALS`, default ``"draft_mean_logprob"``).
        token_router: a `TokenRouter`, a path, or ``"confidence"`` (default) /
            ``"margin"`` / ``"random"``.
        threshold: route to the cloud below this score. Give this or `cloud_fraction`;
            with neither, the router's own (saved) threshold is used.
        cloud_fraction: the share of queries (route-query) or tokens (route-token) to send
            to the cloud, resolved through the router's calibration scores.
        embedder: the MiniLM embedder for embedding routers (default: a shared one).
    """

    query_router: RouterSpec = "draft_mean_logprob"
    token_router: RouterSpec = "confidence"
    threshold: float | None = None
    cloud_fraction: float | None = None
    embedder: MiniLMEmbedder | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and self.cloud_fraction is not None:
            raise ConfigurationError("give threshold or cloud_fraction, not both")
        if self.cloud_fraction is not None and not 0.0 <= self.cloud_fraction <= 1.0:
            raise ConfigurationError(f"cloud_fraction must be in [0, 1], got {self.cloud_fraction}")

    def resolve_query(self) -> tuple[QueryRouter, float]:
        """The query router and its threshold. Raises `ConfigurationError` if none is known."""
        router = _router(self.query_router, "query")
        assert isinstance(router, QueryRouter)
        return router, self._threshold(router)

    def resolve_token(self) -> tuple[TokenRouter, float]:
        """The token router and its threshold. Raises `ConfigurationError` if none is known."""
        router = _router(self.token_router, "token")
        assert isinstance(router, TokenRouter)
        return router, self._threshold(router)

    def _threshold(self, router: Router) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        if self.cloud_fraction is not None:
            return router.threshold_for_fraction(self.cloud_fraction)
        if router.threshold is None:
            raise ConfigurationError(
                f"router {router.kind!r} has no threshold: pass RoutingOptions(threshold=...) or "
                "cloud_fraction=..., or calibrate and save the router"
            )
        return float(router.threshold)


def _router(spec: RouterSpec, level: str) -> Router:
    if isinstance(spec, Router):
        router = spec
    elif isinstance(spec, (str, os.PathLike)) and Path(spec).suffix == ".safetensors":
        router = load_router(spec)
    elif isinstance(spec, str) and level == "query" and spec in SIGNALS:
        router = SignalRouter(spec)
    elif isinstance(spec, str) and level == "token":
        try:
            router = make_token_router(spec)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
    else:
        raise ConfigurationError(f"cannot make a {level} router from {spec!r}")
    if router.level != level:
        raise ConfigurationError(f"route-{level} needs a {level} router, got a {router.level} router ({router.kind!r})")
    return router
