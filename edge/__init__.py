"""tether.edge: the SDK an app imports on the device.

`EdgeClient` (asyncio) and `Client` (blocking) generate text in three modes: ``edge`` (the
device model alone), ``cloud`` (the cloud model generates) and ``speculative`` (the edge
drafts, the cloud verifies a block per forward pass: the cloud model's output at a
fraction of its cost). Every token is tagged with its `Origin`; every generation carries
`GenerationStats`.

``mode="split"`` runs the first k layers of the cloud's model on the device and sends only
hidden states (compressed; `SplitOptions`), with optional early exit on the device
(docs/split.md: what leaves the device, and why hidden states are not a privacy guarantee).

Each mode is one entry of `MODE_REGISTRY` (its strategy builder, stats and options types, CLI
knobs, origin colours, default threshold); `generate` / `stream` take a `GenerateOptions` or its
fields as keywords.

`EdgeClient.ask(task, documents=[...], mode="minion" | "minions")` answers questions about
private documents that never leave the device: the cloud model plans, the edge model reads
(Minion / MinionS; see docs/minions.md for exactly what is sent).
"""

from tether.edge.minions import Chunk, ChunkingOptions, chunk_documents
from tether.edge.minions import CostReport, PriceTable, Pricing, RoundCost
from tether.edge.minions import ChunkSelector, Job, MinionsError, PlanError, PlanLimits
from tether.edge.minions import ChatModel, OpenAIChat, RemoteChatError, SessionChat
from tether.edge.minions import (
    AskResult,
    CloudExchange,
    MinionsFailed,
    MinionsOptions,
    Round,
    WorkerResult,
)
from tether.edge._client import Client, EdgeClient, SyncGeneration
from tether.edge._connectors import InProcessCloud, LazyCloud
from tether.edge.speculative import (
    AdaptiveDraftLength,
    DraftLengthPolicy,
    FixedDraftLength,
    HeuristicDraftLength,
    RoundObservation,
)
from tether.edge._edge_model import EdgeModel
from tether.edge._errors import CloudUnavailableError, ContextLengthExceeded, EdgeError
from tether.edge._link import EmulatedLink, LinkSevered
from tether.edge._loop import Generation
from tether.edge._remote import CloudConnector, ResilienceOptions
from tether.edge._remote_session import RemoteCloud, RemoteCloudSession
from tether.edge.speculative import SpeculativeOptions
from tether.edge.split import CalibrationPoint, ExitHead
from tether.edge.split import COMPRESSIONS
from tether.edge.split import PartitionProfile, PartitionReport, choose_partition
from tether.edge.split import SplitOptions, SplitStats
from tether.edge.split import SplitModel
from tether.edge._stats import GenerationStats
from tether.edge._modes import (
    MODE_REGISTRY,
    MODES,
    ORIGIN_LABELS,
    ORIGIN_STYLES,
    BuildContext,
    GenerateArgs,
    GenerateOptions,
    ModeSpec,
    get_mode,
)
from tether.edge._types import GenerationResult, Mode, Origin, StreamToken

__all__ = [
    "COMPRESSIONS",
    "MODES",
    "MODE_REGISTRY",
    "ORIGIN_LABELS",
    "ORIGIN_STYLES",
    "AdaptiveDraftLength",
    "AskResult",
    "BuildContext",
    "CalibrationPoint",
    "ChatModel",
    "Chunk",
    "ChunkSelector",
    "ChunkingOptions",
    "Client",
    "CloudConnector",
    "CloudExchange",
    "CloudUnavailableError",
    "ContextLengthExceeded",
    "CostReport",
    "DraftLengthPolicy",
    "EdgeClient",
    "EdgeError",
    "EdgeModel",
    "EmulatedLink",
    "ExitHead",
    "FixedDraftLength",
    "Generation",
    "GenerateArgs",
    "GenerateOptions",
    "GenerationResult",
    "GenerationStats",
    "HeuristicDraftLength",
    "InProcessCloud",
    "Job",
    "LazyCloud",
    "Mode",
    "ModeSpec",
    "LinkSevered",
    "MinionsError",
    "MinionsFailed",
    "MinionsOptions",
    "OpenAIChat",
    "Origin",
    "PartitionProfile",
    "PartitionReport",
    "PlanError",
    "PlanLimits",
    "PriceTable",
    "Pricing",
    "RemoteChatError",
    "RemoteCloud",
    "RemoteCloudSession",
    "ResilienceOptions",
    "Round",
    "RoundCost",
    "RoundObservation",
    "SessionChat",
    "SpeculativeOptions",
    "SplitModel",
    "SplitOptions",
    "SplitStats",
    "StreamToken",
    "SyncGeneration",
    "WorkerResult",
    "chunk_documents",
    "get_mode",
    "choose_partition",
]
