"""`CloudSession`: the in-process backend of `CloudSessionAPI`, over a `tether.runtime.CausalLM`.

What belongs here: one session's committed sequence, its KV state and pending tail, and the
operations on them. What does not: batching (the `Batcher` runs every forward), limits that
span sessions (the `SessionManager`), wire formats.

Invariant kept after every operation: the KV cache holds a prefix of the committed tokens,
and at least the last committed token is pending (not in the cache), so the next verify /
score / generate obtains its first prediction from the same forward pass as its new tokens.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from tether.cloud._acceptance import greedy_accept, sample_token, speculative_accept, target_probs
from tether.contract import (
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
from tether.contract import (
    CloudError,
    InvalidRequest,
    SessionEvicted,
    SessionLimitExceeded,
    SessionNotOpen,
    UnsupportedOperation,
)
from tether.runtime import KVState, LayerwiseLM

if TYPE_CHECKING:
    from tether.cloud._manager import SessionManager
    from tether.protocol import Tensor

log = logging.getLogger("tether.cloud.session")


class SessionStatus(enum.IntEnum):
    """Lifecycle of a session: NEW -> OPEN -> CLOSED or EVICTED (both final)."""

    NEW = 0
    OPEN = 1
    CLOSED = 2
    EVICTED = 3


def _top_k(logprobs: torch.Tensor, k: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    """Per row of [n, V] logprobs: the top-k ids and values, descending."""
    if k == 0:
        empty_i: tuple[int, ...] = ()
        empty_f: tuple[float, ...] = ()
        return tuple(empty_i for _ in range(logprobs.shape[0])), tuple(empty_f for _ in range(logprobs.shape[0]))
    vals, idx = torch.topk(logprobs, k, dim=-1)
    return (tuple(tuple(int(i) for i in row) for row in idx.tolist()),
            tuple(tuple(float(v) for v in row) for row in vals.tolist()))


class CloudSession:
    """One edge conversation on an in-process model; create with `SessionManager.session()`.

    Implements `tether.cloud.CloudSessionAPI` (see there for each operation's contract).
    Requests on one session run in order; up to `CloudConfig.max_pending` may wait.
    """

    def __init__(self, manager: SessionManager) -> None:
        self.id = secrets.token_hex(8)
        self._m = manager
        self._status = SessionStatus.NEW
        self._evicted_reason = ""
        self._state: KVState | None = None
        self._tokens: list[int] = []
        self._split_layer: int | None = None
        self._split_length = 0
        self._sampling = SamplingParams()
        self._gen = torch.Generator()
        self._lock = asyncio.Lock()
        self._pending = 0
        self._max_tokens = manager.max_tokens
        self.last_used = time.monotonic()
        self.kv_tokens = 0  # positions this session's cache holds or is about to hold
        self.chat_tokens = 0  # positions held by a chat completion's temporary cache
        self.kv_peak = 0  # most positions the cache ever held (allocation does not shrink)
        self.kv_fraction = 1.0  # share of the layers this session's cache covers (split computing)

    def __repr__(self) -> str:
        return f"<CloudSession {self.id} {self._status.name.lower()} length={self.length}>"

    # -- what callers may read ----------------------------------------------------------

    @property
    def length(self) -> int:
        """Committed tokens (positions held, for a split-computing session)."""
        return self._split_length if self._split_layer is not None else len(self._tokens)

    @property
    def tokens(self) -> tuple[int, ...]:
        """The committed sequence."""
        return tuple(self._tokens)

    @property
    def status(self) -> SessionStatus:
        return self._status

    @property
    def capabilities(self) -> Capabilities:
        return self._m.capabilities

    @property
    def sampling(self) -> SamplingParams:
        return self._sampling

    @property
    def busy(self) -> bool:
        """True while a request is queued or running on this session."""
        return self._pending > 0 or self._lock.locked()

    @property
    def cache_length(self) -> int:
        s = self._state
        return 0 if s is None else s.length

    # -- plumbing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._status == SessionStatus.OPEN:
            return
        if self._status == SessionStatus.EVICTED:
            raise SessionEvicted(
                f"session {self.id} was evicted ({self._evicted_reason}); open a new session and re-prefill",
                reason=self._evicted_reason,
            )
        if self._status == SessionStatus.NEW:
            raise SessionNotOpen(f"session {self.id} is not open; call open() first")
        raise SessionNotOpen(f"session {self.id} is closed")

    @asynccontextmanager
    async def _op(self, op: str) -> AsyncIterator[None]:
        """Admission (limits), ordering (lock), metrics and state repair around one request."""
        self._check_open()
        limit = self._m.config.max_pending
        if self._pending >= limit:
            self._m.count(op, "limit_exceeded")
            raise SessionLimitExceeded(
                f"session {self.id} already has {self._pending} requests pending (max_pending={limit})",
                limit_name="max_pending", value=self._pending + 1, limit=limit,
            )
        self._pending += 1
        started = time.perf_counter()
        outcome = "ok"
        try:
            async with self._lock:
                self._check_open()
                self._m.touch(self)
                try:
                    yield
                except BaseException:
                    self._repair()
                    raise
        except CloudError as exc:
            outcome = exc.code
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except BaseException:
            outcome = "internal_error"
            raise
        finally:
            self._pending -= 1
            self.last_used = time.monotonic()
            self._m.count(op, outcome, time.perf_counter() - started)

    def _repair(self) -> None:
        """After a failed or cancelled request: drop cached positions past the committed ones."""
        s = self._state
        if s is None or self._status != SessionStatus.OPEN:
            return
        if self._split_layer is not None:
            if s.length > self._split_length:
                self._m.model.truncate(s, self._split_length)
        else:
            keep = max(len(self._tokens) - 1, 0)
            if s.length > keep:
                self._m.model.truncate(s, keep)
        self.kv_tokens = s.length

    def _require_state(self) -> KVState:
        if self._state is None:
            self._state = self._m.model.new_state()
        return self._state

    def _require_tokens(self, op: str) -> None:
        if self._split_layer is not None:
            raise InvalidRequest(f"session {self.id} does split computing; {op} needs a token session")
        if not self._tokens:
            raise InvalidRequest(f"{op} needs at least one committed token; append the prompt first")

    def _check_room(self, extra: int) -> None:
        limit = self._max_tokens
        if len(self._tokens) + extra > limit:
            raise SessionLimitExceeded(
                f"session would hold {len(self._tokens) + extra} tokens (max_tokens={limit})",
                limit_name="max_tokens", value=len(self._tokens) + extra, limit=limit,
            )

    def _check_ids(self, token_ids: Sequence[int], what: str) -> list[int]:
        vocab = self._m.model.info.vocab_size
        ids = [int(t) for t in token_ids]
        for t in ids:
            if not 0 <= t < vocab:
                raise InvalidRequest(f"{what}: token id {t} outside the vocabulary (size {vocab})")
        return ids

    async def _forward(self, token_ids: list[int], *, tail: int = 0) -> tuple[torch.Tensor, int, float, float]:
        """Run `token_ids` after the cache; long inputs in chunks. Returns (logits of the last
        chunk, or of at least the last `tail` positions when they span several chunks;
        forward passes, compute seconds, queue seconds)."""
        state = self._require_state()
        chunk = self._m.config.prefill_chunk
        passes, compute, queue = 0, 0.0, 0.0
        kept: list[torch.Tensor] = []
        pos = 0
        while True:
            part = token_ids[pos:pos + chunk]
            self._m.reserve_kv(self, state.length + len(part))
            try:
                out = await self._m.batcher.extend(state, part)
            finally:
                self.kv_tokens = state.length
            end = pos + len(part)
            if end > len(token_ids) - max(tail, 1):  # holds rows the caller asked for
                kept.append(out.logits)
            passes += 1
            compute += out.compute_s
            queue += out.queue_s
            pos = end
            if pos >= len(token_ids):
                logits = kept[0] if len(kept) == 1 else torch.cat(kept)
                return logits, passes, compute, queue

    async def _forward_tail(self, new_ids: list[int]) -> tuple[torch.Tensor, int, float, float]:
        """Forward ``pending + new_ids``; return the len(new_ids) + 1 rows that predict each new
        token and the one after them, as [n + 1, V] logits (plus passes, compute, queue)."""
        state = self._require_state()
        pending = self._tokens[state.length:]
        assert pending, "invariant: the last committed token is pending"
        passes, compute, queue = 0, 0.0, 0.0
        if len(pending) - 1 > self._m.config.prefill_chunk:
            _, passes, compute, queue = await self._forward(pending[:-1])
            pending = pending[-1:]
        logits, p2, c2, q2 = await self._forward(pending + new_ids, tail=len(new_ids) + 1)
        rows = logits[-(len(new_ids) + 1):]
        return rows, passes + p2, compute + c2, queue + q2

    def _settle(self) -> None:
        """Restore the invariant: the cache holds at most all but the last committed token."""
        s = self._state
        if s is None:
            return
        keep = max(len(self._tokens) - 1, 0)
        if s.length > keep:
            self._m.model.truncate(s, keep)
        self.kv_tokens = s.length

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self, *, sampling: SamplingParams = SamplingParams(), model: str | None = None,
                   max_tokens: int | None = None) -> SessionInfo:
        """See `CloudSessionAPI.open`; `max_tokens` lowers this session's token limit."""
        if self._status != SessionStatus.NEW:
            raise InvalidRequest(f"session {self.id} was already opened")
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequest("sampling must be a SamplingParams")
        self._m.check_model_name(model)
        if max_tokens is not None:
            if max_tokens < 1:
                raise InvalidRequest(f"max_tokens must be >= 1, got {max_tokens}")
            self._max_tokens = min(max_tokens, self._m.max_tokens)
        self._m.register(self)
        self._sampling = sampling
        if sampling.seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(int(sampling.seed))
        self._status = SessionStatus.OPEN
        self.last_used = time.monotonic()
        self._m.count("open", "ok")
        return self._m.session_info(self.id, max_tokens=self._max_tokens)

    async def close(self) -> None:
        if self._status in (SessionStatus.CLOSED, SessionStatus.EVICTED, SessionStatus.NEW):
            if self._status == SessionStatus.NEW:
                self._status = SessionStatus.CLOSED
            return
        self._status = SessionStatus.CLOSED  # a running generate stops at its next step
        async with self._lock:
            self._free()
        self._m.unregister(self)
        self._m.count("close", "ok")

    def evict(self, reason: str) -> None:
        """Drop the state now (the manager calls this only while the session is idle)."""
        if self._status != SessionStatus.OPEN:
            return
        self._status = SessionStatus.EVICTED
        self._evicted_reason = reason
        self._free()
        self._m.unregister(self, evicted=reason)
        log.info("session evicted", extra={"session_id": self.id, "reason": reason})

    def _free(self) -> None:
        if self._state is not None:
            self._m.model.release(self._state)
            self._state = None
        self.kv_tokens = 0
        self.kv_peak = 0

    # -- operations -----------------------------------------------------------------------

    async def append(self, token_ids: Sequence[int], *, prefill: bool = True) -> int:
        async with self._op("append"):
            if self._split_layer is not None:
                raise InvalidRequest(f"session {self.id} does split computing; append needs a token session")
            ids = self._check_ids(token_ids, "append")
            self._check_room(len(ids))
            self._tokens.extend(ids)
            if prefill:
                state = self._require_state()
                todo = self._tokens[state.length:-1]
                if todo:
                    try:
                        await self._forward(todo)
                    except BaseException:
                        del self._tokens[len(self._tokens) - len(ids):]
                        raise
            return len(self._tokens)

    async def verify(self, draft_ids: Sequence[int], draft_probs: SparseProbs | None = None) -> VerifyResult:
        async with self._op("verify"):
            self._require_tokens("verify")
            draft = self._check_ids(draft_ids, "verify")
            k = len(draft)
            cfg = self._m.config
            if k > cfg.max_draft:
                raise SessionLimitExceeded(
                    f"draft of {k} tokens exceeds max_draft={cfg.max_draft}",
                    limit_name="max_draft", value=k, limit=cfg.max_draft,
                )
            if draft_probs is not None and len(draft_probs) != k:
                raise InvalidRequest(f"draft_probs has {len(draft_probs)} rows for a draft of {k} tokens")
            if draft_probs is not None and not self._sampling.greedy:
                for i, d in enumerate(draft):
                    if draft_probs.prob_of(i, d) <= 0.0:
                        raise InvalidRequest(f"draft token {d} at position {i} has probability 0 under draft_probs")
            self._check_room(k + 1)
            rows, passes, compute, queue = await self._forward_tail(draft)  # [k + 1, V]
            if self._sampling.greedy:
                acc = greedy_accept(draft, rows)
            else:
                sampling, gen = self._sampling, self._gen
                acc = await asyncio.to_thread(
                    lambda: speculative_accept(draft, target_probs(rows, sampling), draft_probs, gen)
                )
            self._tokens.extend(draft[:acc.accepted])
            self._tokens.append(acc.next_token)
            self._settle()
            self._m.tokens(verified=k, accepted=acc.accepted, committed=acc.accepted + 1)
            return VerifyResult(accepted=acc.accepted, next_token=acc.next_token, is_bonus=acc.is_bonus,
                                length=len(self._tokens), forward_passes=passes, compute_s=compute, queue_s=queue)

    async def score(self, token_ids: Sequence[int], *, top_k: int = 5, commit: bool = True) -> ScoreResult:
        async with self._op("score"):
            self._require_tokens("score")
            ids = self._check_ids(token_ids, "score")
            cap = self._m.config.max_top_k
            if not 0 <= top_k <= cap:
                raise SessionLimitExceeded(f"top_k={top_k} is outside [0, {cap}] (max_top_k)",
                                           limit_name="max_top_k", value=top_k, limit=cap)
            self._check_room(len(ids))
            before = len(self._tokens)
            rows, passes, compute, queue = await self._forward_tail(ids)  # [n + 1, V]
            logprobs = torch.log_softmax(rows.float(), dim=-1)
            token_lp = tuple(float(logprobs[i, t]) for i, t in enumerate(ids))
            top_ids, top_lp = _top_k(logprobs, top_k)
            self._tokens.extend(ids)
            if not commit:
                del self._tokens[before:]
            self._settle()
            return ScoreResult(token_logprobs=token_lp, top_ids=top_ids, top_logprobs=top_lp,
                               length=len(self._tokens), forward_passes=passes, compute_s=compute, queue_s=queue)

    async def generate(self, n: int, *, stop_ids: Sequence[int] = (), top_k: int | None = None,
                       sampling: SamplingParams | None = None) -> AsyncIterator[GenerateChunk]:
        """See `CloudSessionAPI.generate`; `top_k` (not None) also returns each token's logprob
        and its position's top-k alternatives; `sampling` overrides the session's for this call."""
        params = self._sampling if sampling is None else sampling
        async with self._op("generate"):
            cap = self._m.config.max_top_k
            if top_k is not None and not 0 <= top_k <= cap:
                raise SessionLimitExceeded(f"top_k={top_k} is outside [0, {cap}] (max_top_k)",
                                           limit_name="max_top_k", value=top_k, limit=cap)
            self._require_tokens("generate")
            if n < 0:
                raise InvalidRequest(f"generate needs n >= 0, got {n}")
            stops = set(self._check_ids(stop_ids, "generate stop_ids"))
            # Up to the session's token limit, not refused past it: a generation that reaches
            # max_tokens ends there with finish_reason "length", like one that reaches n.
            n = min(n, max(0, self._max_tokens - len(self._tokens)))
            if n == 0:
                yield GenerateChunk(token_ids=(), finish_reason="length", length=len(self._tokens),
                                    forward_passes=0)
                return
            for i in range(n):
                self._check_open()  # close() during a long generation stops it here
                rows, passes, compute, _ = await self._forward_tail([])
                # The one token step chat shares (argmax when greedy). Forwards go through the
                # batcher, joining other sessions' passes, so the runtime's decoder does not fit here.
                token = sample_token(rows[-1], params, self._gen)
                self._tokens.append(token)
                self._settle()
                self._m.tokens(verified=0, accepted=0, committed=1)
                done: Any = "stop" if token in stops else ("length" if i == n - 1 else None)
                extra: dict[str, Any] = {}
                if top_k is not None:
                    lp = torch.log_softmax(rows[-1:].float(), dim=-1)
                    ids, vals = _top_k(lp, top_k)
                    extra = {"logprobs": (float(lp[0, token]),), "top_ids": ids, "top_logprobs": vals}
                yield GenerateChunk(token_ids=(token,), finish_reason=done, length=len(self._tokens),
                                    forward_passes=passes, compute_s=compute, **extra)
                if done is not None:
                    return

    async def rollback(self, length: int) -> int:
        async with self._op("rollback"):
            if not 0 <= length <= self.length:
                raise InvalidRequest(f"cannot roll back to length {length}; the session holds {self.length}")
            if self._split_layer is not None:
                if self._state is not None:
                    self._m.model.truncate(self._state, length)
                    self.kv_tokens = self._state.length
                self._split_length = length
                return length
            del self._tokens[length:]
            self._settle()
            return length

    async def continue_hidden(
        self, hidden: npt.NDArray[np.floating[Any]] | Tensor, *, layer: int, top_k: int = 0
    ) -> HiddenResult:
        async with self._op("continue_hidden"):
            model = self._m.model
            if not isinstance(model, LayerwiseLM):
                raise UnsupportedOperation("this model backend cannot run layer ranges (split computing)")
            info = model.info
            if self._tokens:
                raise InvalidRequest(f"session {self.id} holds tokens; use a new session for split computing")
            if self._split_layer is None:
                if not 0 < layer < info.num_layers:
                    raise InvalidRequest(f"split layer must be in [1, {info.num_layers - 1}], got {layer}")
            elif layer != self._split_layer:
                raise InvalidRequest(f"this session splits at layer {self._split_layer}, got {layer}")
            from tether.protocol import Tensor as WireTensor

            # A wire tensor (compressed hidden states from the edge) decodes to float32 here.
            arr = hidden.numpy() if isinstance(hidden, WireTensor) else np.asarray(hidden)
            if arr.ndim != 2 or arr.shape[1] != info.hidden_size or arr.shape[0] == 0:
                raise InvalidRequest(f"hidden states must be [n >= 1, {info.hidden_size}], got {tuple(arr.shape)}")
            if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
                raise InvalidRequest("hidden states must be finite floating-point values")
            cap = self._m.config.max_top_k
            if not 0 <= top_k <= cap:
                raise SessionLimitExceeded(f"top_k={top_k} is outside [0, {cap}] (max_top_k)",
                                           limit_name="max_top_k", value=top_k, limit=cap)
            n = arr.shape[0]
            if self._split_length + n > self._max_tokens:
                raise SessionLimitExceeded(
                    f"session would hold {self._split_length + n} positions (max_tokens={self._max_tokens})",
                    limit_name="max_tokens", value=self._split_length + n, limit=self._max_tokens)
            self._split_layer = layer
            state = self._require_state()
            h = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
            self._m.reserve_kv(self, state.length + n, layer_fraction=(info.num_layers - layer) / info.num_layers)

            def run() -> torch.Tensor:
                out = model.run_layers(state, h, layer, info.num_layers)  # [n, H]
                return model.head(out[-1:])[0]  # [V]

            try:
                logits, compute, queue = await self._m.batcher.call(run)
            finally:
                self.kv_tokens = state.length
            self._split_length = state.length
            token = sample_token(logits, self._sampling, self._gen)
            lp = torch.log_softmax(logits.float(), dim=-1)[None, :]
            ids, vals = _top_k(lp, top_k)
            return HiddenResult(next_token=token, top_ids=ids[0], top_logprobs=vals[0], length=self._split_length,
                                compute_s=compute, queue_s=queue)

    async def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        json_mode: bool = False,
        top_p: float = 1.0,
        top_k: int = 0,
    ) -> ChatResult:
        """See `CloudSessionAPI.chat`; `top_p` and `top_k` also cut the sampled distribution."""
        async with self._op("chat"):
            return await self._m.chat(self, as_messages(messages), max_tokens=max_tokens,
                                      temperature=temperature, top_p=top_p, top_k=top_k, json_mode=json_mode,
                                      generator=self._gen)

    async def chat_stream(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        json_mode: bool = False,
        top_k: int = 0,
    ) -> AsyncIterator[tuple[str, ChatResult | None]]:
        """Like `chat`, streamed: ``(text delta, None)`` as text is produced, then ``("", result)``."""
        async with self._op("chat"):
            async for item in self._m.chat_stream(self, as_messages(messages), max_tokens=max_tokens,
                                                  temperature=temperature, top_p=top_p, top_k=top_k,
                                                  json_mode=json_mode, generator=self._gen):
                yield item
