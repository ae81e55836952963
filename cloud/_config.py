"""Server and session limits: one frozen dataclass, loadable from a TOML or JSON file.

What belongs here: every tunable of the cloud service with a safe default. What does not:
command-line parsing (see `tether/cli/_serve.py`) or the model choice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.errors import ConfigurationError


@dataclass(frozen=True, slots=True, kw_only=True)
class CloudConfig:
    """Limits and tuning of the cloud service.

    Attributes:
        max_sessions: sessions open at once across the server (`ServerOverloaded` beyond).
        max_sessions_per_client: sessions one client key may hold open at once, across all
            its connections (`SessionLimitExceeded`, ErrorReply LIMIT_EXCEEDED, beyond).
        max_connections: protocol connections open at once, handshakes included; more are
            closed before the handshake with 1013 TRY_AGAIN_LATER.
        max_connections_per_client: connections one client key may hold; more are refused
            after the client's Hello (its key proven), before the Welcome, with an encrypted
            Goodbye 4060 TOO_MANY_CONNECTIONS (`connect()` raises `TooManyConnections`).
        requests_per_second, burst: each client key's request rate (a token bucket over all
            its connections); a request over it gets ErrorReply(OVERLOADED, retryable)
            saying when to retry. See docs/reliability.md.
        max_tokens: committed tokens per session (prompt + output).
        max_pending: requests one session may have queued or running at once.
        max_draft: draft tokens per verify.
        max_top_k: alternatives per position in score results.
        max_chat_tokens: most tokens one chat completion may generate.
        idle_timeout_s: a session with no request for this long is evicted (reason "idle").
        kv_budget_bytes: memory for all sessions' KV caches; least recently used idle
            sessions are evicted (reason "memory") to stay under it.
        kv_budget_per_client_bytes: the share of `kv_budget_bytes` one client key's sessions
            may hold together. A client that fills its share evicts its own least recently
            used idle sessions, never another client's. None (default): a quarter of
            `kv_budget_bytes`, but at least what one session of `max_tokens` positions
            needs (and at most the total), so four clients can each fill their share before
            the total budget is reached; past it, the victim is the least recently used idle
            session of the client holding the most. In-process sessions (no client key) are
            not capped. The manager resolves the default (`SessionManager.kv_budget_per_client`).
        batching: run forward passes of different sessions together.
        batch_window_s: how long an idle worker waits for more requests after the first.
        batch_window_frac: ... or this fraction of the recent forward time, if longer (a
            model that takes a second per forward waits up to 50 ms for other active
            sessions rather than running a half-empty batch). Never waits once every
            recently active session has a request queued; a lone session never waits.
        max_batch: most sequences in one batched forward.
        max_batch_tokens: most new tokens in one batched forward (a long prefill runs alone).
        prefill_chunk: prompts are run in chunks of at most this many tokens, so other
            sessions' decode steps interleave with a long prefill.
        request_timeout_s: a request still waiting or running after this long fails.
        shutdown_grace_s: on SIGTERM, how long in-flight protocol requests may take to
            finish (OpenAI-compatible requests end at once; a stream with an error event).
        max_request_bytes: largest HTTP request body the OpenAI-compatible port reads
            (413 beyond, checked on the declared length and again while reading).
    """

    max_sessions: int = 64
    max_sessions_per_client: int = 16
    max_connections: int = 1024
    max_connections_per_client: int = 32
    requests_per_second: float = 500.0
    burst: int = 1000
    max_tokens: int = 4096
    max_pending: int = 4
    max_draft: int = 32
    max_top_k: int = 20
    max_chat_tokens: int = 1024
    idle_timeout_s: float = 600.0
    kv_budget_bytes: int = 4 * 1024**3
    kv_budget_per_client_bytes: int | None = None
    batching: bool = True
    batch_window_s: float = 0.003
    batch_window_frac: float = 0.05
    max_batch: int = 8
    max_batch_tokens: int = 512
    prefill_chunk: int = 256
    request_timeout_s: float = 300.0
    shutdown_grace_s: float = 30.0
    max_request_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or value is None:
                continue
            minimum = 0 if f.name in ("batch_window_s", "batch_window_frac") else 1e-9
            if not value >= minimum:
                raise ConfigurationError(f"cloud config: {f.name} must be > 0, got {value!r}")
        share = self.kv_budget_per_client_bytes
        if share is not None and share > self.kv_budget_bytes:
            raise ConfigurationError(f"cloud config: kv_budget_per_client_bytes ({share}) exceeds kv_budget_bytes "
                                     f"({self.kv_budget_bytes}); lower it or raise the total")

    def admission(self) -> Any:
        """The protocol-level limits of this config (`tether.protocol.AdmissionLimits`)."""
        from tether.protocol import AdmissionLimits

        return AdmissionLimits(max_connections=self.max_connections,
                               max_connections_per_client=self.max_connections_per_client,
                               requests_per_second=self.requests_per_second, burst=self.burst)

    def replace(self, **changes: Any) -> CloudConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_file(cls, path: str | Path) -> CloudConfig:
        """Load from a TOML (``.toml``) or JSON file holding any subset of the fields.

        A TOML file may keep them at top level or under a ``[cloud]`` table.

        Raises:
            ConfigurationError: unreadable file, unknown field or invalid value.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read config file {p}: {exc.strerror}") from exc
        try:
            if p.suffix == ".json":
                data = json.loads(text)
            else:
                import tomllib

                data = tomllib.loads(text)
        except ValueError as exc:
            raise ConfigurationError(f"config file {p} is not valid: {exc}") from exc
        if isinstance(data.get("cloud"), dict):
            data = data["cloud"]
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigurationError(f"config file {p}: unknown settings {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            default = getattr(cls(), name)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigurationError(f"config file {p}: {name} must be true or false")
            elif (isinstance(default, int) and not isinstance(default, bool)) or default is None:
                # (the optional fields are byte counts: integers when set)
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ConfigurationError(f"config file {p}: {name} must be an integer")
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigurationError(f"config file {p}: {name} must be a number")
            kwargs[name] = value
        return cls(**kwargs)
