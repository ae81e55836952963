"""tether.cloud: the service that holds the large model and each edge session's state.

It implements the session contract (`tether.contract.CloudSessionAPI`, re-exported here with
its values and errors: the same objects): the in-process backend (`CloudSession` over a
`tether.runtime.CausalLM`) and the OpenAI-compatible HTTP backend; `CloudServer` puts it on
the encrypted protocol. The device side of that protocol is `tether.edge.RemoteCloud`.
"""

from tether.contract import (
    BackendError,
    Capabilities,
    ChatMessage,
    ChatResult,
    CloudError,
    CloudSessionAPI,
    FinishReason,
    GenerateChunk,
    HiddenResult,
    InvalidRequest,
    SamplingParams,
    ScoreResult,
    ServerOverloaded,
    SessionEvicted,
    SessionInfo,
    SessionLimitExceeded,
    SessionNotOpen,
    SparseProbs,
    UnsupportedOperation,
    VerifyResult,
    as_messages,
    error_from_code,
)
from tether.cloud._batcher import Batcher, ForwardOutput
from tether.cloud._config import CloudConfig
from tether.cloud._http import HttpCloudSession
from tether.cloud._manager import SessionManager, kv_bytes_per_token
from tether.cloud._metrics import Metrics
from tether.cloud._openai import OpenAIApp
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
