"""Choosing the split layer k: a Neurosurgeon-style cost model over measured times.

What belongs here: `PartitionProfile` (what was measured: edge and cloud seconds per layer,
round trip, bandwidth), the per-token cost of each candidate k, the choice, and the
report; plus the measuring itself (`measure_edge` on the device, `probe_cloud` over the
link). What does not: running a generation (`_split.py`).

Neurosurgeon (Kang et al., ASPLOS 2017) picks the layer that minimises edge time + upload
time + cloud time from per-layer measurements. For one decoded token at split layer k
(0 < k < L) with early-exit rate e(k):

    edge(k)     = edge_fixed + k * edge_layer + exit_head
    cloud(k)    = cloud_fixed + (L - k) * cloud_layer
    per_token   = edge(k) + row_bytes / up_bw
                  + (1 - e(k)) * (rtt + (overhead_bytes / up_bw) + cloud(k))

Every position's hidden row crosses the link (an exited one with the next message), so
bandwidth is paid per token; the round trip and the cloud step only when the cloud
answers. Positions caught up lazily ride in the next request, whose cloud pass over a few
rows costs about what one row costs on a memory-bound decoder (not modelled).

A decoder stack is uniform, so without early exit the cost is linear in k and the best k
is an end of the allowed range: the first layer when the cloud is faster per layer, the
last the device holds when it is not. Early exit (e(k) rising with depth) and the
operator's bounds (memory on the device, how many layers must stay local) are what make
an interior k worth it. Reference rows: k = 0 (cloud mode, token ids cross) and k = L
(the device alone).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from tether.errors import ConfigurationError
from tether.runtime import LayerwiseLM

__all__ = ["PartitionCost", "PartitionProfile", "PartitionReport", "choose_partition", "measure_edge", "probe_cloud"]

_REPLY_BYTES = 64  # a HiddenResult without top-k, framed and encrypted, roughly
_OVERHEAD_BYTES = 128  # a ContinueHidden's header, metadata, descriptor and AEAD tag, roughly


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionProfile:
    """Measured costs the partition is chosen from (seconds, bytes per second).

    Attributes:
        num_layers: L, the model's decoder layers.
        hidden_size: H.
        edge_layer_s: edge seconds per decoder layer for one token.
        edge_fixed_s: edge seconds per token outside the layers (embedding, bookkeeping).
        edge_exit_s: edge seconds per token for the early-exit head (0 without early exit).
        edge_head_s: edge seconds for the full final norm + LM head (for the k = L reference).
        cloud_layer_s: cloud seconds per decoder layer for one token.
        cloud_fixed_s: cloud seconds per request outside the layers (LM head, sampling).
        rtt_s: network round trip.
        up_bytes_per_s, down_bytes_per_s: link bandwidth each way (None: not a limit).
        measured: what was measured rather than given or assumed, for the report.
    """

    num_layers: int
    hidden_size: int
    edge_layer_s: float
    edge_fixed_s: float = 0.0
    edge_exit_s: float = 0.0
    edge_head_s: float = 0.0
    cloud_layer_s: float
    cloud_fixed_s: float = 0.0
    rtt_s: float
    up_bytes_per_s: float | None = None
    down_bytes_per_s: float | None = None
    measured: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_layers < 2 or self.hidden_size < 1:
            raise ConfigurationError("a split needs a model of at least 2 layers")
        for name in ("edge_layer_s", "edge_fixed_s", "edge_exit_s", "edge_head_s", "cloud_layer_s",
                     "cloud_fixed_s", "rtt_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"PartitionProfile.{name} must be a finite number >= 0, got {value!r}")
        for name in ("up_bytes_per_s", "down_bytes_per_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigurationError(f"PartitionProfile.{name} must be > 0 or None, got {value!r}")

    def transfer_s(self, nbytes: float, *, up: bool = True) -> float:
        bw = self.up_bytes_per_s if up else self.down_bytes_per_s
        return 0.0 if bw is None else nbytes / bw


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionCost:
    """The modelled cost of one decoded token at split layer `layer` (0: cloud mode, L: edge alone)."""

    layer: int
    edge_s: float
    transfer_s: float
    rtt_s: float
    cloud_s: float
    exit_rate: float
    per_token_s: float

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.per_token_s if self.per_token_s > 0 else math.inf


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionReport:
    """The chosen split layer and why.

    Attributes:
        layer: the chosen k.
        compression: the codec the bytes were counted for.
        row_bytes: wire bytes of one hidden row in that codec.
        costs: the modelled cost of every candidate k, in order.
        cloud_only: the k = 0 reference (token ids cross; the cloud runs every layer).
        edge_only: the k = L reference (no link), or None if the device holds fewer layers.
        profile: the measurements.
        prefill_transfer_s: modelled upload time of the prompt's hidden rows (+ one round trip).
        reason: one sentence for logs and stats.
    """

    layer: int
    compression: str
    row_bytes: int
    costs: tuple[PartitionCost, ...]
    cloud_only: PartitionCost
    edge_only: PartitionCost | None
    profile: PartitionProfile
    prefill_transfer_s: float
    reason: str

    def cost(self, layer: int) -> PartitionCost:
        for c in self.costs:
            if c.layer == layer:
                return c
        raise KeyError(layer)

    def table(self) -> str:
        """A plain-text table of the candidates (the chosen one marked)."""
        lines = ["  k   edge ms  link ms   rtt ms  cloud ms  exit   ms/token  tok/s"]
        rows = [self.cloud_only, *self.costs] + ([self.edge_only] if self.edge_only else [])
        for c in rows:
            mark = "*" if c.layer == self.layer else " "
            lines.append(
                f"{mark}{c.layer:>3} {c.edge_s * 1e3:>8.1f} {c.transfer_s * 1e3:>8.2f} {c.rtt_s * 1e3:>8.1f} "
                f"{c.cloud_s * 1e3:>9.1f} {c.exit_rate:>5.0%} {c.per_token_s * 1e3:>10.1f} {c.tokens_per_s:>6.2f}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tokens_per_s"] = self.cost(self.layer).tokens_per_s
        return out


def choose_partition(
    profile: PartitionProfile,
    *,
    row_bytes: int,
    compression: str = "",
    candidates: Sequence[int] | None = None,
    exit_rates: Mapping[int, float] | None = None,
    prompt_tokens: int = 0,
    edge_layers: int | None = None,
) -> PartitionReport:
    """Pick the k with the least modelled time per decoded token.

    Args:
        profile: the measurements.
        row_bytes: wire bytes of one hidden row in the chosen compression.
        compression: its name (for the report).
        candidates: the allowed k (default 1 .. L-1); ties go to the smaller k (fewer
            layers on the device).
        exit_rates: expected early-exit rate per k (missing: 0).
        prompt_tokens: for the prefill upload estimate in the report.
        edge_layers: layers the device holds (for the k = L reference; default L).

    Raises:
        ConfigurationError: no candidate inside [1, L-1].
    """
    big_l = profile.num_layers
    allowed = sorted({int(k) for k in (candidates if candidates is not None else range(1, big_l))})
    allowed = [k for k in allowed if 0 < k < big_l]
    if not allowed:
        raise ConfigurationError(f"no split layer to choose from inside [1, {big_l - 1}]")
    rates = dict(exit_rates or {})
    overhead = profile.transfer_s(_OVERHEAD_BYTES) + profile.transfer_s(_REPLY_BYTES, up=False)

    def cost(k: int) -> PartitionCost:
        e = min(1.0, max(0.0, float(rates.get(k, 0.0))))
        edge = profile.edge_fixed_s + k * profile.edge_layer_s + profile.edge_exit_s
        cloud = profile.cloud_fixed_s + (big_l - k) * profile.cloud_layer_s
        transfer = profile.transfer_s(row_bytes) + (1 - e) * overhead
        total = edge + transfer + (1 - e) * (profile.rtt_s + cloud)
        return PartitionCost(layer=k, edge_s=edge, transfer_s=transfer, rtt_s=(1 - e) * profile.rtt_s,
                             cloud_s=(1 - e) * cloud, exit_rate=e, per_token_s=total)

    costs = tuple(cost(k) for k in allowed)
    best = min(costs, key=lambda c: (round(c.per_token_s, 9), c.layer))
    cloud_total = profile.cloud_fixed_s + big_l * profile.cloud_layer_s
    ids_transfer = profile.transfer_s(4 + _OVERHEAD_BYTES) + profile.transfer_s(_REPLY_BYTES, up=False)
    cloud_only = PartitionCost(layer=0, edge_s=0.0, transfer_s=ids_transfer, rtt_s=profile.rtt_s,
                               cloud_s=cloud_total, exit_rate=0.0,
                               per_token_s=ids_transfer + profile.rtt_s + cloud_total)
    edge_only = None
    if (edge_layers or big_l) >= big_l:
        t = profile.edge_fixed_s + big_l * profile.edge_layer_s + profile.edge_head_s
        edge_only = PartitionCost(layer=big_l, edge_s=t, transfer_s=0.0, rtt_s=0.0, cloud_s=0.0, exit_rate=0.0,
                                  per_token_s=t)
    why = (f"k={best.layer} of {big_l}: {best.per_token_s * 1e3:.1f} ms/token modelled "
           f"(edge {best.edge_s * 1e3:.1f} + link {best.transfer_s * 1e3:.2f} + rtt {best.rtt_s * 1e3:.1f} "
           f"+ cloud {best.cloud_s * 1e3:.1f}) over k in [{allowed[0]}, {allowed[-1]}]")
    slope = profile.edge_layer_s - profile.cloud_layer_s
    if not rates:
        why += ("; cloud layers are faster, so fewer edge layers win" if slope > 0 else
                "; edge layers are as fast as the cloud's, so more edge layers win")
    if cloud_only.per_token_s < best.per_token_s:
        why += f"; cloud mode would model {cloud_only.per_token_s * 1e3:.1f} ms/token (token ids cross the link)"
    return PartitionReport(
        layer=best.layer, compression=compression, row_bytes=row_bytes, costs=costs, cloud_only=cloud_only,
        edge_only=edge_only, profile=profile,
        prefill_transfer_s=profile.transfer_s(prompt_tokens * row_bytes) + profile.rtt_s, reason=why,
    )


# -- measuring ---------------------------------------------------------------------------------


def measure_edge(
    runtime: LayerwiseLM, *, layers: int, exit_fn: Callable[[torch.Tensor], object] | None = None,
    context: int = 32, repeats: int = 3,
) -> dict[str, float]:
    """Time one decoded token through `layers` edge layers (min of `repeats`), on this thread.

    Returns ``edge_layer_s``, ``edge_fixed_s``, ``edge_exit_s`` and ``edge_head_s``. The
    scratch state is released afterwards.
    """
    vocab = runtime.info.vocab_size
    ids = [int(i) % vocab for i in range(100, 100 + context)]
    state = runtime.new_state()
    best_layers = best_embed = best_exit = best_head = math.inf
    try:
        runtime.run_layers(state, runtime.embed(ids), 0, layers)
        for r in range(repeats):
            t0 = time.perf_counter()
            h = runtime.embed([ids[r % context]])
            t1 = time.perf_counter()
            h = runtime.run_layers(state, h, 0, layers)
            t2 = time.perf_counter()
            best_embed, best_layers = min(best_embed, t1 - t0), min(best_layers, t2 - t1)
            if exit_fn is not None:
                exit_fn(h[-1])
                best_exit = min(best_exit, time.perf_counter() - t2)
            t3 = time.perf_counter()
            runtime.head(h[-1:])
            best_head = min(best_head, time.perf_counter() - t3)
    finally:
        runtime.release(state)
    return {
        "edge_layer_s": best_layers / max(1, layers),
        "edge_fixed_s": best_embed,
        "edge_exit_s": 0.0 if exit_fn is None else best_exit,
        "edge_head_s": best_head,
    }


@dataclass(slots=True)
class _Timing:
    wall_s: float
    compute_s: float
    queue_s: float


@dataclass(slots=True)
class CloudProbe:
    """What `probe_cloud` measured."""

    cloud_layer_s: float
    cloud_fixed_s: float
    rtt_s: float
    up_bytes_per_s: float | None
    samples: dict[str, list[float]] = field(default_factory=dict)


async def probe_cloud(
    send: Callable[[int, np.ndarray], Awaitable[_Timing | tuple[float, float, float]]],
    *, num_layers: int, hidden_size: int, low: int = 1, high: int | None = None, big_rows: int = 64,
    repeats: int = 2, seed: int = 0,
) -> CloudProbe:
    """Measure the cloud's seconds per layer, the round trip and the upload bandwidth.

    Args:
        send: ``send(layer, rows)`` sends float32 rows ([n, H]) as a continue_hidden request
            on a probe session for that layer (one session per layer; rows accumulate)
            and returns (wall, compute, queue) seconds.
        num_layers, hidden_size: the model's L and H.
        low, high: the two split layers probed (default 1 and L-1); the difference of
            their one-row times over the layers between them is the per-layer time.
        big_rows: rows of the bandwidth probe (float32; 64 x 1536 is 384 KiB).
        repeats: one-row requests per layer (the minimum counts).
    """
    high = num_layers - 1 if high is None else high
    if not 0 < low < high < num_layers:
        raise ConfigurationError(f"probe layers must satisfy 0 < {low} < {high} < {num_layers}")
    rng = np.random.default_rng(seed)

    def rows(n: int) -> np.ndarray:
        return rng.standard_normal((n, hidden_size)).astype(np.float32)

    async def timed(layer: int, n: int) -> _Timing:
        out = await send(layer, rows(n))
        return out if isinstance(out, _Timing) else _Timing(*out)

    samples: dict[str, list[float]] = {}
    one: dict[int, _Timing] = {}
    for layer in (low, high):
        await timed(layer, 4)  # warm the session (and its cache) up
        runs = [await timed(layer, 1) for _ in range(repeats)]
        samples[f"wall_{layer}"] = [r.wall_s for r in runs]
        one[layer] = min(runs, key=lambda r: r.wall_s)
    lo, hi = one[low], one[high]
    have_compute = lo.compute_s > 0 and hi.compute_s > 0
    # With the cloud's own compute times, the network is what is left of the wall time;
    # without them (a backend that does not report), the wall times carry both.
    a, b = (lo.compute_s, hi.compute_s) if have_compute else (lo.wall_s, hi.wall_s)
    layer_s = max(0.0, (a - b) / (high - low))
    fixed = max(0.0, b - (num_layers - high) * layer_s)
    rtt = max(0.0, min(lo.wall_s - lo.compute_s - lo.queue_s, hi.wall_s - hi.compute_s - hi.queue_s))
    if not have_compute:
        rtt, fixed = fixed, 0.0  # the wall time's constant part: the round trip and the cloud's fixed cost
    big = await timed(high, big_rows)
    samples["wall_big"] = [big.wall_s]
    extra = big.wall_s - big.compute_s - big.queue_s - (hi.wall_s - hi.compute_s - hi.queue_s)
    if not have_compute:
        extra = big.wall_s - hi.wall_s
    nbytes = (big_rows - 1) * hidden_size * 4
    bandwidth = nbytes / extra if extra > 0.002 else None  # under 2 ms: not a limit worth modelling
    return CloudProbe(cloud_layer_s=layer_s, cloud_fixed_s=fixed, rtt_s=rtt, up_bytes_per_s=bandwidth,
                      samples=samples)
