"""The operation table: each wire request, the session method it calls, and its reply.

What belongs here: one `Operation` row per request message of the session API, holding how
its values convert in both directions, and the one table between the contract's errors and
the wire's `ErrorCode`s. Both ends read it: the server (`tether.cloud.CloudServer`) decodes a
request into a method call and encodes the result as the reply; the device
(`tether.edge.RemoteCloudSession`) encodes a call as the request and decodes the reply into
the contract's result. What does not: session semantics, I/O, or the message shapes
(`_messages.py`).

Adding an operation touches three places: the contract (the method on `CloudSessionAPI` and
its result type), the catalogue (its request and reply messages), and one row here.

    request         session method       reply
    OpenSession     open (+ prompt)      SessionOpened
    AppendTokens    append               Appended
    VerifyDraft     verify               Verified
    ScoreTokens     score                Scores
    Generate        generate (streamed)  Generated ...
    ContinueHidden  continue_hidden      HiddenContinued
    Chat            chat                 ChatChunk
    Rollback        rollback             RolledBack
    CloseSession    close                SessionClosed
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tether.contract import (
    BackendError,
    Capabilities,
    ChatResult,
    CloudError,
    GenerateChunk,
    HiddenResult,
    InvalidReply,
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
from tether.protocol._messages import (
    COMPRESSION_DTYPES,
    Appended,
    AppendTokens,
    Chat,
    ChatChunk,
    CloseSession,
    ContinueHidden,
    ErrorCode,
    Generate,
    Generated,
    HiddenContinued,
    Message,
    OpenSession,
    RolledBack,
    Rollback,
    Scores,
    ScoreTokens,
    SessionClosed,
    SessionOpened,
    Verified,
    VerifyDraft,
)
from tether.protocol._tensors import Tensor

__all__ = [
    "CAPABILITY_NAMES",
    "OPERATIONS",
    "Operation",
    "RequestBounds",
    "capabilities_from_names",
    "capability_names",
    "cloud_error",
    "error_reply_fields",
    "operation_for",
]

CAPABILITY_NAMES: tuple[str, ...] = (
    "verify", "sampling_verify", "score", "generate", "hidden", "chat", "json_mode", "rollback",
)
"""The `Capabilities` flags a server announces by name (Welcome and SessionOpened)."""


def capability_names(caps: Capabilities) -> tuple[str, ...]:
    """The flags of `caps` that are set, as the names the protocol announces."""
    return tuple(n for n in CAPABILITY_NAMES if getattr(caps, n))


def capabilities_from_names(names: Sequence[str]) -> Capabilities:
    """The `Capabilities` a server announced by name (limits keep their defaults)."""
    have = set(names)
    return Capabilities(**{n: n in have for n in CAPABILITY_NAMES})


# --------------------------------------------------------------------------- errors

# One row per contract error: its wire code and whether retrying may succeed. Subclasses
# match their parent's row (InvalidSampling -> BAD_REQUEST, InvalidReply -> INTERNAL).
_ERRORS: tuple[tuple[type[CloudError], ErrorCode, bool], ...] = (
    (InvalidRequest, ErrorCode.BAD_REQUEST, False),
    (UnsupportedOperation, ErrorCode.UNSUPPORTED, False),
    (SessionNotOpen, ErrorCode.NOT_FOUND, False),
    (SessionEvicted, ErrorCode.SESSION_EVICTED, False),
    (SessionLimitExceeded, ErrorCode.LIMIT_EXCEEDED, False),
    (ServerOverloaded, ErrorCode.OVERLOADED, True),
    (BackendError, ErrorCode.INTERNAL, True),
)


def error_reply_fields(exc: CloudError) -> tuple[ErrorCode, bool, str | None]:
    """``(code, retryable, reason)`` of the `ErrorReply` that carries `exc` (server side)."""
    reason = exc.reason if isinstance(exc, SessionEvicted) else None
    for cls, code, retryable in _ERRORS:
        if isinstance(exc, cls):
            return code, retryable, reason
    return ErrorCode.INTERNAL, False, None


def cloud_error(code: int, message: str, reason: str | None = None) -> CloudError:
    """The contract error an `ErrorReply` stands for (device side; unknown codes: `BackendError`)."""
    if code == ErrorCode.SHUTTING_DOWN:
        return SessionEvicted(f"the server is shutting down: {message}", reason="shutdown")
    for cls, wire, _ in _ERRORS:
        if code == wire and cls is not BackendError:
            return error_from_code(cls.code, message, reason=reason)
    name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
    return BackendError(f"cloud request failed ({name}): {message}")


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestBounds:
    """What the server checks a request's sizes against before it builds anything from it.

    Attributes:
        max_draft: most draft tokens per verify.
        vocab_size: token ids must lie in [0, vocab_size).
    """

    max_draft: int
    vocab_size: int


@dataclass(frozen=True, slots=True)
class Operation:
    """One wire operation: request message <-> contract method <-> reply message.

    Attributes:
        method: the `CloudSessionAPI` method the request calls.
        request, reply: the message types (the reply's type is ``request.REPLY``).
        encode_request: device side, ``(session_id, *args, **kwargs) -> request``: the
            method's arguments as the request message.
        decode_request: server side, ``(request, bounds) -> (args, kwargs)`` for the method
            call, sizes checked against the server's `RequestBounds` first.
        encode_reply: server side, ``(session_id, result, request, with_cost) -> reply``:
            the method's result (one chunk for a streaming method) as the reply message;
            the cost fields only when the client asked for them.
        decode_reply: device side, ``(reply, request, info) -> result``: the reply as the
            contract's result, checked against the request and the session's `SessionInfo`
            (None before `open`).
        streaming: the method is an async iterator: each result it yields is one reply
            (``Generate``); a `Chat` may stream too, but the contract's `chat` does not.

    Raises (all converters): `InvalidRequest` for arguments the wire cannot carry,
    `InvalidReply` for a reply that breaks the contract.
    """

    method: str
    request: type[Message]
    encode_request: Callable[..., Message]
    decode_request: Callable[[Any, RequestBounds], tuple[tuple[Any, ...], dict[str, Any]]]
    encode_reply: Callable[[str, Any, Any, bool], Message]
    decode_reply: Callable[[Any, Any, SessionInfo | None], Any]
    streaming: bool = False

    @property
    def reply(self) -> type[Message]:
        assert self.request.REPLY is not None
        return self.request.REPLY


def _cost_fields(result: Any, with_cost: bool) -> dict[str, Any]:
    """The optional cost fields of a reply, for clients that announced the "cost" capability."""
    if not with_cost:
        return {}
    return {"forward_passes": int(result.forward_passes), "compute_s": float(result.compute_s),
            "queue_s": float(getattr(result, "queue_s", 0.0))}


def _cost(reply: Any, passes: int) -> dict[str, Any]:
    """The reply's cost fields for the contract's result (a server without them: `passes` passes, 0 s)."""
    return {"forward_passes": passes if reply.forward_passes is None else int(reply.forward_passes),
            "compute_s": reply.compute_s or 0.0, "queue_s": reply.queue_s or 0.0}


def _ids(values: Sequence[int]) -> np.ndarray:
    return np.asarray([int(t) for t in values], dtype=np.int64)


def _check_ids(ids: Sequence[int], info: SessionInfo | None, what: str) -> None:
    """Token ids from the server must lie in the vocabulary the session announced."""
    if info is None or not info.vocab_size:
        return
    bad = [t for t in ids if not 0 <= t < info.vocab_size]
    if bad:
        raise InvalidReply(f"the cloud's {what} holds token id {bad[0]}, outside the vocabulary of "
                           f"{info.vocab_size}; the session cannot be trusted, open a new one")


# ---- open


def _open_request(session_id: str, *, sampling: SamplingParams = SamplingParams(), model: str = "",
                  max_tokens: int | None = None) -> OpenSession:
    del session_id  # the server names the session
    # The seed travels beside the warping settings (OpenSession.seed).
    return OpenSession(model=model, sampling=dataclasses.replace(sampling, seed=None), seed=sampling.seed,
                       max_tokens=max_tokens)


def _open_args(msg: OpenSession, bounds: RequestBounds) -> tuple[tuple[Any, ...], dict[str, Any]]:
    del bounds
    return (), {"sampling": dataclasses.replace(msg.sampling, seed=msg.seed), "model": msg.model,
                "max_tokens": msg.max_tokens}


def _open_reply(session_id: str, info: SessionInfo, msg: OpenSession, with_cost: bool) -> SessionOpened:
    del msg, with_cost  # the length after the prompt is filled in by the server
    return SessionOpened(session_id=session_id, model=info.model, vocab_size=info.vocab_size,
                         max_context=info.max_tokens, capabilities=capability_names(info.capabilities),
                         eos_token_ids=tuple(info.eos_token_ids))


def _open_result(reply: SessionOpened, msg: OpenSession, info: SessionInfo | None) -> SessionInfo:
    del msg, info
    return SessionInfo(session_id=reply.session_id, model=reply.model, vocab_size=reply.vocab_size,
                       num_layers=0, hidden_size=0, eos_token_ids=tuple(reply.eos_token_ids),
                       max_tokens=reply.max_context, capabilities=capabilities_from_names(reply.capabilities))


# ---- append


def _append_request(session_id: str, token_ids: Sequence[int], *, prefill: bool = True) -> AppendTokens:
    del prefill  # the server always prefills what it is sent (the wire has no flag for it)
    return AppendTokens(session_id=session_id, tokens=_ids(token_ids))


# ---- verify


def _verify_request(session_id: str, draft_ids: Sequence[int], draft_probs: SparseProbs | None = None) -> VerifyDraft:
    draft = _ids(draft_ids)
    indices = probs = None
    if draft_probs is not None:
        if len(draft_probs) != len(draft):
            raise InvalidRequest(f"draft_probs has {len(draft_probs)} rows for a draft of {len(draft)} tokens")
        m = max(len(r) for r in draft_probs.ids)
        indices = np.zeros((len(draft), m), dtype=np.int64)
        probs = np.zeros((len(draft), m), dtype=np.float32)
        for i, (ids, ps) in enumerate(zip(draft_probs.ids, draft_probs.probs, strict=True)):
            indices[i, :len(ids)] = ids
            indices[i, len(ids):] = ids[0]  # padding: probability 0, dropped by the server
            probs[i, :len(ps)] = ps
    return VerifyDraft(session_id=session_id, tokens=draft, draft_indices=indices, draft_probs=probs)


def _verify_args(msg: VerifyDraft, bounds: RequestBounds) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The draft and its sparse q: rows of (m ids, m probs), entries with probability 0 dropped.

    Every size is checked before anything is built (k against `max_draft`, the ids against
    the vocabulary), and the rows are cut with numpy, so a large k x m costs one vectorised
    pass on the event loop, not k x m Python objects.
    """
    draft_len = int(msg.tokens.shape[0])
    if draft_len > bounds.max_draft:
        raise SessionLimitExceeded(f"draft of {draft_len} tokens exceeds max_draft={bounds.max_draft}",
                                   limit_name="max_draft", value=draft_len, limit=bounds.max_draft)
    indices, probs = msg.draft_indices, msg.draft_probs
    if indices is None or probs is None:
        return (msg.tokens.tolist(), None), {}
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= bounds.vocab_size):
        raise InvalidRequest(f"draft_indices hold token ids outside the vocabulary [0, {bounds.vocab_size})")
    keep = probs > 0.0  # [k, m]
    ends = np.cumsum(keep.sum(axis=1)).tolist()
    ids_flat = indices[keep].tolist()
    p_flat = probs[keep].astype(np.float64).tolist()
    starts = [0, *ends[:-1]]
    q = SparseProbs(ids=tuple(tuple(ids_flat[a:b]) for a, b in zip(starts, ends, strict=True)),
                    probs=tuple(tuple(p_flat[a:b]) for a, b in zip(starts, ends, strict=True)))
    return (msg.tokens.tolist(), q), {}


def _verify_result(reply: Verified, msg: VerifyDraft, info: SessionInfo | None) -> VerifyResult:
    k = int(msg.tokens.shape[0])
    if reply.accepted > k:
        raise InvalidReply(f"the cloud accepted {reply.accepted} tokens of a {k}-token draft; "
                           "the session cannot be trusted, open a new one")
    _check_ids([reply.next_token], info, "next token")
    return VerifyResult(accepted=reply.accepted, next_token=reply.next_token, is_bonus=reply.accepted == k,
                        length=reply.length, **_cost(reply, 1))


# ---- score


def _score_request(session_id: str, token_ids: Sequence[int], *, top_k: int = 5, commit: bool = True) -> ScoreTokens:
    return ScoreTokens(session_id=session_id, top_k=top_k, append=commit, include_next=True, tokens=_ids(token_ids))


def _score_reply(session_id: str, res: ScoreResult, msg: ScoreTokens, with_cost: bool) -> Scores:
    rows = int(msg.tokens.shape[0]) + (1 if msg.include_next else 0)
    top_i = top_l = None
    if msg.top_k > 0 and rows > 0:
        top_i = np.asarray(res.top_ids[:rows], dtype=np.int64).reshape(rows, msg.top_k)
        top_l = np.asarray(res.top_logprobs[:rows], dtype=np.float32).reshape(rows, msg.top_k)
    return Scores(session_id=session_id, length=res.length, token_logprobs=np.asarray(res.token_logprobs,
                  dtype=np.float32), top_indices=top_i, top_logprobs=top_l, **_cost_fields(res, with_cost))


def _score_result(reply: Scores, msg: ScoreTokens, info: SessionInfo | None) -> ScoreResult:
    del info
    rows = int(msg.tokens.shape[0]) + 1
    if reply.top_indices is not None and reply.top_logprobs is not None:
        top_ids = tuple(tuple(int(x) for x in r) for r in reply.top_indices.tolist())
        top_lp = tuple(tuple(float(x) for x in r) for r in reply.top_logprobs.tolist())
    else:
        top_ids = tuple(() for _ in range(rows))
        top_lp = tuple(() for _ in range(rows))
    return ScoreResult(token_logprobs=tuple(float(x) for x in reply.token_logprobs.tolist()),
                       top_ids=top_ids, top_logprobs=top_lp, length=reply.length, **_cost(reply, 1))


# ---- generate (streamed: the reply converters handle one chunk)


def _generate_request(session_id: str, n: int, *, stop_ids: Sequence[int] = ()) -> Generate:
    return Generate(session_id=session_id, max_new_tokens=n, stop_tokens=tuple(int(t) for t in stop_ids))


def _generate_args(msg: Generate, bounds: RequestBounds) -> tuple[tuple[Any, ...], dict[str, Any]]:
    del bounds
    kwargs: dict[str, Any] = {"stop_ids": msg.stop_tokens}
    if msg.sampling is not None:  # a per-call override (CloudSession.generate's extension)
        kwargs["sampling"] = msg.sampling
    return (msg.max_new_tokens,), kwargs


def _generate_reply(session_id: str, c: GenerateChunk, msg: Generate, with_cost: bool) -> Generated:
    del msg
    return Generated(session_id=session_id, length=c.length, finish_reason=c.finish_reason,
                     tokens=_ids(c.token_ids), **_cost_fields(c, with_cost))


def _generate_result(reply: Generated, msg: Generate, info: SessionInfo | None) -> GenerateChunk:
    del msg
    ids = tuple(int(t) for t in reply.tokens.tolist())
    _check_ids(ids, info, "generated tokens")
    finish: Any = reply.finish_reason if reply.finish_reason in ("stop", "length") else None
    cost = _cost(reply, len(ids))
    del cost["queue_s"]
    return GenerateChunk(token_ids=ids, finish_reason=finish, length=reply.length, **cost)


# ---- continue_hidden


def _hidden_request(session_id: str, hidden: Any, *, layer: int, top_k: int = 0) -> ContinueHidden:
    if isinstance(hidden, Tensor):  # already in a wire dtype (compressed by the edge): sent as is
        names = {dtype: name for name, dtype in COMPRESSION_DTYPES.items()}
        if hidden.dtype not in names:
            raise InvalidRequest(f"hidden states cannot travel as {hidden.dtype.name}")
        compression, tensor = names[hidden.dtype], hidden
    else:
        arr = np.asarray(hidden)
        compression = "fp16" if arr.dtype == np.float16 else "fp32"
        if compression == "fp32":
            arr = arr.astype(np.float32, copy=False)
        tensor = Tensor.from_numpy(np.ascontiguousarray(arr))
    return ContinueHidden(session_id=session_id, layer=layer, compression=compression, top_k=top_k, hidden=tensor)


def _hidden_reply(session_id: str, h: HiddenResult, msg: ContinueHidden, with_cost: bool) -> HiddenContinued:
    ti = tl = None
    if msg.top_k > 0:
        ti = np.asarray(h.top_ids, dtype=np.int64)
        tl = np.asarray(h.top_logprobs, dtype=np.float32)
    return HiddenContinued(session_id=session_id, next_token=h.next_token, length=h.length, top_indices=ti,
                           top_logprobs=tl, **_cost_fields(h, with_cost))


def _hidden_result(reply: HiddenContinued, msg: ContinueHidden, info: SessionInfo | None) -> HiddenResult:
    del msg, info  # split sessions have no vocabulary check: the edge decodes the token itself
    ti: tuple[int, ...] = ()
    tl: tuple[float, ...] = ()
    if reply.top_indices is not None and reply.top_logprobs is not None:
        ti = tuple(int(x) for x in reply.top_indices.tolist())
        tl = tuple(float(x) for x in reply.top_logprobs.tolist())
    return HiddenResult(next_token=reply.next_token, top_ids=ti, top_logprobs=tl, length=reply.length,
                        **_cost(reply, 1))


# ---- chat (one reply; the server's streamed variant is `Chat(stream=True)`, see CloudServer)


def _chat_request(session_id: str, messages: Any, *, max_tokens: int = 256, temperature: float = 0.0,
                  json_mode: bool = False) -> Chat:
    return Chat(messages=as_messages(messages), session_id=session_id, max_tokens=max_tokens,
                sampling=SamplingParams(temperature=temperature), json_mode=json_mode or None)


def _chat_args(msg: Chat, bounds: RequestBounds) -> tuple[tuple[Any, ...], dict[str, Any]]:
    del bounds
    return (msg.messages,), {"max_tokens": msg.max_tokens, "temperature": msg.sampling.temperature,
                             "json_mode": bool(msg.json_mode)}


def _chat_reply(session_id: str, chat: ChatResult, msg: Chat, with_cost: bool) -> ChatChunk:
    del session_id, with_cost
    return ChatChunk(text=chat.text, finish_reason=chat.finish_reason, prompt_tokens=chat.prompt_tokens,
                     completion_tokens=chat.completion_tokens, session_id=msg.session_id)


def _chat_result(reply: ChatChunk, msg: Chat, info: SessionInfo | None) -> ChatResult:
    del msg, info
    finish: Any = "length" if reply.finish_reason == "length" else "stop"
    return ChatResult(text=reply.text, prompt_tokens=reply.prompt_tokens or 0,
                      completion_tokens=reply.completion_tokens or 0, finish_reason=finish)


def _length(reply: Any, msg: Any, info: SessionInfo | None) -> int:
    del msg, info
    return int(reply.length)


OPERATIONS: dict[str, Operation] = {op.method: op for op in (
    Operation("open", OpenSession, _open_request, _open_args, _open_reply, _open_result),
    Operation("append", AppendTokens, _append_request,
              lambda m, b: ((m.tokens.tolist(),), {}),
              lambda sid, length, m, c: Appended(session_id=sid, length=length),
              _length),
    Operation("verify", VerifyDraft, _verify_request,
              _verify_args,
              lambda sid, r, m, c: Verified(session_id=sid, accepted=r.accepted, next_token=r.next_token,
                                            length=r.length, **_cost_fields(r, c)),
              _verify_result),
    Operation("score", ScoreTokens, _score_request,
              lambda m, b: ((m.tokens.tolist(),), {"top_k": m.top_k, "commit": m.append}),
              _score_reply, _score_result),
    Operation("generate", Generate, _generate_request, _generate_args, _generate_reply, _generate_result,
              streaming=True),
    Operation("continue_hidden", ContinueHidden, _hidden_request,
              lambda m, b: ((m.hidden.numpy(),), {"layer": m.layer, "top_k": m.top_k}),
              _hidden_reply, _hidden_result),
    Operation("chat", Chat, _chat_request, _chat_args, _chat_reply, _chat_result),
    Operation("rollback", Rollback, lambda sid, length: Rollback(session_id=sid, length=length),
              lambda m, b: ((m.length,), {}),
              lambda sid, length, m, c: RolledBack(session_id=sid, length=length),
              _length),
    Operation("close", CloseSession, lambda sid: CloseSession(session_id=sid),
              lambda m, b: ((), {}),
              lambda sid, r, m, c: SessionClosed(session_id=sid),
              lambda reply, m, info: None),
)}
"""The session API on the wire, one row per request message, keyed by method name."""

_BY_REQUEST: dict[type[Message], Operation] = {op.request: op for op in OPERATIONS.values()}


def operation_for(message: Message) -> Operation:
    """The row of a request message.

    Raises:
        InvalidRequest: `message` is not a request of the session API.
    """
    op = _BY_REQUEST.get(type(message))
    if op is None:
        raise InvalidRequest(f"{type(message).__name__} is not a request of the session API")
    return op
