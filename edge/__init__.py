"""tether.edge: the SDK an app imports on the device.

`EdgeClient` (asyncio) and `Client` (blocking) generate text in three modes: ``edge`` (the
device model alone), ``cloud`` (the cloud model generates) and ``speculative`` (the edge
drafts, the cloud verifies a block per forward pass: the cloud model's output at a
fraction of its cost). Every token is tagged with its `Origin`; every generation carries
`GenerationStats`.

`EdgeClient.ask(task, documents=[...], mode="minion" | "minions")` answers questions about
private documents that never leave the device: the cloud model plans, the edge model reads
(Minion / MinionS; see docs/minions.md for exactly what is sent).
"""

from tether.edge._chunking import Chunk, ChunkingOptions, chunk_documents
from tether.edge._cost import CostReport, PriceTable, Pricing, RoundCost
from tether.edge._minions_plan import ChunkSelector, Job, MinionsError, PlanError, PlanLimits
from tether.edge._minions_remote import ChatModel, OpenAIChat, RemoteChatError, SessionChat
from tether.edge._minions_types import (
    AskResult,
    CloudExchange,
    MinionsFailed,
    MinionsOptions,
    Round,
    WorkerResult,
)
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
    "AskResult",
    "ChatModel",
    "Chunk",
    "ChunkSelector",
    "ChunkingOptions",
    "Client",
    "CloudConnector",
    "CloudExchange",
    "CloudUnavailableError",
    "CostReport",
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
    "Job",
    "LazyCloud",
    "LinkSevered",
    "MinionsError",
    "MinionsFailed",
    "MinionsOptions",
    "OpenAIChat",
    "Origin",
    "PlanError",
    "PlanLimits",
    "PriceTable",
    "Pricing",
    "RemoteChatError",
    "ResilienceOptions",
    "Round",
    "RoundCost",
    "RoundObservation",
    "SessionChat",
    "SpeculativeOptions",
    "StreamToken",
    "SyncGeneration",
    "WorkerResult",
    "chunk_documents",
]
