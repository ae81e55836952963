"""tether.cloud: the service that holds the large model and each edge session's state.

`CloudSessionAPI` is the transport-independent contract of one session; the in-process
backend (`CloudSession` over a `tether.runtime.CausalLM`), the OpenAI-compatible HTTP
backend and the remote client over the encrypted protocol all implement it.
"""

from tether.cloud._api import (
    Capabilities,
    ChatMessage,
    ChatResult,
    CloudSessionAPI,
    FinishReason,
    GenerateChunk,
    HiddenResult,
    SamplingParams,
    ScoreResult,
    SessionInfo,
    SparseProbs,
    VerifyResult,
    as_messages,
)
from tether.cloud._errors import (
    BackendError,
    CloudError,
    InvalidRequest,
    ServerOverloaded,
    SessionEvicted,
    SessionLimitExceeded,
    SessionNotOpen,
    UnsupportedOperation,
    error_from_code,
)

__all__ = [
    "BackendError",
    "Capabilities",
    "ChatMessage",
    "ChatResult",
    "CloudError",
    "CloudSessionAPI",
    "FinishReason",
    "GenerateChunk",
    "HiddenResult",
    "InvalidRequest",
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
]
