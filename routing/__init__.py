"""tether.routing: per-query and per-token routers deciding between edge and cloud.

Every router scores an input (higher = the edge is good enough) and sends it to the cloud
below a threshold; thresholds are calibrated to a cloud budget or a quality target; routers
save to and load from one ``.safetensors`` file (no pickle). The edge SDK runs them in
``mode="route-query"`` and ``mode="route-token"`` (see `RoutingOptions`).
"""

from tether.routing._base import Decision, Router, load_router
from tether.routing._calibration import (
    QualityCalibration,
    calibrate_cloud_fraction,
    calibrate_quality,
    cloud_fraction,
    threshold_for_cloud_fraction,
    threshold_for_quality,
)
from tether.routing._classifier import Classifier, FitOptions
from tether.routing._data import build_queries, edge_answer_positions, prompt_ids, read_records, score_records
from tether.routing._embed import MiniLMEmbedder, default_embedder
from tether.routing._options import BUILTIN_QUERY_ROUTERS, RoutingOptions
from tether.routing._query import (
    QUERY_FEATURES,
    LearnedQueryRouter,
    Query,
    QueryRouter,
    RandomRouter,
    SignalRouter,
)
from tether.routing._signals import SIGNALS, EdgeProbe, TokenSignals, probe_query, token_signals
from tether.routing._token import (
    BUILTIN_TOKEN_ROUTERS,
    TOKEN_FEATURES,
    ConfidenceTokenRouter,
    LearnedTokenRouter,
    MarginTokenRouter,
    RandomTokenRouter,
    TokenRouter,
)

__all__ = [
    "BUILTIN_QUERY_ROUTERS",
    "BUILTIN_TOKEN_ROUTERS",
    "QUERY_FEATURES",
    "SIGNALS",
    "TOKEN_FEATURES",
    "Classifier",
    "ConfidenceTokenRouter",
    "Decision",
    "EdgeProbe",
    "FitOptions",
    "LearnedQueryRouter",
    "LearnedTokenRouter",
    "MarginTokenRouter",
    "MiniLMEmbedder",
    "QualityCalibration",
    "Query",
    "QueryRouter",
    "RandomRouter",
    "RandomTokenRouter",
    "Router",
    "RoutingOptions",
    "SignalRouter",
    "TokenRouter",
    "TokenSignals",
    "build_queries",
    "calibrate_cloud_fraction",
    "calibrate_quality",
    "cloud_fraction",
    "default_embedder",
    "edge_answer_positions",
    "load_router",
    "probe_query",
    "prompt_ids",
    "read_records",
    "score_records",
    "threshold_for_cloud_fraction",
    "threshold_for_quality",
    "token_signals",
]
