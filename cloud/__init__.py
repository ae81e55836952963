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
from tether.cloud._batcher import Batcher, ForwardOutput
from tether.cloud._config import CloudConfig
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
from tether.cloud._http import HttpCloudSession
from tether.cloud._manager import SessionManager, kv_bytes_per_token
from tether.cloud._metrics import Metrics
from tether.cloud._openai import OpenAIApp
from tether.cloud._remote import RemoteCloud, RemoteCloudSession
from tether.cloud._server import CloudServer
from tether.cloud._session import CloudSession, SessionStatus

__all__ = [
    "BackendError",
    "Batcher",
    "Capabilities",
    "ChatMessage",
    "ChatResult",
    "CloudConfig",
    "CloudError",
    "CloudServer",
    "CloudSession",
    "CloudSessionAPI",
    "FinishReason",
    "ForwardOutput",
    "GenerateChunk",
    "HiddenResult",
    "HttpCloudSession",
    "InvalidRequest",
    "Metrics",
    "OpenAIApp",
    "RemoteCloud",
    "RemoteCloudSession",
    "SamplingParams",
    "ScoreResult",
    "ServerOverloaded",
    "SessionEvicted",
    "SessionInfo",
    "SessionLimitExceeded",
    "SessionManager",
    "SessionNotOpen",
    "SessionStatus",
    "SparseProbs",
    "UnsupportedOperation",
    "VerifyResult",
    "as_messages",
    "error_from_code",
    "kv_bytes_per_token",
]
