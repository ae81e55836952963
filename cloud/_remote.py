"""The client side of `CloudServer`: `CloudSessionAPI` over an encrypted `tether.protocol` connection.

What belongs here: `RemoteCloud` (a connection that hands out sessions, reconnecting when it
dropped) and `RemoteCloudSession` (each API call as one request message, its reply back as
the API's result, `ErrorReply` codes back as `CloudError`s). What does not: the protocol
itself, retries and degradation policy (the edge's `CloudLink` decides those).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from tether.cloud._api import (
    Capabilities,
    ChatMessage,
    ChatResult,
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
)

if TYPE_CHECKING:
    from tether.protocol import Tensor


def _capabilities(names: Sequence[str]) -> Capabilities:
    have = set(names)
    return Capabilities(verify="verify" in have, sampling_verify="sampling_verify" in have, score="score" in have,
                        generate="generate" in have, hidden="hidden" in have, chat="chat" in have,
                        json_mode="json_mode" in have, rollback="rollback" in have)


def _cloud_error(exc: BaseException) -> CloudError:
    """A protocol failure as the `CloudError` the session API promises."""
    from tether.protocol import ChannelError, ErrorCode, RemoteError

    if isinstance(exc, RemoteError):
        code = exc.code
        message = exc.message
        if code == ErrorCode.BAD_REQUEST:
            return InvalidRequest(message)
        if code == ErrorCode.UNSUPPORTED:
            return UnsupportedOperation(message)
        if code == ErrorCode.NOT_FOUND:
            return SessionNotOpen(message)
        if code == ErrorCode.SESSION_EVICTED:
            reason = next((r for r in ("idle", "shutdown", "memory") if f"({r})" in message), "memory")
            return SessionEvicted(message, reason=reason)
        if code == ErrorCode.SHUTTING_DOWN:
            return SessionEvicted(f"the server is shutting down (shutdown): {message}", reason="shutdown")
        if code == ErrorCode.LIMIT_EXCEEDED:
            return SessionLimitExceeded(message)
        if code == ErrorCode.OVERLOADED:
            return ServerOverloaded(message)
        return BackendError(f"cloud request failed ({ErrorCode(code).name if code in ErrorCode._value2member_map_ else code}): {message}")
    if isinstance(exc, ChannelError):
        return BackendError(f"connection to the cloud failed: {type(exc).__name__}")
    return BackendError(f"connection to the cloud failed: {type(exc).__name__}")


def _cost(reply: Any, passes: int) -> dict[str, Any]:
    """The reply's cost fields for the API result (a server without them: `passes` passes, 0 s)."""
    return {"forward_passes": passes if reply.forward_passes is None else int(reply.forward_passes),
            "compute_s": reply.compute_s or 0.0, "queue_s": reply.queue_s or 0.0}


class RemoteCloud:
    """A connection to a `tether serve` instance that opens sessions on it.

    Use `RemoteCloud.connect(...)`; `new_session()` reconnects first if the connection
    dropped (sessions of the old connection are gone: the server closed them).
    """

    def __init__(self, connect_kwargs: dict[str, Any]) -> None:
        self._kwargs = connect_kwargs
        self._conn: Any = None
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, url: str, client_keys: Any, *, server_public_key: Any, **options: Any) -> RemoteCloud:
        """Connect now (see `tether.protocol.connect` for `options`: token, pattern, link...).

        Raises:
            BackendError: the server cannot be reached or the handshake failed.
        """
        self = cls({"url": url, "client_keys": client_keys, "server_public_key": server_public_key, **options})
        await self._connection()
        return self

    async def _connection(self) -> Any:
        from tether.protocol import connect

        async with self._lock:
            if self._conn is None or self._conn.closed:
                kw = dict(self._kwargs)
                # "cost": replies carry forward passes and compute seconds (the edge's stats).
                kw["capabilities"] = (*kw.get("capabilities", ()), "cost")
                try:
                    self._conn = await connect(kw.pop("url"), kw.pop("client_keys"), **kw)
                except (OSError, asyncio.TimeoutError) as exc:
                    raise BackendError(f"cannot reach the cloud: {type(exc).__name__}") from exc
                except Exception as exc:
                    raise _cloud_error(exc) from exc
            return self._conn

    @property
    def connection(self) -> Any:
        """The current `tether.protocol.Connection` (None before connecting)."""
        return self._conn

    async def new_session(self) -> RemoteCloudSession:
        """A fresh, unopened session on the (re)connected server."""
        return RemoteCloudSession(await self._connection())

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.close()


class RemoteCloudSession:
    """One cloud session over an encrypted connection; implements `CloudSessionAPI`."""

    def __init__(self, connection: Any) -> None:
        self._conn = connection
        welcome = connection.welcome
        self._caps = _capabilities(welcome.capabilities)
        self._models = tuple(welcome.models)
        self._id: str | None = None
        self._length = 0
        self._closed = False
        self.info: SessionInfo | None = None
        # Bytes that crossed the connection while this session's requests were in flight
        # (the edge's per-generation stats; concurrent sessions on one connection overlap).
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def session_id(self) -> str | None:
        return self._id

    def _count_bytes(self, since: tuple[int, int]) -> None:
        self.bytes_sent += max(0, int(getattr(self._conn, "bytes_sent", 0)) - since[0])
        self.bytes_received += max(0, int(getattr(self._conn, "bytes_received", 0)) - since[1])

    def _byte_mark(self) -> tuple[int, int]:
        return int(getattr(self._conn, "bytes_sent", 0)), int(getattr(self._conn, "bytes_received", 0))

    async def _request(self, message: Any) -> Any:
        mark = self._byte_mark()
        try:
            return await self._conn.request(message)
        except CloudError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _cloud_error(exc) from exc
        finally:
            self._count_bytes(mark)

    def _sid(self) -> str:
        if self._id is None:
            raise SessionNotOpen("session is closed" if self._closed else "session is not open; call open() first")
        return self._id

    async def open(self, *, sampling: SamplingParams = SamplingParams(), model: str | None = None,
                   max_tokens: int | None = None) -> SessionInfo:
        from tether.protocol import OpenSession
        from tether.protocol import SamplingParams as WireSampling

        if self._id is not None or self._closed:
            raise InvalidRequest("session was already opened")
        name = model or (self._models[0] if self._models else "")
        reply = await self._request(OpenSession(
            model=name, sampling=WireSampling(temperature=sampling.temperature, top_p=sampling.top_p,
                                              top_k=sampling.top_k),
            seed=sampling.seed, max_tokens=max_tokens))
        self._id = reply.session_id
        self._length = reply.length
        self._caps = _capabilities(reply.capabilities)
        self.info = SessionInfo(session_id=reply.session_id, model=reply.model, vocab_size=reply.vocab_size,
                                num_layers=0, hidden_size=0, eos_token_ids=tuple(reply.eos_token_ids),
                                max_tokens=reply.max_context, capabilities=self._caps)
        return self.info

    async def append(self, token_ids: Sequence[int], *, prefill: bool = True) -> int:
        from tether.protocol import AppendTokens

        reply = await self._request(AppendTokens(session_id=self._sid(),
                                                 tokens=np.asarray(list(token_ids), dtype=np.int64)))
        self._length = reply.length
        return self._length

    async def verify(self, draft_ids: Sequence[int], draft_probs: SparseProbs | None = None) -> VerifyResult:
        from tether.protocol import VerifyDraft

        sid = self._sid()
        draft = [int(t) for t in draft_ids]
        if not draft:  # the wire needs a non-empty draft: one cloud step is a generate of 1
            token = -1
            async for c in self.generate(1):
                token = c.token_ids[0] if c.token_ids else token
            return VerifyResult(accepted=0, next_token=token, is_bonus=True, length=self._length)
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
        reply = await self._request(VerifyDraft(session_id=sid, tokens=np.asarray(draft, dtype=np.int64),
                                                draft_indices=indices, draft_probs=probs))
        self._length = reply.length
        return VerifyResult(accepted=reply.accepted, next_token=reply.next_token,
                            is_bonus=reply.accepted == len(draft), length=reply.length, **_cost(reply, 1))

    async def score(self, token_ids: Sequence[int], *, top_k: int = 5, commit: bool = True) -> ScoreResult:
        from tether.protocol import ScoreTokens

        ids = [int(t) for t in token_ids]
        reply = await self._request(ScoreTokens(session_id=self._sid(), top_k=top_k, append=commit,
                                                include_next=True, tokens=np.asarray(ids, dtype=np.int64)))
        self._length = reply.length
        rows = len(ids) + 1
        if reply.top_indices is not None and reply.top_logprobs is not None:
            top_ids = tuple(tuple(int(x) for x in r) for r in reply.top_indices.tolist())
            top_lp = tuple(tuple(float(x) for x in r) for r in reply.top_logprobs.tolist())
        else:
            top_ids = tuple(() for _ in range(rows))
            top_lp = tuple(() for _ in range(rows))
        return ScoreResult(token_logprobs=tuple(float(x) for x in reply.token_logprobs.tolist()),
                           top_ids=top_ids, top_logprobs=top_lp, length=reply.length, **_cost(reply, 1))

    async def generate(self, n: int, *, stop_ids: Sequence[int] = ()) -> AsyncIterator[GenerateChunk]:
        from tether.protocol import Generate

        sid = self._sid()
        if n == 0:
            yield GenerateChunk(token_ids=(), finish_reason="length", length=self._length, forward_passes=0)
            return
        if n < 0:
            raise InvalidRequest(f"generate needs n >= 0, got {n}")
        msg = Generate(session_id=sid, max_new_tokens=n, stop_tokens=tuple(int(t) for t in stop_ids))
        mark = self._byte_mark()
        try:
            async for reply in self._conn.stream(msg):
                self._length = reply.length
                finish: Any = reply.finish_reason if reply.finish_reason in ("stop", "length") else None
                ids = tuple(int(t) for t in reply.tokens.tolist())
                self._count_bytes(mark)
                mark = self._byte_mark()
                cost = _cost(reply, len(ids))
                cost.pop("queue_s", None)
                yield GenerateChunk(token_ids=ids, finish_reason=finish, length=reply.length, **cost)
        except CloudError:
            raise
        except asyncio.CancelledError:
            raise
        except GeneratorExit:
            raise
        except Exception as exc:
            raise _cloud_error(exc) from exc
        finally:
            self._count_bytes(mark)

    async def continue_hidden(
        self, hidden: npt.NDArray[np.floating[Any]] | Tensor, *, layer: int, top_k: int = 0
    ) -> HiddenResult:
        from tether.protocol import ContinueHidden, Tensor
        from tether.protocol._messages import COMPRESSIONS

        if isinstance(hidden, Tensor):  # already in a wire dtype (compressed by the edge): sent as is
            names = {dtype: name for name, dtype in COMPRESSIONS.items()}
            if hidden.dtype not in names:
                raise InvalidRequest(f"hidden states cannot travel as {hidden.dtype.name}")
            compression, tensor = names[hidden.dtype], hidden
        else:
            arr = np.asarray(hidden)
            compression = "fp16" if arr.dtype == np.float16 else "none"
            if compression == "none":
                arr = arr.astype(np.float32, copy=False)
            tensor = Tensor.from_numpy(np.ascontiguousarray(arr))
        reply = await self._request(ContinueHidden(session_id=self._sid(), layer=layer, compression=compression,
                                                   top_k=top_k, hidden=tensor))
        self._length = reply.length
        ti: tuple[int, ...] = ()
        tl: tuple[float, ...] = ()
        if reply.top_indices is not None and reply.top_logprobs is not None:
            ti = tuple(int(x) for x in reply.top_indices.tolist())
            tl = tuple(float(x) for x in reply.top_logprobs.tolist())
        return HiddenResult(next_token=reply.next_token, top_ids=ti, top_logprobs=tl, length=reply.length,
                            **_cost(reply, 1))

    async def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        json_mode: bool = False,
    ) -> ChatResult:
        from tether.protocol import Chat
        from tether.protocol import ChatMessage as WireMessage
        from tether.protocol import SamplingParams as WireSampling

        if json_mode and not self._caps.json_mode:
            raise UnsupportedOperation("this server cannot constrain chat output to JSON (no json_mode capability)")
        msgs = tuple(WireMessage(role=m.role, content=m.content) for m in as_messages(messages))
        reply = await self._request(Chat(messages=msgs, session_id=self._sid(), max_tokens=max_tokens,
                                         sampling=WireSampling(temperature=temperature), json_mode=json_mode or None))
        finish: Any = "length" if reply.finish_reason == "length" else "stop"
        return ChatResult(text=reply.text, prompt_tokens=reply.prompt_tokens or 0,
                          completion_tokens=reply.completion_tokens or 0, finish_reason=finish)

    async def rollback(self, length: int) -> int:
        from tether.protocol import Rollback

        reply = await self._request(Rollback(session_id=self._sid(), length=length))
        self._length = reply.length
        return self._length

    async def close(self) -> None:
        from tether.protocol import CloseSession

        if self._id is None or self._closed:
            self._closed = True
            return
        sid, self._id = self._id, None
        self._closed = True
        if self._conn.closed:
            return
        try:
            await self._conn.request(CloseSession(session_id=sid))
        except Exception:  # noqa: BLE001 - closing is best effort; the server frees it on disconnect
            pass
