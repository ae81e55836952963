"""Per-generation measurements, collected in one object that the loop passes around.

What belongs here: the counters and their derived figures (acceptance, tokens/s).
What does not: the code that measures (strategies call the `record_*` methods).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from tether.edge._types import Origin


@dataclass(slots=True)
class GenerationStats:
    """What one generation did and cost. Times are seconds; counts are tokens unless named.

    Attributes:
        mode: the mode that ran.
        prompt_tokens: tokens in the templated prompt.
        tokens_by_origin: committed output tokens per `Origin` value.
        rounds: verify round trips (speculative) or cloud requests (cloud mode).
        drafted_tokens: draft tokens sent to the cloud for verification.
        accepted_tokens: draft tokens the cloud accepted.
        draft_lengths: the draft length of each verify round, in order.
        prefetched_tokens: tokens drafted ahead while a verify was in flight.
        prefetch_hits: rounds whose next draft was already drafted ahead when the verify
            came back (pipelining hid the draft time).
        cloud_forward_passes: cloud model forward passes spent on this generation.
        cloud_compute_s: cloud compute seconds reported by the cloud for those passes.
        cloud_queue_s: seconds requests waited on the cloud for a batch slot.
        edge_forward_passes: edge model forward passes.
        edge_compute_s: seconds the edge model spent computing.
        bytes_up: bytes sent to the cloud (as counted by the transport or link emulator;
            0 for an in-process cloud without emulation).
        bytes_down: bytes received from the cloud.
        rtt_samples: measured network round trips (request wall time minus cloud
            compute and queueing), one per cloud request.
        wall_s: wall time of the generation, prompt to last token.
        ttft_s: time to the first output token.
        degraded: True if any output token was produced edge-only because the cloud was
            unreachable (speculative / cloud modes).
        reconnects: successful reconnections to the cloud during this generation.
        link_failures: cloud requests that failed or timed out.
        overload_retries: cloud requests retried because the server refused them as
            overloaded (rate limit or full server).
    """

    mode: str = ""
    prompt_tokens: int = 0
    tokens_by_origin: dict[str, int] = field(default_factory=lambda: {o.value: 0 for o in Origin})
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    draft_lengths: list[int] = field(default_factory=list)
    prefetched_tokens: int = 0
    prefetch_hits: int = 0
    cloud_forward_passes: int = 0
    cloud_compute_s: float = 0.0
    cloud_queue_s: float = 0.0
    edge_forward_passes: int = 0
    edge_compute_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    rtt_samples: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    ttft_s: float | None = None
    degraded: bool = False
    reconnects: int = 0
    link_failures: int = 0
    overload_retries: int = 0

    # -- recording ------------------------------------------------------------------

    def record_token(self, origin: Origin) -> None:
        self.tokens_by_origin[origin.value] += 1
        if origin is Origin.EDGE_ONLY and self.mode != "edge":
            self.degraded = True

    def record_round(self, *, drafted: int, accepted: int) -> None:
        self.rounds += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.draft_lengths.append(drafted)

    def record_cloud(self, *, forward_passes: int, compute_s: float, queue_s: float = 0.0) -> None:
        self.cloud_forward_passes += forward_passes
        self.cloud_compute_s += compute_s
        self.cloud_queue_s += queue_s

    def record_edge(self, *, forward_passes: int, compute_s: float) -> None:
        self.edge_forward_passes += forward_passes
        self.edge_compute_s += compute_s

    # -- derived --------------------------------------------------------------------

    @property
    def completion_tokens(self) -> int:
        """Output tokens committed, all origins."""
        return sum(self.tokens_by_origin.values())

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens; None if nothing was drafted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Draft tokens accepted per verify round; None before the first round."""
        return self.accepted_tokens / self.rounds if self.rounds else None

    @property
    def cloud_share(self) -> float | None:
        """Fraction of output tokens chosen by the cloud (corrections and generated)."""
        n = self.completion_tokens
        if not n:
            return None
        cloud = self.tokens_by_origin[Origin.CLOUD_CORRECTED.value]
        cloud += self.tokens_by_origin[Origin.CLOUD_GENERATED.value]
        return cloud / n

    @property
    def rtt_s(self) -> float | None:
        """Median measured network round trip; None if no cloud request was made."""
        return statistics.median(self.rtt_samples) if self.rtt_samples else None

    @property
    def tokens_per_s(self) -> float | None:
        """Output tokens per wall second."""
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else None

    @property
    def cloud_passes_per_token(self) -> float | None:
        """Cloud forward passes per output token."""
        n = self.completion_tokens
        return self.cloud_forward_passes / n if n else None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form: every counter plus the derived figures."""
        return {
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_by_origin": dict(self.tokens_by_origin),
            "rounds": self.rounds,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "draft_lengths": list(self.draft_lengths),
            "prefetched_tokens": self.prefetched_tokens,
            "prefetch_hits": self.prefetch_hits,
            "cloud_forward_passes": self.cloud_forward_passes,
            "cloud_passes_per_token": self.cloud_passes_per_token,
            "cloud_compute_s": self.cloud_compute_s,
            "cloud_queue_s": self.cloud_queue_s,
            "cloud_share": self.cloud_share,
            "edge_forward_passes": self.edge_forward_passes,
            "edge_compute_s": self.edge_compute_s,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "rtt_s": self.rtt_s,
            "wall_s": self.wall_s,
            "ttft_s": self.ttft_s,
            "tokens_per_s": self.tokens_per_s,
            "degraded": self.degraded,
            "reconnects": self.reconnects,
            "link_failures": self.link_failures,
            "overload_retries": self.overload_retries,
        }
