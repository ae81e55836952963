"""tether.contract: the session contract between the edge and the cloud, defined once.

`CloudSessionAPI` is one edge conversation's state on the cloud; its request/result values
(`SamplingParams`, `VerifyResult`, ...) and its errors (`CloudError` and subclasses) live here
and nowhere else. Both sides depend on this room and on nothing of each other: the cloud
implements the contract (`tether.cloud.CloudSession`), the edge drives it (in process, or
through `tether.edge.RemoteCloudSession` over the encrypted protocol), and the wire
(`tether.protocol`) embeds these values or converts them in its operation table.
Nothing here does I/O or imports torch.
"""

from tether.contract._errors import (
    EVICTION_REASONS,
    BackendError,
    CloudError,
    EvictionReason,
    InvalidReply,
    InvalidRequest,
    InvalidSampling,
    ServerOverloaded,
    SessionEvicted,
    SessionLimitExceeded,
    SessionNotOpen,
    UnsupportedOperation,
    error_from_code,
)
from tether.contract._session import CloudSessionAPI
from tether.contract._types import (
    CHAT_ROLES,
    MAX_TEMPERATURE,
    Capabilities,
    ChatMessage,
    ChatResult,
    FinishReason,
    GenerateChunk,
    HiddenResult,
    SamplingParams,
    ScoreResult,
    SessionInfo,
    SparseProbs,
    VerifyResult,
    as_messages,
    validate_sampling,
)

__all__ = [
    "CHAT_ROLES",
    "EVICTION_REASONS",
    "MAX_TEMPERATURE",
    "BackendError",
    "Capabilities",
    "ChatMessage",
    "ChatResult",
    "CloudError",
    "CloudSessionAPI",
    "EvictionReason",
    "FinishReason",
    "GenerateChunk",
    "HiddenResult",
    "InvalidReply",
    "InvalidRequest",
    "InvalidSampling",
    "SamplingParams",
    "ScoreResult",
    "ServerOverloaded",
    "SessionEvicted",
    "SessionInfo",
    "SessionLimitExceeded",
    "SessionNotOpen",
    "SparseProbs",
    "UnsupportedOperation",
    "VerifyResult",
    "as_messages",
    "error_from_code",
    "validate_sampling",
]
