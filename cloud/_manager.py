"""`SessionManager`: the sessions of one model on one server, and the limits that span them.

What belongs here: creating and finding sessions, the server-wide session cap, the KV memory
budget with least-recently-used eviction, the idle-timeout reaper, chat completions (they use
a temporary cache) and metrics bookkeeping. What does not: per-session operations
(`_session.py`), batching (`_batcher.py`), transports.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import torch

from tether.cloud._acceptance import sample_token
from tether.contract import Capabilities, ChatMessage, ChatResult, SamplingParams, SessionInfo
from tether.cloud._batcher import Batcher
from tether.cloud._config import CloudConfig
from tether.contract import (
    InvalidRequest,
    ServerOverloaded,
    SessionLimitExceeded,
    UnsupportedOperation,
)
from tether.cloud._metrics import Metrics
from tether.cloud._session import CloudSession
from tether.runtime import CausalLM, LayerwiseLM
from tether.text import IncrementalDetokenizer

log = logging.getLogger("tether.cloud.manager")

# The client (its key fingerprint) whose request is running: set once per connection by the
# server, inherited by each request's task, so sessions are charged to the right client.
current_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("tether_current_client", default=None)


def kv_bytes_per_token(model: CausalLM) -> int:
    """Bytes of KV cache one position costs across all layers (keys and values).

    Uses the model's own `kv_bytes_per_token` if it has one, else the Hugging Face config
    behind a `TorchCausalLM` (kv heads x head dim x dtype size), else an upper bound that
    assumes no grouped-query attention and fp32.
    """
    own = getattr(model, "kv_bytes_per_token", None)
    if isinstance(own, int) and own > 0:
        return own
    info = model.info
    hf = getattr(model, "_hf_model", None)
    config = getattr(hf, "config", None)
    if config is not None:
        heads = int(getattr(config, "num_key_value_heads", 0) or getattr(config, "num_attention_heads", 0))
        head_dim = int(getattr(config, "head_dim", 0) or (info.hidden_size // max(1, config.num_attention_heads)))
        dtype = getattr(model, "dtype", torch.float32)
        size = torch.empty((), dtype=dtype).element_size()
        if heads and head_dim:
            return 2 * info.num_layers * heads * head_dim * size
    return 2 * info.num_layers * info.hidden_size * 4


class SessionManager:
    """Owns the model's sessions, its batcher and the server-wide limits.

    Args:
        model: the cloud model (a `LayerwiseLM` also enables split computing).
        tokenizer: a Hugging Face tokenizer with a chat template; enables `chat`.
        config: limits and batching settings.
        metrics: Prometheus metrics (a fresh set by default).
        model_name: the name clients may ask for in `open` (default: ``model.info.name``);
            `aliases` adds others (e.g. the registry name and the directory name).

    Use as ``async with SessionManager(...) as m: s = m.session(); await s.open()``.
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        tokenizer: Any = None,
        config: CloudConfig | None = None,
        metrics: Metrics | None = None,
        model_name: str | None = None,
        aliases: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or CloudConfig()
        self.metrics = metrics or Metrics()
        self.model_name = model_name or model.info.name
        self._names = {self.model_name, model.info.name, *aliases}
        cfg = self.config
        self.batcher = Batcher(model, batching=cfg.batching, window_s=cfg.batch_window_s,
                               window_frac=cfg.batch_window_frac, max_batch=cfg.max_batch,
                               max_batch_tokens=cfg.max_batch_tokens, metrics=self.metrics,
                               expected=self._active_sessions)
        self.max_tokens = min(cfg.max_tokens, model.info.max_positions)
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        # Each client key's share of the KV budget (CloudConfig.kv_budget_per_client_bytes):
        # by default a quarter of the total, but never too small for one full-length session.
        share = cfg.kv_budget_per_client_bytes
        if share is None:
            one_session = self._capacity(self.max_tokens) * self.kv_bytes_per_token
            share = min(cfg.kv_budget_bytes, max(cfg.kv_budget_bytes // 4, one_session))
        self.kv_budget_per_client = share
        self._sessions: collections.OrderedDict[str, CloudSession] = collections.OrderedDict()
        self._owners: dict[str, str] = {}  # session id -> client that opened it (when known)
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        chat = tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None
        self.capabilities = Capabilities(
            verify=True, sampling_verify=True, score=True, generate=True,
            hidden=isinstance(model, LayerwiseLM), chat=chat, json_mode=chat, rollback=True,
            max_draft=cfg.max_draft, max_top_k=cfg.max_top_k,
        )

    def _active_sessions(self) -> int:
        """Sessions likely to send a forward soon: busy now, or active within the last second."""
        now = time.monotonic()
        return sum(1 for s in self._sessions.values() if s.busy or now - s.last_used < 1.0)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> SessionManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the idle-timeout reaper (idempotent)."""
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="tether-reaper")

    async def drain(self, timeout: float) -> bool:
        """Wait until no session has a request queued or running; False on timeout."""
        deadline = time.monotonic() + timeout
        while any(s.busy for s in list(self._sessions.values())):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def aclose(self) -> None:
        """Evict every session (reason "shutdown") and stop the model worker."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except asyncio.CancelledError:
                pass
            self._reaper = None
        await self.batcher.aclose()
        for s in list(self._sessions.values()):
            s.evict("shutdown")

    async def _reap(self) -> None:
        timeout = self.config.idle_timeout_s
        period = min(max(timeout / 4, 0.01), 1.0)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for s in list(self._sessions.values()):
                if not s.busy and now - s.last_used > timeout:
                    s.evict("idle")

    # -- sessions -------------------------------------------------------------------------

    def session(self) -> CloudSession:
        """A new, unopened session bound to this manager."""
        return CloudSession(self)

    def sessions_of(self, owner: str) -> int:
        """Open sessions charged to `owner`."""
        return sum(1 for sid in self._sessions if self._owners.get(sid) == owner)

    async def open_session(self, *, sampling: SamplingParams = SamplingParams(), model: str | None = None) -> CloudSession:
        """Create and open a session in one call."""
        s = self.session()
        await s.open(sampling=sampling, model=model)
        return s

    def get(self, session_id: str) -> CloudSession | None:
        return self._sessions.get(session_id)

    @property
    def sessions(self) -> tuple[CloudSession, ...]:
        """Open sessions, least recently used first."""
        return tuple(self._sessions.values())

    def check_model_name(self, name: str | None) -> None:
        if name is not None and name not in self._names:
            raise InvalidRequest(f"this server serves model {self.model_name!r}, not {name!r}")

    def register(self, s: CloudSession) -> None:
        if self._closed:
            raise ServerOverloaded("the server is shutting down")
        if len(self._sessions) >= self.config.max_sessions:
            raise ServerOverloaded(f"the server holds its maximum of {self.config.max_sessions} sessions")
        # Charged to the client whose request opens it (None in-process: no per-client cap).
        owner = current_client.get()
        limit = self.config.max_sessions_per_client
        if owner is not None and self.sessions_of(owner) >= limit:
            raise SessionLimitExceeded(
                f"this client already holds its maximum of {limit} open sessions; close one first",
                limit_name="max_sessions_per_client", value=limit + 1, limit=limit,
            )
        if owner is not None:
            self._owners[s.id] = owner
        self._sessions[s.id] = s
        self.metrics.sessions_open.set(len(self._sessions))
        log.info("session opened", extra={"session_id": s.id})

    def unregister(self, s: CloudSession, *, evicted: str | None = None) -> None:
        self._owners.pop(s.id, None)
        if self._sessions.pop(s.id, None) is None:
            return
        self.metrics.sessions_open.set(len(self._sessions))
        self.metrics.kv_bytes.set(self.kv_bytes())
        if evicted is not None:
            self.metrics.sessions_evicted.labels(reason=evicted).inc()
        else:
            log.info("session closed", extra={"session_id": s.id})

    def touch(self, s: CloudSession) -> None:
        if s.id in self._sessions:
            self._sessions.move_to_end(s.id)

    def session_info(self, session_id: str, *, max_tokens: int | None = None) -> SessionInfo:
        info = self.model.info
        return SessionInfo(session_id=session_id, model=self.model_name, vocab_size=info.vocab_size,
                           num_layers=info.num_layers, hidden_size=info.hidden_size,
                           eos_token_ids=tuple(info.eos_token_ids), max_tokens=max_tokens or self.max_tokens,
                           capabilities=self.capabilities)

    # -- KV memory budget -----------------------------------------------------------------

    @staticmethod
    def _capacity(tokens: int) -> int:
        """Positions a cache holding `tokens` has allocated: the torch backend allocates at
        least 256 and doubles (conservative for other backends)."""
        if tokens <= 0:
            return 0
        cap = 256
        while cap < tokens:
            cap *= 2
        return cap

    def _session_bytes(self, s: CloudSession, tokens: int | None = None, chat: int | None = None,
                       fraction: float | None = None) -> int:
        t = s.kv_tokens if tokens is None else tokens
        t = self._capacity(max(t, s.kv_peak)) if s.kv_peak or t else 0
        c = self._capacity(s.chat_tokens if chat is None else chat)
        f = s.kv_fraction if fraction is None else fraction
        return int((t * f + c) * self.kv_bytes_per_token)

    def kv_bytes(self) -> int:
        """Estimated bytes allocated (or about to be) by all sessions' caches."""
        return sum(self._session_bytes(s) for s in self._sessions.values())

    def reserve_kv(self, s: CloudSession, tokens: int | None = None, *, chat_tokens: int | None = None,
                   layer_fraction: float | None = None) -> None:
        """Make room for `s` to hold `tokens` positions (and `chat_tokens` in a chat cache).

        First the client's share (`kv_budget_per_client`): a client over it evicts
        its own least recently used idle sessions, never another client's. Then the total
        budget: the victim is the least recently used idle session of the client holding the
        most KV (in-process sessions, which have no client key, count as one client).

        Raises:
            SessionLimitExceeded: this session alone would exceed the budget or its client's
                share, or the client's other sessions hold its share and are busy.
            ServerOverloaded: the budget is held by sessions that are busy right now.
        """
        budget = self.config.kv_budget_bytes
        mine = self._session_bytes(s, tokens, chat_tokens, layer_fraction)
        if mine > budget:
            raise SessionLimitExceeded(
                f"session {s.id} would need {mine} bytes of KV cache (kv_budget_bytes={budget})",
                limit_name="kv_budget_bytes", value=mine, limit=budget,
            )
        owner = self._owners.get(s.id)
        if owner is not None:
            self._reserve_client_share(s, owner, mine)
        while mine + sum(self._session_bytes(o) for o in self._sessions.values() if o is not s) > budget:
            held: dict[str | None, int] = {self._owners.get(s.id): mine}
            for o in self._sessions.values():
                if o is not s:
                    key = self._owners.get(o.id)
                    held[key] = held.get(key, 0) + self._session_bytes(o)
            idle = [o for o in self._sessions.values() if o is not s and not o.busy]  # least recently used first
            if not idle:
                raise ServerOverloaded("the KV memory budget is held by busy sessions; retry shortly")
            victim = max(idle, key=lambda o: held[self._owners.get(o.id)])  # max keeps the first (LRU) of ties
            victim.evict("memory")
        if tokens is not None:
            s.kv_tokens = tokens
            s.kv_peak = max(s.kv_peak, tokens)
        if chat_tokens is not None:
            s.chat_tokens = chat_tokens
        if layer_fraction is not None:
            s.kv_fraction = layer_fraction
        self.metrics.kv_bytes.set(self.kv_bytes())

    def _reserve_client_share(self, s: CloudSession, owner: str, mine: int) -> None:
        """Evict `owner`'s own least recently used idle sessions until `s` fits its share."""
        share = self.kv_budget_per_client
        if mine > share:
            raise SessionLimitExceeded(
                f"session {s.id} would need {mine} bytes of KV cache, more than this client's share "
                f"(kv_budget_per_client_bytes={share})",
                limit_name="kv_budget_per_client_bytes", value=mine, limit=share,
            )
        while True:
            own = [o for o in self._sessions.values() if o is not s and self._owners.get(o.id) == owner]
            held = mine + sum(self._session_bytes(o) for o in own)
            if held <= share:
                return
            victim = next((o for o in own if not o.busy), None)  # least recently used first
            if victim is None:
                raise SessionLimitExceeded(
                    f"this client's busy sessions hold its KV share (kv_budget_per_client_bytes={share}); "
                    "close a session or retry when a request finishes",
                    limit_name="kv_budget_per_client_bytes", value=held, limit=share,
                )
            victim.evict("memory")

    # -- bookkeeping ------------------------------------------------------------------------

    def count(self, op: str, outcome: str, seconds: float | None = None) -> None:
        self.metrics.requests.labels(op=op, outcome=outcome).inc()
        if seconds is not None and outcome == "ok":
            self.metrics.request_latency.labels(op=op).observe(seconds)

    def tokens(self, *, verified: int, accepted: int, committed: int) -> None:
        m = self.metrics
        if verified:
            m.tokens_verified.inc(verified)
        if accepted:
            m.tokens_accepted.inc(accepted)
        if committed:
            m.tokens_committed.inc(committed)

    # -- chat -----------------------------------------------------------------------------

    def chat_prompt_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The chat template applied to `messages`, with the assistant turn opened."""
        tok = self.tokenizer
        if tok is None or getattr(tok, "chat_template", None) is None:
            raise UnsupportedOperation("this server has no tokenizer with a chat template; chat is unavailable")
        convo = [{"role": m.role, "content": m.content} for m in messages]
        out = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=True)
        if isinstance(out, Mapping) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        ids = list(out)
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(t) for t in ids]

    async def chat(
        self,
        s: CloudSession,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        json_mode: bool,
        generator: torch.Generator,
        top_p: float = 1.0,
        top_k: int = 0,
    ) -> ChatResult:
        """Chat completion on a temporary cache, charged to session `s`'s memory."""
        result: ChatResult | None = None
        async for _, final in self.chat_stream(s, messages, max_tokens=max_tokens, temperature=temperature,
                                               top_p=top_p, top_k=top_k, json_mode=json_mode,
                                               generator=generator):
            result = final if final is not None else result
        assert result is not None
        return result

    async def chat_stream(
        self,
        s: CloudSession,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        json_mode: bool,
        generator: torch.Generator,
        top_p: float = 1.0,
        top_k: int = 0,
    ) -> AsyncIterator[tuple[str, ChatResult | None]]:
        """Stream a chat completion: ``(text delta, None)`` as tokens complete whole characters
        (the incremental detokenizer: no re-decoding of the reply), then ``("", result)``
        whose text is the deltas joined."""
        if not 0 < max_tokens <= self.config.max_chat_tokens:
            raise SessionLimitExceeded(
                f"max_tokens={max_tokens} is outside [1, {self.config.max_chat_tokens}] (max_chat_tokens)",
                limit_name="max_chat_tokens", value=max_tokens, limit=self.config.max_chat_tokens,
            )
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        prompt = self.chat_prompt_ids(messages)
        if len(prompt) >= self.max_tokens:
            raise SessionLimitExceeded(
                f"chat prompt of {len(prompt)} tokens leaves no room under max_tokens={self.max_tokens}",
                limit_name="max_tokens", value=len(prompt) + 1, limit=self.max_tokens,
            )
        # The reply stops at the context limit (finish_reason "length") rather than being refused.
        max_tokens = min(max_tokens, self.max_tokens - len(prompt))
        stops = set(self.model.info.eos_token_ids)
        eos_tok = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(eos_tok, int):
            stops.add(eos_tok)
        constraint = None
        if json_mode:
            from tether.jsonmode import JsonConstraint

            constraint = JsonConstraint(self.tokenizer, self.model.info.vocab_size)
        state = self.model.new_state()
        compute = 0.0
        out: list[int] = []
        detok = IncrementalDetokenizer(self.tokenizer)  # text per token without re-decoding the reply
        pieces: list[str] = []
        finish: Any = "length"
        try:
            feed = prompt
            chunk = self.config.prefill_chunk
            while True:
                logits = None
                for pos in range(0, len(feed), chunk):
                    part = feed[pos:pos + chunk]
                    self.reserve_kv(s, chat_tokens=state.length + len(part))
                    res = await self.batcher.extend(state, part)
                    compute += res.compute_s
                    logits = res.logits[-1]
                assert logits is not None
                if constraint is not None:
                    token = constraint.choose(logits, sampling, generator, eos_ids=stops,
                                              remaining=max_tokens - len(out))
                else:
                    token = sample_token(logits, sampling, generator)
                if token in stops:
                    finish = "stop"
                    break
                out.append(token)
                piece = detok.push(token)  # "" while a character is incomplete
                if piece:
                    pieces.append(piece)
                    yield piece, None
                if constraint is not None and constraint.complete:
                    finish = "stop"
                    break
                if len(out) >= max_tokens:
                    break
                feed = [token]
        finally:
            self.model.release(state)
            s.chat_tokens = 0
        tail = detok.flush()
        if tail:
            pieces.append(tail)
            yield tail, None
        # The result's text is exactly what was streamed.
        text = "".join(pieces)
        yield "", ChatResult(text=text, prompt_tokens=len(prompt), completion_tokens=len(out), finish_reason=finish,
                             compute_s=compute)
