"""The router interface: score an input, decide at a threshold, save and load without pickle.

What belongs here: `Router` (the contract every router fulfils), `Decision`, the registry
that maps a saved file back to its class, and the file format. What does not: any scoring
rule (`_query.py`, `_token.py`) or how thresholds are chosen (`_calibration.py`).

Convention (one for every router): a score says how well the edge is expected to do;
**higher = the edge is good enough**. An input goes to the cloud when its score is
*below* the threshold. So raising the threshold sends more to the cloud.

File format: one ``.safetensors`` file. Its tensors are the router's parameters (none
for training-free routers); its metadata holds ``{"format": "tether-router", "version":
"1", "router": <JSON>}`` where the JSON has the router's kind, constructor config,
threshold and calibration record. Nothing is unpickled, so a router file from an
untrusted source cannot run code.
"""

from __future__ import annotations

import abc
import enum
import json
import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from tether.errors import ConfigurationError

FORMAT = "tether-router"
VERSION = "1"
_CAL_KEY = "calibration.scores"

R = TypeVar("R", bound="Router")


class Decision(str, enum.Enum):
    """Where an input goes."""

    EDGE = "edge"
    CLOUD = "cloud"


class Router(abc.ABC):
    """Base of every router: a threshold, a calibration record, and a serialisable config.

    Subclasses set `kind` (the registry key saved in files) and `level` (``"query"`` or
    ``"token"``), implement `config` (JSON-able constructor kwargs) and, if they have
    parameters, `tensors` and `from_parts`.

    Args:
        threshold: scores below it go to the cloud; None until calibrated or set.
    """

    kind: ClassVar[str]
    level: ClassVar[str]
    _registry: ClassVar[dict[str, type[Router]]] = {}

    def __init__(self, *, threshold: float | None = None) -> None:
        self.threshold = threshold
        self.calibration: dict[str, Any] = {}
        #: sorted scores of the calibration traffic (at most 1,001 quantiles), so any
        #: cloud fraction maps to a threshold later (`threshold_for_fraction`).
        self.calibration_scores: npt.NDArray[np.float64] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if isinstance(kind, str):
            Router._registry[kind] = cls

    # -- deciding -------------------------------------------------------------------------

    def decide_score(self, score: float, threshold: float | None = None) -> Decision:
        """`Decision.CLOUD` when `score` < threshold (the given one, else the router's).

        Raises:
            ConfigurationError: no threshold given and the router has none.
        """
        t = self.threshold if threshold is None else threshold
        if t is None:
            raise ConfigurationError(
                f"router {self.kind!r} has no threshold: pass threshold=..., or calibrate it "
                "(calibrate_cloud_fraction / calibrate_quality)"
            )
        return Decision.CLOUD if score < t else Decision.EDGE

    def set_threshold(self, threshold: float, **record: Any) -> None:
        """Set the threshold and remember how it was chosen (saved with the router)."""
        if math.isnan(threshold):
            raise ValueError("threshold must not be NaN")
        self.threshold = float(threshold)
        self.calibration = dict(record)

    def remember_scores(self, scores: npt.ArrayLike) -> None:
        """Keep the score distribution of calibration traffic (sorted; quantiles past 1,001)."""
        s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
        if s.size > 1001:
            s = np.quantile(s, np.linspace(0.0, 1.0, 1001))
        self.calibration_scores = s

    def builtin_scores(self) -> npt.NDArray[np.float64] | None:
        """Shipped calibration scores of this router (training-free routers); None otherwise."""
        return None

    def threshold_for_fraction(self, fraction: float) -> float:
        """The threshold sending `fraction` of the calibration traffic to the cloud.

        The traffic is the router's own calibration scores, else its shipped ones
        (`builtin_scores`). Fraction 0 gives -inf (nothing goes to the cloud), 1 gives +inf.

        Raises:
            ConfigurationError: the router was never calibrated on traffic and ships no scores.
        """
        scores = self.calibration_scores
        if scores is None or scores.size == 0:
            scores = self.builtin_scores()
        if scores is None or scores.size == 0:
            raise ConfigurationError(
                f"router {self.kind!r} holds no calibration scores; run `tether router calibrate` "
                "or calibrate_cloud_fraction() on representative prompts first"
            )
        from tether.routing._calibration import threshold_for_cloud_fraction

        return threshold_for_cloud_fraction(scores, fraction)

    # -- serialisation --------------------------------------------------------------------

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-able), without the threshold."""

    def tensors(self) -> dict[str, npt.NDArray[Any]]:
        """Named parameter arrays (none for training-free routers)."""
        return {}

    @classmethod
    def from_parts(cls: type[R], config: Mapping[str, Any], tensors: Mapping[str, npt.NDArray[Any]]) -> R:
        """Rebuild from `config` and `tensors` (training-free routers ignore tensors)."""
        return cls(**config)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "level": self.level, "config": self.config(),
                "threshold": self.threshold, "calibration": self.calibration}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the router to `path` (a ``.safetensors`` file; see the module docstring)."""
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(v) for k, v in self.tensors().items()}
        if self.calibration_scores is not None:
            tensors[_CAL_KEY] = np.ascontiguousarray(self.calibration_scores)
        meta = {"format": FORMAT, "version": VERSION, "router": json.dumps(self.to_json())}
        save_file(tensors, os.fspath(path), metadata=meta)

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({cfg}, threshold={self.threshold!r})"


def load_router(path: str | os.PathLike[str]) -> Router:
    """Read a router saved with `Router.save`.

    Raises:
        ConfigurationError: not a Tether router file, an unknown version or router kind.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="np") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise ConfigurationError(f"cannot read router file {os.fspath(path)!r}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ConfigurationError(f"{os.fspath(path)!r} is not a Tether router file")
    if meta.get("version") != VERSION:
        raise ConfigurationError(f"router file version {meta.get('version')!r} is not supported (want {VERSION})")
    doc = json.loads(meta["router"])
    _import_router_modules()
    cls = Router._registry.get(doc["kind"])
    if cls is None:
        raise ConfigurationError(f"unknown router kind {doc['kind']!r}; known: {', '.join(sorted(Router._registry))}")
    cal = tensors.pop(_CAL_KEY, None)
    router = cls.from_parts(doc["config"], tensors)
    router.calibration_scores = cal
    router.threshold = doc.get("threshold")
    router.calibration = dict(doc.get("calibration") or {})
    return router


def _import_router_modules() -> None:
    import tether.routing._query  # noqa: F401  (registers the query routers)
    import tether.routing._token  # noqa: F401
