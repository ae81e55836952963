"""tether.edge: the SDK an app imports on the device.

`EdgeClient` (asyncio) and `Client` (blocking) generate text in three modes: ``edge`` (the
device model alone), ``cloud`` (the cloud model generates) and ``speculative`` (the edge
drafts, the cloud verifies a block per forward pass: the cloud model's output at a
fraction of its cost). Every token is tagged with its `Origin`; every generation carries
`GenerationStats`.
"""

from tether.edge._client import Client, EdgeClient, SyncGeneration
from tether.edge._connectors import InProcessCloud, LazyCloud
from tether.edge._draft_length import (
    AdaptiveDraftLength,
    DraftLengthPolicy,
    FixedDraftLength,
    HeuristicDraftLength,
    RoundObservation,
)
from tether.edge._edge_model import EdgeModel
from tether.edge._errors import CloudUnavailableError, EdgeError
from tether.edge._link import EmulatedLink, LinkSevered
from tether.edge._loop import Generation
from tether.edge._remote import CloudConnector, ResilienceOptions
from tether.edge._speculative import SpeculativeOptions
from tether.edge._stats import GenerationStats
from tether.edge._types import MODES, GenerationResult, Origin, StreamToken

__all__ = [
    "MODES",
    "AdaptiveDraftLength",
    "Client",
    "CloudConnector",
    "CloudUnavailableError",
    "DraftLengthPolicy",
    "EdgeClient",
    "EdgeError",
    "EdgeModel",
    "EmulatedLink",
    "FixedDraftLength",
    "Generation",
    "GenerationResult",
    "GenerationStats",
    "HeuristicDraftLength",
    "InProcessCloud",
    "LazyCloud",
    "LinkSevered",
    "Origin",
    "ResilienceOptions",
    "RoundObservation",
    "SpeculativeOptions",
    "StreamToken",
    "SyncGeneration",
]
