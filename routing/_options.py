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
from tether.routing._query import QueryRouter, RandomRouter, SignalRouter
from tether.routing._signals import SIGNALS
from tether.routing._token import BUILTIN_TOKEN_ROUTERS, TokenRouter, make_token_router

if TYPE_CHECKING:
    from tether.routing._embed import MiniLMEmbedder

RouterSpec = Any  # a Router, a router file path, or a training-free router's name

#: Training-free query routers by name: each signal of `SIGNALS`, and the ``"random"`` baseline.
BUILTIN_QUERY_ROUTERS: tuple[str, ...] = (*SIGNALS, "random")


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingOptions:
    """How ``mode="route-query"`` and ``mode="route-token"`` route.

    Attributes:
        query_router: a `QueryRouter`, the path of a saved router, or a training-free
            signal name (`SIGNALS`, default ``"draft_mean_logprob"``) or ``"random"``.
        token_router: a `TokenRouter`, a path, or ``"confidence"`` (default) /
            ``"margin"`` / ``"random"``.
        threshold: route to the cloud below this score. Give this or `cloud_fraction`;
            with neither, the router's own (saved) threshold is used, else the mode's
            default threshold (`tether.edge.MODE_REGISTRY`).
        cloud_fraction: the share of queries (route-query) or tokens (route-token) to send
            to the cloud, resolved through the router's calibration scores; every built-in
            router ships scores measured on Tether's task bank, so no calibration step is
            needed. 0 keeps everything on the edge (no cloud session is opened); 1 sends
            everything.
        embedder: the MiniLM embedder for embedding routers (default: a shared one).
    """

    query_router: RouterSpec = "draft_mean_logprob"  # = DEFAULT_ROUTERS["query"]
    token_router: RouterSpec = "confidence"  # = DEFAULT_ROUTERS["token"]
    threshold: float | None = None
    cloud_fraction: float | None = None
    embedder: MiniLMEmbedder | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and self.cloud_fraction is not None:
            raise ConfigurationError("give threshold or cloud_fraction, not both")
        if self.cloud_fraction is not None and not 0.0 <= self.cloud_fraction <= 1.0:
            raise ConfigurationError(f"cloud_fraction must be in [0, 1], got {self.cloud_fraction}")

    def resolve_query(self, default_threshold: float | None = None) -> tuple[QueryRouter, float]:
        """The query router and its threshold (see `threshold`; `default_threshold` last).

        Raises:
            ConfigurationError: the router cannot be made, or no threshold is known.
        """
        router = _router(self.query_router, "query")
        assert isinstance(router, QueryRouter)
        return router, self._threshold(router, default_threshold)

    def resolve_token(self, default_threshold: float | None = None) -> tuple[TokenRouter, float]:
        """The token router and its threshold (see `threshold`; `default_threshold` last).

        Raises:
            ConfigurationError: the router cannot be made, or no threshold is known.
        """
        router = _router(self.token_router, "token")
        assert isinstance(router, TokenRouter)
        return router, self._threshold(router, default_threshold)

    def _threshold(self, router: Router, default: float | None) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        if self.cloud_fraction is not None:
            return router.threshold_for_fraction(self.cloud_fraction)
        if router.threshold is not None:
            return float(router.threshold)
        spec = self.query_router if router.level == "query" else self.token_router
        # A mode's default threshold is on the scale of that mode's default router only.
        if default is not None and spec == DEFAULT_ROUTERS[router.level]:
            return float(default)
        raise ConfigurationError(
            f"router {router.kind!r} has no threshold: pass RoutingOptions(threshold=...) or "
            "cloud_fraction=..., or calibrate and save the router"
        )


#: The router each level uses unless told otherwise (the defaults of `RoutingOptions`).
DEFAULT_ROUTERS: dict[str, str] = {"query": "draft_mean_logprob", "token": "confidence"}


def _router(spec: RouterSpec, level: str) -> Router:
    if isinstance(spec, Router):
        router = spec
    elif isinstance(spec, (str, os.PathLike)) and Path(spec).suffix == ".safetensors":
        router = load_router(spec)
    elif isinstance(spec, str) and level == "query" and spec in SIGNALS:
        router = SignalRouter(spec)
    elif isinstance(spec, str) and level == "query" and spec == "random":
        router = RandomRouter()
    elif isinstance(spec, str) and level == "token":
        try:
            router = make_token_router(spec)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
    else:
        names = BUILTIN_QUERY_ROUTERS if level == "query" else BUILTIN_TOKEN_ROUTERS
        raise ConfigurationError(
            f"cannot make a {level} router from {spec!r}: give a .safetensors router file or one of {', '.join(names)}"
        )
    if router.level != level:
        raise ConfigurationError(f"route-{level} needs a {level} router, got a {router.level} router ({router.kind!r})")
    return router
