"""The message catalogue: every message type, its wire type id, fields and replies.

What belongs here: message definitions as data, and nothing about how they are framed or
sent. The cloud service implements the semantics; this file fixes the shapes. Message
values are frozen; tensors are numpy arrays (token ids, probabilities) or `Tensor`
(hidden states, any wire dtype). Conventions: p = target (cloud) distribution,
q = draft (edge) distribution; positions and lengths count tokens in the session's
context.

Values of the session contract that travel inside messages are the contract's own classes
(`tether.contract.SamplingParams`, `ChatMessage`), embedded with `embed`, so the wire and
the API validate them with one rule. Which request maps to which session method and reply,
and how their values convert, is the operation table (`_operations.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

import numpy as np

from tether.contract import EVICTION_REASONS, ChatMessage, SamplingParams
from tether.protocol._errors import InvalidMessage
from tether.protocol._schema import Record, TensorFieldInvalid, embed, late_field, record, tensor_field
from tether.protocol._tensors import DType, Tensor

__all__ = [
    "CATALOGUE",
    "COMPRESSIONS",
    "COMPRESSION_DTYPES",
    "FINISH_REASONS",
    "AppendTokens",
    "Appended",
    "Cancel",
    "Chat",
    "ChatChunk",
    "ChatMessage",
    "CloseSession",
    "ContinueHidden",
    "ErrorCode",
    "ErrorReply",
    "Generate",
    "Generated",
    "Goodbye",
    "Hello",
    "HiddenContinued",
    "Kind",
    "Message",
    "OpenSession",
    "Ping",
    "Pong",
    "Rekey",
    "RolledBack",
    "Rollback",
    "SamplingParams",
    "ScoreTokens",
    "Scores",
    "SessionClosed",
    "SessionOpened",
    "Verified",
    "VerifyDraft",
    "Welcome",
]

_INT = (DType.INT32, DType.INT64)
_F32 = (DType.FLOAT32,)
_HIDDEN = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.INT8_ROWWISE, DType.INT8_ROWWISE_DEFLATE,
           DType.INT4_GROUPED)
FINISH_REASONS = ("stop", "length", "cancelled")
COMPRESSION_DTYPES: dict[str, DType] = {
    "fp32": DType.FLOAT32, "fp16": DType.FLOAT16, "bf16": DType.BFLOAT16, "int8": DType.INT8_ROWWISE,
    "int8-deflate": DType.INT8_ROWWISE_DEFLATE, "int4": DType.INT4_GROUPED,
}
"""Each compression name of hidden states and the wire dtype that carries it."""
COMPRESSIONS: tuple[str, ...] = tuple(COMPRESSION_DTYPES)
"""The one vocabulary of hidden-state compressions (the edge's `SplitOptions.compression`,
`ContinueHidden.compression`), lossless first."""
MAX_SESSION_ID = 128
MAX_TOP_K = 1024
MAX_ERROR_MESSAGE = 1024
MAX_FORWARD_PASSES = 1 << 20  # cost fields: far above any one request, small enough to sum safely
MAX_COST_S = 86_400.0


class Kind(IntEnum):
    """Who may send a message type: CONTROL either side, REQUEST client, REPLY server."""

    CONTROL = 0
    REQUEST = 1
    REPLY = 2


class ErrorCode(IntEnum):
    """Why a request failed (ErrorReply.code). Messages that go with them are safe to show."""

    BAD_REQUEST = 1  # well-formed but semantically invalid (e.g. rollback past the start)
    UNSUPPORTED = 2  # the operation or option is not available (backend capability)
    NOT_FOUND = 3  # unknown session or model
    SESSION_EVICTED = 4  # the session's state was evicted; re-open and re-prefill
    LIMIT_EXCEEDED = 5  # a per-session limit (context length, tokens) would be exceeded
    OVERLOADED = 6  # too many requests in flight or queued; retry later
    CANCELLED = 7  # the client cancelled the request (or the server did, on shutdown)
    TIMEOUT = 8  # the server gave up on the request
    SHUTTING_DOWN = 9  # the server is draining; reconnect elsewhere or later
    UNAUTHORIZED = 10  # this client may not perform this operation
    INTERNAL = 100  # a bug or failure on the server; details are in its logs only


def _session_id(value: str, where: str) -> None:
    if not 1 <= len(value) <= MAX_SESSION_ID:
        raise InvalidMessage(f"{where}.session_id must be 1..{MAX_SESSION_ID} characters")


def _non_negative(value: int | None, where: str) -> None:
    if value is not None and value < 0:
        raise InvalidMessage(f"{where} must be >= 0, got {value}")


def _finish(value: str | None, where: str) -> None:
    if value is not None and value not in FINISH_REASONS:
        raise InvalidMessage(f"{where}.finish_reason must be one of {FINISH_REASONS}, got {value!r}")


def _cost(forward_passes: int | None, compute_s: float | None, queue_s: float | None, where: str) -> None:
    """The optional cost fields of a reply (bounded: they feed the client's statistics)."""
    if forward_passes is not None and not 0 <= forward_passes <= MAX_FORWARD_PASSES:
        raise InvalidMessage(f"{where}.forward_passes must be in [0, {MAX_FORWARD_PASSES}], got {forward_passes}")
    for name, value in (("compute_s", compute_s), ("queue_s", queue_s)):
        if value is not None and not 0.0 <= value <= MAX_COST_S:
            raise InvalidMessage(f"{where}.{name} must be in [0, {MAX_COST_S:g}] seconds, got {value}")


def _top(indices: np.ndarray | None, logprobs: np.ndarray | None, where: str, rows: int | None) -> None:
    if (indices is None) != (logprobs is None):
        raise TensorFieldInvalid(f"{where}: top_indices and top_logprobs go together")
    if indices is not None and logprobs is not None:
        if indices.shape != logprobs.shape:
            raise TensorFieldInvalid(
                f"{where}: top_indices shape {indices.shape} != top_logprobs shape {logprobs.shape}"
            )
        if rows is not None and indices.shape[0] != rows:
            raise TensorFieldInvalid(f"{where}: expected {rows} rows of top-k, got {indices.shape[0]}")


# --------------------------------------------------------------------------- nested values

# The contract's values travel as nested objects; the seed of SamplingParams travels beside
# it (OpenSession.seed, Chat.seed), as it always has, so `sampling` carries the three
# warping settings only.
embed(SamplingParams, fields=("temperature", "top_p", "top_k"))
embed(ChatMessage, fields=("role", "content"))


def _no_seed(sampling: SamplingParams | None, where: str) -> None:
    """The nested sampling object has no seed on the wire: refuse one rather than drop it."""
    if sampling is not None and sampling.seed is not None:
        raise InvalidMessage(f"{where}.sampling.seed does not travel; pass the seed as {where}.seed")


# --------------------------------------------------------------------------- messages


class Message(Record):
    """Base of every message. TYPE is the u16 wire id; KIND says who may send it.

    REQUEST types also name their REPLY type and whether the reply may be STREAMING
    (several replies to one request id, the last flagged END).
    """

    __slots__ = ()
    TYPE: ClassVar[int] = 0
    KIND: ClassVar[Kind] = Kind.CONTROL
    REPLY: ClassVar[type[Message] | None] = None
    STREAMING: ClassVar[bool] = False
    OPERATION: ClassVar[str] = ""


CATALOGUE: dict[int, type[Message]] = {}
_M = TypeVar("_M", bound=type[Message])


def message(type_id: int, kind: Kind, *, operation: str = "") -> Callable[[_M], _M]:
    """Register a message class under its wire type id."""

    def wrap(cls: _M) -> _M:
        if type_id in CATALOGUE:
            raise RuntimeError(f"message type 0x{type_id:04x} registered twice")
        cls.TYPE = type_id
        cls.KIND = kind
        cls.OPERATION = operation
        record(cls)
        CATALOGUE[type_id] = cls
        return cls

    return wrap


# ---- control (either direction unless noted; request_id in the frame header says what for)


@message(0x0001, Kind.CONTROL)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Hello(Message):
    """Client -> server, inside the handshake (XX third message / IK first message payload).

    The token is only ever sent encrypted; it never appears in repr.
    """

    client: str = ""
    capabilities: tuple[str, ...] = ()
    max_frame_bytes: int = 0  # the largest frame the client accepts (0: not announced)
    token: str | None = dataclasses.field(default=None, repr=False)

    def _check(self) -> None:
        _non_negative(self.max_frame_bytes, "Hello.max_frame_bytes")


@message(0x0002, Kind.CONTROL)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Welcome(Message):
    """Server -> client, the first transport frame: the server accepted the client."""

    server: str = ""
    capabilities: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    max_frame_bytes: int = 0
    max_metadata_bytes: int = 0
    max_tensor_elements: int = 0
    max_in_flight: int = 0
    keepalive_interval: float = 0.0


@message(0x0003, Kind.CONTROL)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Ping(Message):
    """Keepalive probe; request_id carries the ping id, echoed by the Pong."""


@message(0x0004, Kind.CONTROL)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Pong(Message):
    """Answer to a Ping with the same request_id."""


@message(0x0005, Kind.CONTROL)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Rekey(Message):
    """The sender rekeys its sending cipher right after this frame (consumed by the transport)."""


@message(0x0006, Kind.CONTROL)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Cancel(Message):
    """Client -> server: abandon request `request_id`; the server ends it with ErrorReply(CANCELLED)."""


@message(0x0007, Kind.CONTROL)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Goodbye(Message):
    """Authenticated close notice: the sender closes the websocket with `code` right after."""

    code: int = 1000
    reason: str = ""


# ---- requests (client -> server) and their replies (server -> client)


@message(0x0201, Kind.REPLY)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class SessionOpened(Message):
    """The session exists. `length` is its context length (the prompt, if one was sent)."""

    session_id: str
    model: str
    vocab_size: int
    max_context: int
    length: int = 0
    capabilities: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()

    def _check(self) -> None:
        _session_id(self.session_id, "SessionOpened")
        _non_negative(self.length, "SessionOpened.length")


@message(0x0101, Kind.REQUEST, operation="open")
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class OpenSession(Message):
    """Open a session on `model` with sampling params and seed; optionally prefill `prompt`."""

    REPLY = SessionOpened
    model: str
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    seed: int | None = None
    max_tokens: int | None = None
    prompt: np.ndarray | None = tensor_field(*_INT, ndim=1, optional=True)

    def _check(self) -> None:
        if not self.model:
            raise InvalidMessage("OpenSession.model must not be empty")
        _non_negative(self.max_tokens, "OpenSession.max_tokens")
        _no_seed(self.sampling, "OpenSession")


@message(0x0202, Kind.REPLY)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Appended(Message):
    session_id: str
    length: int

    def _check(self) -> None:
        _session_id(self.session_id, "Appended")
        _non_negative(self.length, "Appended.length")


@message(0x0102, Kind.REQUEST, operation="append")
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class AppendTokens(Message):
    """Append (prefill) `tokens` to the session's context."""

    REPLY = Appended
    session_id: str
    tokens: np.ndarray = tensor_field(*_INT, ndim=1)

    def _check(self) -> None:
        _session_id(self.session_id, "AppendTokens")


@message(0x0203, Kind.REPLY)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Verified(Message):
    """`accepted` draft tokens were kept; `next_token` is the correction (a draft token was
    rejected) or the bonus token (all were accepted). The context now holds the accepted
    tokens and next_token: `length`.

    Cost fields (optional, sent only to clients that announce the "cost" capability):
    `forward_passes` the cloud model ran for this request, their `compute_s` and the
    `queue_s` the request waited for a batch slot."""

    session_id: str
    accepted: int
    next_token: int
    length: int
    finish_reason: str | None = None
    forward_passes: int | None = late_field()
    compute_s: float | None = late_field()
    queue_s: float | None = late_field()

    def _check(self) -> None:
        _session_id(self.session_id, "Verified")
        _cost(self.forward_passes, self.compute_s, self.queue_s, "Verified")
        _non_negative(self.accepted, "Verified.accepted")
        _non_negative(self.length, "Verified.length")
        _finish(self.finish_reason, "Verified")


@message(0x0103, Kind.REQUEST, operation="verify")
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class VerifyDraft(Message):
    """Verify a draft block of k tokens against the session's target model.

    Greedy sessions need only `tokens`. Sampling sessions send the draft distribution q
    sparsely: for each position i, `draft_indices[i]` (m token ids) and `draft_probs[i]`
    (their probabilities; q is zero elsewhere). q must be exactly the distribution token i
    was sampled from (e.g. top-m renormalised), so tokens[i] is among draft_indices[i].
    """

    REPLY = Verified
    session_id: str
    tokens: np.ndarray = tensor_field(*_INT, ndim=1)
    draft_indices: np.ndarray | None = tensor_field(*_INT, ndim=2, optional=True)
    draft_probs: np.ndarray | None = tensor_field(*_F32, ndim=2, optional=True)

    def _check(self) -> None:
        _session_id(self.session_id, "VerifyDraft")
        k = self.tokens.shape[0]
        if k == 0:
            raise TensorFieldInvalid("VerifyDraft.tokens must not be empty")
        if (self.draft_indices is None) != (self.draft_probs is None):
            raise TensorFieldInvalid("VerifyDraft: draft_indices and draft_probs go together")
        if self.draft_indices is not None and self.draft_probs is not None:
            if self.draft_indices.shape != self.draft_probs.shape or self.draft_indices.shape[0] != k:
                raise TensorFieldInvalid(
                    f"VerifyDraft: draft_indices {self.draft_indices.shape} and draft_probs "
                    f"{self.draft_probs.shape} must both be ({k}, m)"
                )
            if not np.all(np.isfinite(self.draft_probs)) or np.any(self.draft_probs < 0):
                raise TensorFieldInvalid("VerifyDraft.draft_probs must be finite and >= 0")
            if not (self.draft_indices == self.tokens[:, None]).any(axis=1).all():
                raise TensorFieldInvalid("VerifyDraft: each draft token must appear in its draft_indices row")


@message(0x0204, Kind.REPLY)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Scores(Message):
    """`token_logprobs[i]` = log p(tokens[i] | context, tokens[:i]); optional top-k per row
    (n rows, or n + 1 with include_next: the last row predicts the token after them).

    Cost fields (optional, sent only to clients that announce the "cost" capability):
    `forward_passes` the cloud model ran for this request, their `compute_s` and the
    `queue_s` the request waited for a batch slot."""

    session_id: str
    length: int
    forward_passes: int | None = late_field()
    compute_s: float | None = late_field()
    queue_s: float | None = late_field()
    token_logprobs: np.ndarray = tensor_field(*_F32, ndim=1)
    top_indices: np.ndarray | None = tensor_field(*_INT, ndim=2, optional=True)
    top_logprobs: np.ndarray | None = tensor_field(*_F32, ndim=2, optional=True)

    def _check(self) -> None:
        _session_id(self.session_id, "Scores")
        _cost(self.forward_passes, self.compute_s, self.queue_s, "Scores")
        _top(self.top_indices, self.top_logprobs, "Scores", None)


@message(0x0104, Kind.REQUEST, operation="score")
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class ScoreTokens(Message):
    """Score `tokens` after the session's context; `append` keeps them in the context."""

    REPLY = Scores
    session_id: str
    top_k: int = 0
    append: bool = True
    include_next: bool = False
    tokens: np.ndarray = tensor_field(*_INT, ndim=1)

    def _check(self) -> None:
        _session_id(self.session_id, "ScoreTokens")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidMessage(f"ScoreTokens.top_k must be in [0, {MAX_TOP_K}], got {self.top_k}")


@message(0x0205, Kind.REPLY)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Generated(Message):
    """Some generated tokens; the END-flagged chunk carries finish_reason.

    Cost fields (optional, sent only to clients that announce the "cost" capability):
    `forward_passes` the cloud model ran for this request, their `compute_s` and the
    `queue_s` the request waited for a batch slot."""

    session_id: str
    length: int
    finish_reason: str | None = None
    forward_passes: int | None = late_field()
    compute_s: float | None = late_field()
    queue_s: float | None = late_field()
    tokens: np.ndarray = tensor_field(*_INT, ndim=1)

    def _check(self) -> None:
        _session_id(self.session_id, "Generated")
        _cost(self.forward_passes, self.compute_s, self.queue_s, "Generated")
        _finish(self.finish_reason, "Generated")


@message(0x0105, Kind.REQUEST, operation="generate")
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Generate(Message):
    """Generate up to `max_new_tokens` (streamed as Generated replies)."""

    REPLY = Generated
    STREAMING = True
    session_id: str
    max_new_tokens: int
    stop_tokens: tuple[int, ...] = ()
    sampling: SamplingParams | None = None

    def _check(self) -> None:
        _session_id(self.session_id, "Generate")
        if self.max_new_tokens < 1:
            raise InvalidMessage(f"Generate.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _no_seed(self.sampling, "Generate")


@message(0x0206, Kind.REPLY)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class HiddenContinued(Message):
    """The token sampled after running layers [layer, L); optional top-k of its distribution.

    Cost fields (optional, sent only to clients that announce the "cost" capability):
    `forward_passes` the cloud model ran for this request, their `compute_s` and the
    `queue_s` the request waited for a batch slot."""

    session_id: str
    next_token: int
    length: int
    finish_reason: str | None = None
    forward_passes: int | None = late_field()
    compute_s: float | None = late_field()
    queue_s: float | None = late_field()
    top_indices: np.ndarray | None = tensor_field(*_INT, ndim=1, optional=True)
    top_logprobs: np.ndarray | None = tensor_field(*_F32, ndim=1, optional=True)

    def _check(self) -> None:
        _session_id(self.session_id, "HiddenContinued")
        _cost(self.forward_passes, self.compute_s, self.queue_s, "HiddenContinued")
        _finish(self.finish_reason, "HiddenContinued")
        _top(self.top_indices, self.top_logprobs, "HiddenContinued", None)


@message(0x0106, Kind.REQUEST, operation="hidden")
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class ContinueHidden(Message):
    """Split computing: hidden states after the edge ran layers [0, layer) for n new tokens.

    hidden: (n, hidden_size); its dtype must match `compression` (one of `COMPRESSIONS`:
    "fp32", "fp16", "bf16", "int8" = INT8_ROWWISE, "int8-deflate" = INT8_ROWWISE_DEFLATE,
    "int4" = INT4_GROUPED; see `COMPRESSION_DTYPES`). `tokens` (n,) names the tokens
    they belong to (split-mode clients leave it out: the point is not to send token ids).
    """

    REPLY = HiddenContinued
    session_id: str
    layer: int
    compression: str = "fp32"
    top_k: int = 0
    hidden: Tensor = tensor_field(*_HIDDEN, ndim=2)
    tokens: np.ndarray | None = tensor_field(*_INT, ndim=1, optional=True)

    def _check(self) -> None:
        _session_id(self.session_id, "ContinueHidden")
        _non_negative(self.layer, "ContinueHidden.layer")
        if self.compression not in COMPRESSION_DTYPES:
            raise InvalidMessage(f"ContinueHidden.compression must be one of {COMPRESSIONS}")
        if COMPRESSION_DTYPES[self.compression] is not self.hidden.dtype:
            raise TensorFieldInvalid(
                f"ContinueHidden: compression {self.compression!r} needs {COMPRESSION_DTYPES[self.compression].name}, "
                f"hidden is {self.hidden.dtype.name}"
            )
        if self.tokens is not None and self.tokens.shape[0] != self.hidden.shape[0]:
            raise TensorFieldInvalid("ContinueHidden: tokens and hidden disagree on n")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidMessage(f"ContinueHidden.top_k must be in [0, {MAX_TOP_K}], got {self.top_k}")


@message(0x0207, Kind.REPLY)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class ChatChunk(Message):
    """Chat completion text (all of it, or a streamed delta); the END chunk has finish_reason."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    session_id: str | None = None

    def _check(self) -> None:
        _finish(self.finish_reason, "ChatChunk")


@message(0x0107, Kind.REQUEST, operation="chat")
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Chat(Message):
    """Chat completion over messages (Minions); `stream` asks for several ChatChunk replies."""

    REPLY = ChatChunk
    STREAMING = True
    messages: tuple[ChatMessage, ...]
    model: str | None = None
    session_id: str | None = None
    max_tokens: int = 256
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    seed: int | None = None
    stream: bool = False
    # Constrain the answer to JSON (servers announcing "json_mode"); unset: free text.
    json_mode: bool | None = late_field()

    def _check(self) -> None:
        if not self.messages:
            raise InvalidMessage("Chat.messages must not be empty")
        if self.max_tokens < 1:
            raise InvalidMessage(f"Chat.max_tokens must be >= 1, got {self.max_tokens}")
        _no_seed(self.sampling, "Chat")


@message(0x0208, Kind.REPLY)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class RolledBack(Message):
    session_id: str
    length: int

    def _check(self) -> None:
        _session_id(self.session_id, "RolledBack")


@message(0x0108, Kind.REQUEST, operation="rollback")
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Rollback(Message):
    """Truncate the session's context to `length` tokens."""

    REPLY = RolledBack
    session_id: str
    length: int

    def _check(self) -> None:
        _session_id(self.session_id, "Rollback")
        _non_negative(self.length, "Rollback.length")


@message(0x0209, Kind.REPLY)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class SessionClosed(Message):
    session_id: str

    def _check(self) -> None:
        _session_id(self.session_id, "SessionClosed")


@message(0x0109, Kind.REQUEST, operation="close")
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class CloseSession(Message):
    """Close the session and free its state."""

    REPLY = SessionClosed
    session_id: str

    def _check(self) -> None:
        _session_id(self.session_id, "CloseSession")


@message(0x02FF, Kind.REPLY)
@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class ErrorReply(Message):
    """The request failed. Always the last reply to its request id (END is set).

    `message` must be safe to show the client: never internal exception text.
    """

    code: ErrorCode
    message: str = ""
    retryable: bool = False
    # SESSION_EVICTED: why (one of the contract's EVICTION_REASONS); unset for other codes.
    reason: str | None = late_field()

    def _check(self) -> None:
        if len(self.message) > MAX_ERROR_MESSAGE:
            raise InvalidMessage(f"ErrorReply.message is limited to {MAX_ERROR_MESSAGE} characters")
        if self.reason is not None and self.reason not in EVICTION_REASONS:
            raise InvalidMessage(f"ErrorReply.reason must be one of {EVICTION_REASONS}, got {self.reason!r}")


REQUEST_TYPES: tuple[type[Message], ...] = tuple(c for c in CATALOGUE.values() if c.KIND is Kind.REQUEST)


def describe_catalogue() -> list[dict[str, Any]]:
    """The catalogue as plain data (for docs and tests)."""
    out = []
    for type_id, cls in sorted(CATALOGUE.items()):
        out.append(
            {
                "type": f"0x{type_id:04x}",
                "name": cls.__name__,
                "kind": cls.KIND.name,
                "reply": cls.REPLY.__name__ if cls.REPLY else None,
                "streaming": cls.STREAMING,
                "metadata": [f.name for f in cls.FIELDS if f.tensor is None],
                "tensors": [f.name for f in cls.TENSOR_FIELDS],
            }
        )
    return out
