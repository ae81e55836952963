"""The device side of `tether serve`: `CloudSessionAPI` over an encrypted `tether.protocol` connection.

What belongs here: `RemoteCloud` (a connection that hands out sessions, reconnecting when it
dropped) and `RemoteCloudSession` (each API call through its row of the operation table,
`tether.protocol.OPERATIONS`: the call becomes the request message, the reply becomes the
contract's result, checked against the request, and an `ErrorReply` becomes the contract's
error). What does not: the protocol itself, the conversions (the table), retries and
degradation policy (`CloudLink` decides those).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from tether.contract import (
    BackendError,
    Capabilities,
    ChatMessage,
    ChatResult,
    CloudError,
    GenerateChunk,
    HiddenResult,
    InvalidRequest,
    SamplingParams,
    ScoreResult,
    SessionInfo,
    SessionNotOpen,
    SparseProbs,
    UnsupportedOperation,
    VerifyResult,
)
from tether.protocol import OPERATIONS, Operation, RemoteError, capabilities_from_names, cloud_error

if TYPE_CHECKING:
    from tether.protocol import Tensor


def _cloud_error(exc: BaseException) -> CloudError:
    """A protocol failure as the `CloudError` the session API promises."""
    if isinstance(exc, RemoteError):
        return cloud_error(exc.code, exc.message, exc.reason)
    return BackendError(f"connection to the cloud failed: {type(exc).__name__}")


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
    """One cloud session over an encrypted connection; implements `CloudSessionAPI`.

    Every method goes through its row of `tether.protocol.OPERATIONS`. The methods below
    are the typed ones of the contract, some with a device-side rule of their own (an empty
    draft, a generate of 0 tokens, JSON mode without the capability); a table row this class
    does not define is forwarded as is (`__getattr__`), so a new operation needs no edit here.

    Replies are checked before they are believed (`tether.protocol.Operation.decode_reply`):
    a verify that accepts more tokens than were drafted, or a token id outside the
    vocabulary, raises `tether.contract.InvalidReply` (a `BackendError`: the link policy
    then abandons the session).
    """

    def __init__(self, connection: Any) -> None:
        self._conn = connection
        welcome = connection.welcome
        self._caps = capabilities_from_names(welcome.capabilities)
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

    def _sid(self) -> str:
        if self._id is None:
            raise SessionNotOpen("session is closed" if self._closed else "session is not open; call open() first")
        return self._id

    async def _call(self, op: Operation, session_id: str, *args: Any, **kwargs: Any) -> Any:
        """One request through its table row; the session's length follows the reply."""
        msg = op.encode_request(session_id, *args, **kwargs)
        mark = self._byte_mark()
        try:
            reply = await self._conn.request(msg)
        except CloudError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _cloud_error(exc) from exc
        finally:
            self._count_bytes(mark)
        result = op.decode_reply(reply, msg, self.info)
        length = getattr(reply, "length", None)
        if isinstance(length, int):
            self._length = length
        return result

    async def _stream(self, op: Operation, session_id: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """A streaming request through its table row: each reply decoded as one result."""
        msg = op.encode_request(session_id, *args, **kwargs)
        mark = self._byte_mark()
        try:
            async for reply in self._conn.stream(msg):
                result = op.decode_reply(reply, msg, self.info)
                self._length = reply.length
                self._count_bytes(mark)
                mark = self._byte_mark()
                yield result
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

    def __getattr__(self, name: str) -> Any:
        """A table operation this class has no method for, forwarded with no device-side rule."""
        op = OPERATIONS.get(name)
        if op is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if op.streaming:
            return lambda *args, **kwargs: self._stream(op, self._sid(), *args, **kwargs)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self._call(op, self._sid(), *args, **kwargs)

        return call

    async def open(self, *, sampling: SamplingParams = SamplingParams(), model: str | None = None,
                   max_tokens: int | None = None) -> SessionInfo:
        if self._id is not None or self._closed:
            raise InvalidRequest("session was already opened")
        name = model or (self._models[0] if self._models else "")
        info: SessionInfo = await self._call(OPERATIONS["open"], "", sampling=sampling, model=name,
                                             max_tokens=max_tokens)
        self._id = info.session_id
        self._caps = info.capabilities
        self.info = info
        return info

    async def append(self, token_ids: Sequence[int], *, prefill: bool = True) -> int:
        length: int = await self._call(OPERATIONS["append"], self._sid(), token_ids, prefill=prefill)
        return length

    async def verify(self, draft_ids: Sequence[int], draft_probs: SparseProbs | None = None) -> VerifyResult:
        sid = self._sid()
        if not draft_ids:  # the wire needs a non-empty draft: one cloud step is a generate of 1
            token = -1
            async for c in self.generate(1):
                token = c.token_ids[0] if c.token_ids else token
            return VerifyResult(accepted=0, next_token=token, is_bonus=True, length=self._length)
        result: VerifyResult = await self._call(OPERATIONS["verify"], sid, draft_ids, draft_probs)
        return result

    async def score(self, token_ids: Sequence[int], *, top_k: int = 5, commit: bool = True) -> ScoreResult:
        result: ScoreResult = await self._call(OPERATIONS["score"], self._sid(), token_ids, top_k=top_k,
                                               commit=commit)
        return result

    async def generate(self, n: int, *, stop_ids: Sequence[int] = ()) -> AsyncIterator[GenerateChunk]:
        sid = self._sid()
        if n == 0:
            yield GenerateChunk(token_ids=(), finish_reason="length", length=self._length, forward_passes=0)
            return
        if n < 0:
            raise InvalidRequest(f"generate needs n >= 0, got {n}")
        async for chunk in self._stream(OPERATIONS["generate"], sid, n, stop_ids=stop_ids):
            yield chunk

    async def continue_hidden(
        self, hidden: npt.NDArray[np.floating[Any]] | Tensor, *, layer: int, top_k: int = 0
    ) -> HiddenResult:
        result: HiddenResult = await self._call(OPERATIONS["continue_hidden"], self._sid(), hidden, layer=layer,
                                                top_k=top_k)
        return result

    async def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        json_mode: bool = False,
    ) -> ChatResult:
        if json_mode and not self._caps.json_mode:
            raise UnsupportedOperation("this server cannot constrain chat output to JSON (no json_mode capability)")
        result: ChatResult = await self._call(OPERATIONS["chat"], self._sid(), messages, max_tokens=max_tokens,
                                              temperature=temperature, json_mode=json_mode)
        return result

    async def rollback(self, length: int) -> int:
        new_length: int = await self._call(OPERATIONS["rollback"], self._sid(), length)
        return new_length

    async def close(self) -> None:
        if self._id is None or self._closed:
            self._closed = True
            return
        sid, self._id = self._id, None
        self._closed = True
        if self._conn.closed:
            return
        try:
            await self._conn.request(OPERATIONS["close"].encode_request(sid))
        except Exception:  # noqa: BLE001 - closing is best effort; the server frees it on disconnect
            pass
