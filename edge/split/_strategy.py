"""``split`` mode: the device runs the first k layers of the cloud's model, the cloud the rest.

What belongs here: `SplitOptions`, `SplitStats` and `SplitStrategy`, the strategy the
decoding loop drives in split mode. What does not: the device's model half
(`_split_model.py`), compression (`_hidden_codec.py`), early-exit heads (`_exit_head.py`),
the choice of k (`_partition.py`).

One token's way (positions are counted over prompt + output):

1. The device runs the newly committed token through embeddings + layers [0, k) with its
   own KV cache, producing the hidden row of the new position (the prompt: all its rows
   in one pass).
2. Early exit (if enabled): the exit head scores that row; at confidence >= threshold the
   device commits the token itself and keeps the row *unsent*.
3. Otherwise the device sends every unsent row — the lazy catch-up of exited positions
   and the new one — in ONE `continue_hidden` request (compressed); the cloud runs layers
   [k, L) for all of them with its own cache, samples after the last, and answers with the
   token. No token id ever leaves the device: only hidden states.

While the cloud is unreachable the edge's own model continues (tokens tagged edge-only);
when a fresh session is back, every row is sent again, so the new session's cache holds
the whole sequence.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from tether.contract import HiddenResult
from tether.edge.split._exit_head import ConfirmedExit, EarlyExit, ExitHead, ModelHeadExit, load_exit
from tether.edge.split._hidden_codec import HiddenCodec, get_codec
from tether.edge.split._partition import PartitionProfile, PartitionReport, choose_partition, measure_edge, probe_cloud
from tether.edge._remote import CloudLink, LinkDown, now
from tether.edge.split._model import SplitModel, SplitModelSource
from tether.edge._stats import GenerationStats
from tether.edge._strategies import Committed, EdgeFallback
from tether.edge._types import Origin
from tether.errors import ConfigurationError
from tether.runtime import KVState

log = logging.getLogger("tether.edge.split")

__all__ = ["SplitOptions", "SplitStats", "SplitStrategy"]

_MiB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitOptions:
    """How split mode runs.

    Attributes:
        split_layer: k, the layers [0, k) the device runs (1 <= k < L and k <= the layers
            the device holds), or ``"auto"``: measure the device, the cloud and the link
            once per client and pick k with the cost model of `choose_partition` (with a
            trained exit head, its layer).
        compression: how hidden rows travel: ``"fp32"`` (exact), ``"fp16"``, ``"bf16"``,
            ``"int8"`` (per-row absmax, ~1/4 of fp32), ``"int8-deflate"`` (the same values,
            losslessly DEFLATE-compressed: smaller still, size depends on the data) or
            ``"int4"`` (groups of 32, ~0.14).
        exit_threshold: early exit: the device answers a position itself when the exit's
            top probability is at least this (in (0, 1]); None disables early exit.
        exit_head: the early exit: None for the model's own final norm + LM head at layer
            k, or a trained `ExitHead` (or its file, from ``tether split train-exit``).
        exit_confirm: with an `exit_head`, exit only where the model's own head proposes
            the same token too, at the lower confidence (`ConfirmedExit`): fewer wrong exits,
            for both heads' cost on the device.
        min_layers, max_layers: bounds on k for ``"auto"`` (e.g. keep at least a few
            layers on the device; limit memory).
        bandwidth_bytes_per_s: the uplink's bandwidth for ``"auto"`` (None: measure it).
        profile: use these measurements for ``"auto"`` instead of measuring.
        max_message_bytes: hidden rows per request are capped to this size (a long prompt
            goes in several requests).
        top_k: top-k log-probabilities the cloud returns with each token (0: none).
    """

    split_layer: int | Literal["auto"] = "auto"
    compression: str = "int8"
    exit_threshold: float | None = None
    exit_head: ExitHead | str | os.PathLike[str] | None = None
    exit_confirm: bool = False
    min_layers: int = 1
    max_layers: int | None = None
    bandwidth_bytes_per_s: float | None = None
    profile: PartitionProfile | None = None
    max_message_bytes: int = 4 * _MiB
    top_k: int = 0

    def __post_init__(self) -> None:
        k = self.split_layer
        if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigurationError(f"split_layer must be an int >= 1 or 'auto', got {k!r}")
        get_codec(self.compression)
        t = self.exit_threshold
        if t is not None and not (isinstance(t, (int, float)) and 0.0 < t <= 1.0):
            raise ConfigurationError(f"exit_threshold must be in (0, 1] or None, got {t!r}")
        if self.exit_confirm and self.exit_head is None:
            raise ConfigurationError("exit_confirm needs an exit_head to confirm (the model's own head is the check)")
        if self.min_layers < 1:
            raise ConfigurationError(f"min_layers must be >= 1, got {self.min_layers}")
        if self.max_layers is not None and self.max_layers < self.min_layers:
            raise ConfigurationError(f"max_layers ({self.max_layers}) is below min_layers ({self.min_layers})")
        if self.bandwidth_bytes_per_s is not None and not self.bandwidth_bytes_per_s > 0:
            raise ConfigurationError("bandwidth_bytes_per_s must be > 0 or None")
        if self.max_message_bytes < 64 * 1024:
            raise ConfigurationError(f"max_message_bytes must be >= 65536, got {self.max_message_bytes}")
        if self.top_k < 0:
            raise ConfigurationError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(slots=True)
class SplitStats(GenerationStats):
    """`GenerationStats` plus what split mode did.

    Attributes:
        split_layer: k.
        compression: the codec of the hidden rows.
        exit_threshold: the early-exit threshold (None: off).
        exit_kind: ``"model-head"`` or ``"trained"`` (None: off).
        hidden_rows_sent: hidden rows sent (prompt, tokens, catch-up, re-sends).
        hidden_bytes_sent: wire bytes of those rows (tensor data: values and scales).
        prompt_rows, prompt_bytes: the part of the above that was the prompt.
        messages: hidden-state requests sent.
        early_exits: output tokens the device answered itself.
        catch_up_rows: rows of exited positions sent later with a request.
        resent_rows: rows sent again to a fresh session after a reconnect.
        partition: the auto-partition report (``"auto"`` only).
    """

    split_layer: int | None = None
    compression: str = ""
    exit_threshold: float | None = None
    exit_kind: str | None = None
    hidden_rows_sent: int = 0
    hidden_bytes_sent: int = 0
    prompt_rows: int = 0
    prompt_bytes: int = 0
    messages: int = 0
    early_exits: int = 0
    catch_up_rows: int = 0
    resent_rows: int = 0
    partition: dict[str, Any] | None = None

    @property
    def exit_rate(self) -> float | None:
        """Share of output tokens answered by early exit."""
        n = self.completion_tokens
        return self.early_exits / n if n else None

    @property
    def decode_bytes_per_token(self) -> float | None:
        """Hidden-state bytes sent per output token, the prompt excluded."""
        n = self.completion_tokens
        return (self.hidden_bytes_sent - self.prompt_bytes) / n if n else None

    def to_dict(self) -> dict[str, object]:
        out = GenerationStats.to_dict(self)
        out["split"] = {
            "split_layer": self.split_layer, "compression": self.compression,
            "exit_threshold": self.exit_threshold, "exit_kind": self.exit_kind,
            "hidden_rows_sent": self.hidden_rows_sent, "hidden_bytes_sent": self.hidden_bytes_sent,
            "prompt_rows": self.prompt_rows, "prompt_bytes": self.prompt_bytes, "messages": self.messages,
            "early_exits": self.early_exits, "exit_rate": self.exit_rate, "catch_up_rows": self.catch_up_rows,
            "resent_rows": self.resent_rows, "decode_bytes_per_token": self.decode_bytes_per_token,
            "partition": self.partition,
        }
        return out


class _Rows:
    """The hidden rows of every position so far ([n, H], grown by doubling), for sends and re-sends."""

    def __init__(self, hidden_size: int, dtype: torch.dtype) -> None:
        self.buf = torch.empty(0, hidden_size, dtype=dtype)
        self.n = 0

    def append(self, rows: torch.Tensor) -> None:
        need = self.n + rows.shape[0]
        if need > self.buf.shape[0]:
            grown = torch.empty(max(need, 2 * self.buf.shape[0], 64), self.buf.shape[1], dtype=self.buf.dtype)
            grown[: self.n].copy_(self.buf[: self.n])
            self.buf = grown
        self.buf[self.n : need].copy_(rows)
        self.n = need

    def view(self, start: int, stop: int) -> torch.Tensor:
        return self.buf[start:stop]


class SplitStrategy:
    """``split`` mode (see the module docstring); built by `EdgeClient` from `SplitOptions`.

    Args:
        source: where the device's half of the model comes from.
        link: the generation's cloud session (opened without token ids).
        fallback: edge-only decoding while the cloud is unreachable.
        options: split settings.
        stats: the generation's `SplitStats`.
        temperature, top_k, top_p: sampling of early-exit tokens (the cloud samples its
            own tokens with the session's params).
        generator: the device's random generator (early exits when sampling).
    """

    def __init__(
        self, *, source: SplitModelSource, link: CloudLink, fallback: EdgeFallback, options: SplitOptions,
        stats: SplitStats, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.source, self.link, self.fallback, self.options, self.stats = source, link, fallback, options, stats
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = generator
        self.codec: HiddenCodec = get_codec(options.compression)
        self.model: SplitModel | None = None
        self.exit: EarlyExit | None = None
        self.layer = 0
        self.ids: list[int] = []  # prompt + committed output
        self._state: KVState | None = None
        self._rows: _Rows | None = None
        self._ran = 0  # committed tokens run through the device's layers (= rows held)
        self._sent = 0  # rows the current cloud session holds
        self._exited = 0  # rows held back by early exit, not yet sent
        self._session: object | None = None
        self._prompt_len = 0

    # -- setting up -----------------------------------------------------------------------

    async def start(self, prompt_ids: Sequence[int]) -> None:
        if not prompt_ids:
            raise ConfigurationError("split mode needs a non-empty prompt")
        self.ids = [int(t) for t in prompt_ids]
        self._prompt_len = len(self.ids)
        model = self.model = await self.source.get()
        stats, opts = self.stats, self.options
        if opts.exit_threshold is not None:
            self.exit = await model.run(load_exit, opts.exit_head, model.runtime)
            if opts.exit_confirm:
                self.exit = ConfirmedExit(self.exit, ModelHeadExit(model.runtime))
            kinds = {ModelHeadExit: "model-head", ExitHead: "trained", ConfirmedExit: "confirmed"}
            stats.exit_kind = kinds.get(type(self.exit), "custom")
        # The session opens first (a prompt longer than its max_tokens raises
        # ContextLengthExceeded before the device runs a layer), and only ever sees hidden states.
        up = await self.link.open(len(self.ids)) and await self.link.start(())
        if up:
            self._check_cloud()
        self.layer = await self._choose_layer(up)
        stats.split_layer, stats.compression = self.layer, self.codec.name
        stats.exit_threshold = opts.exit_threshold
        self._state = await model.run(model.runtime.new_state)
        self._rows = _Rows(model.hidden_size, torch.float32)

    def _check_cloud(self) -> None:
        info, model = self.link.info, self.model
        assert info is not None and model is not None
        if not info.capabilities.hidden:
            raise ConfigurationError(f"the cloud ({info.model}) does not offer split computing")
        # A remote cloud may not announce its shape (0): then the name is all there is to compare.
        known = info.hidden_size > 0 and info.num_layers > 0
        if known and (info.hidden_size, info.num_layers) != (model.hidden_size, model.num_layers):
            raise ConfigurationError(
                f"the device's split model ({model.name}: {model.num_layers} layers of {model.hidden_size}) "
                f"is not the cloud's ({info.model}: {info.num_layers} layers of {info.hidden_size}); "
                "split mode needs the same model on both sides"
            )
        if info.model != model.name:
            log.warning("split model %r and cloud model %r have different names; assuming the same weights",
                        model.name, info.model)

    async def _choose_layer(self, cloud_up: bool) -> int:
        model, opts = self.model, self.options
        assert model is not None
        big_l, held = model.num_layers, model.layers_held
        head_layer = getattr(self.exit, "layer", None)
        k = opts.split_layer
        if k != "auto":
            if not 0 < k < big_l:
                raise ConfigurationError(f"split_layer must be in [1, {big_l - 1}] for {model.name}, got {k}")
            if k > held:
                raise ConfigurationError(f"split_layer {k} is past the {held} layers the device holds")
            if head_layer is not None and head_layer != k:
                raise ConfigurationError(f"the exit head was trained for layer {head_layer}, not {k}")
            return k
        if head_layer is not None:
            if not 0 < head_layer <= min(held, big_l - 1):
                raise ConfigurationError(f"the exit head's layer {head_layer} is not usable with {model}")
            self.stats.partition = {"layer": head_layer, "reason": "the exit head was trained for this layer"}
            return int(head_layer)
        lo, hi = opts.min_layers, min(held, big_l - 1, opts.max_layers or big_l)
        if lo > hi:
            raise ConfigurationError(f"no split layer in [{lo}, {hi}] (the device holds {held} of {big_l})")
        profile = opts.profile
        if profile is None:
            # Measured once per cloud connector and kind of exit (its cost is part of the profile).
            per_cloud = model.profiles.setdefault(self.link.connector, {})
            key = self.stats.exit_kind
            profile = per_cloud.get(key)
            if profile is None and not cloud_up:
                self.stats.partition = {"layer": lo, "reason": "cloud unreachable: nothing measured, fewest layers"}
                return lo
            if profile is None:
                profile = await self._measure()
                per_cloud[key] = profile
        if opts.bandwidth_bytes_per_s is not None:
            profile = dataclasses.replace(profile, up_bytes_per_s=opts.bandwidth_bytes_per_s)
        report: PartitionReport = choose_partition(
            profile, row_bytes=self.codec.nbytes(1, model.hidden_size), compression=self.codec.name,
            candidates=range(lo, hi + 1), prompt_tokens=len(self.ids), edge_layers=held,
        )
        self.stats.partition = report.to_dict()
        log.info("split layer chosen: %s\n%s", report.reason, report.table())
        return report.layer

    async def _measure(self) -> PartitionProfile:
        """Time the device's layers and probe the cloud (two short sessions); see `_partition`."""
        model = self.model
        assert model is not None
        exit_fn = None
        if self.exit is not None:
            ex = self.exit

            def exit_fn(h: torch.Tensor) -> object:
                return ex.propose(h, temperature=0.0, top_k=0, top_p=1.0, generator=None)

        edge = await model.run(measure_edge, model.runtime, layers=min(model.layers_held, 4), exit_fn=exit_fn)
        sessions: dict[int, Any] = {}
        connector, timeout = self.link.connector, self.link.options.request_timeout

        async def send(layer: int, rows: np.ndarray) -> tuple[float, float, float]:
            import asyncio

            if layer not in sessions:
                s = await connector.new_session()
                await asyncio.wait_for(s.open(), timeout)
                sessions[layer] = s
            t0 = now()
            r = await asyncio.wait_for(sessions[layer].continue_hidden(rows, layer=layer), timeout)
            return now() - t0, r.compute_s, r.queue_s

        try:
            probe = await probe_cloud(send, num_layers=model.num_layers, hidden_size=model.hidden_size)
        finally:
            for s in sessions.values():
                try:
                    await s.close()
                except Exception:  # noqa: BLE001 - best effort: the probe sessions are throwaway
                    pass
        return PartitionProfile(
            num_layers=model.num_layers, hidden_size=model.hidden_size, edge_layer_s=edge["edge_layer_s"],
            edge_fixed_s=edge["edge_fixed_s"], edge_exit_s=edge["edge_exit_s"], edge_head_s=edge["edge_head_s"],
            cloud_layer_s=probe.cloud_layer_s, cloud_fixed_s=probe.cloud_fixed_s, rtt_s=probe.rtt_s,
            up_bytes_per_s=probe.up_bytes_per_s,
            measured=("edge_layer_s", "edge_fixed_s", "edge_exit_s", "edge_head_s", "cloud_layer_s",
                      "cloud_fixed_s", "rtt_s") + (("up_bytes_per_s",) if probe.up_bytes_per_s else ()),
        )

    # -- the device's compute (runs on the split model's thread) -----------------------------

    def _advance(self) -> tuple[float, int]:
        """Run committed tokens not yet run through layers [0, k); returns (seconds, rows added)."""
        model, rows, state = self.model, self._rows, self._state
        assert model is not None and rows is not None and state is not None
        todo = self.ids[self._ran :]
        t0 = now()
        for start in range(0, len(todo), 256):  # a long prompt in chunks, like the cloud's prefill
            part = todo[start : start + 256]
            hidden = model.runtime.run_layers(state, model.runtime.embed(part), 0, self.layer)  # [n, H]
            rows.append(hidden.float())
        self._ran += len(todo)
        return now() - t0, len(todo)

    def _try_exit(self) -> tuple[int | None, float]:
        """The early-exit token for the last position, if confident enough; and the seconds spent."""
        assert self.exit is not None and self._rows is not None and self.options.exit_threshold is not None
        t0 = now()
        proposal = self.exit.propose(self._rows.view(self._ran - 1, self._ran), temperature=self.temperature,
                                     top_k=self.top_k, top_p=self.top_p, generator=self.generator)
        token = proposal.token if proposal.confidence >= self.options.exit_threshold else None
        return token, now() - t0

    # -- one step -------------------------------------------------------------------------

    async def step(self, budget: int) -> list[Committed]:
        model = self.model
        assert model is not None
        room = self.link.room(len(self.ids))
        if room is not None and room <= 0:
            return []  # the cloud session holds max_tokens positions: the generation ends with "length"
        seconds, added = await model.run(self._advance)
        if added:
            self.stats.record_edge(forward_passes=1, compute_s=seconds)
        if not self.link.up and not await self.link.resume():
            return await self._fallback()
        if self.link.session is not self._session:  # a fresh session holds nothing yet
            if self._session is not None:
                self.stats.resent_rows += self._sent
            self._session, self._sent, self._exited = self.link.session, 0, 0
        if self.exit is not None:
            token, seconds = await model.run(self._try_exit)
            self.stats.edge_compute_s += seconds
            if token is not None:
                self._exited += 1
                self.stats.early_exits += 1
                return self._commit(token, Origin.EDGE_EXIT)
        try:
            result = await self._send()
        except LinkDown:
            return await self._fallback()
        self.stats.rounds += 1
        return self._commit(result.next_token, Origin.CLOUD_GENERATED)

    def _commit(self, token: int, origin: Origin) -> list[Committed]:
        self.ids.append(int(token))
        return [Committed(int(token), origin)]

    async def _send(self) -> HiddenResult:
        """Send every unsent row in as few requests as the size cap allows; the last reply counts."""
        model, rows, stats = self.model, self._rows, self.stats
        assert model is not None and rows is not None
        per_row = max(1, self.codec.nbytes(1, model.hidden_size))
        cap = max(1, self.options.max_message_bytes // per_row)
        result: HiddenResult | None = None
        catch_up = self._exited
        while self._sent < rows.n:
            start, stop = self._sent, min(rows.n, self._sent + cap)
            tensor = await model.run(self.codec.encode, rows.view(start, stop))
            layer, top_k = self.layer, self.options.top_k
            t0 = now()
            result = await self.link.call(lambda s: s.continue_hidden(tensor, layer=layer, top_k=top_k))
            self.link.record_timing(now() - t0, result.compute_s, result.queue_s, result.forward_passes)
            n, nbytes = stop - start, tensor.nbytes
            stats.messages += 1
            stats.hidden_rows_sent += n
            stats.hidden_bytes_sent += nbytes
            prompt_part = max(0, min(stop, self._prompt_len) - start)
            stats.prompt_rows += prompt_part
            stats.prompt_bytes += nbytes * prompt_part // n
            self._sent = stop
        assert result is not None, "a step always has the newest row unsent"
        stats.catch_up_rows += catch_up
        self._exited = 0
        return result

    async def _fallback(self) -> list[Committed]:
        out = await self.fallback.step(self.ids)
        self.ids.extend(c.token_id for c in out)
        return out

    async def close(self) -> None:
        try:
            await self.link.close()
        finally:
            model, state = self.model, self._state
            self._state = None
            if model is not None and state is not None:
                await model.run(model.runtime.release, state)
            if self.fallback.started:
                await self.fallback.edge.run(self.fallback.drafter.release)

