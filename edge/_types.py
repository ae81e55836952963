"""Values the edge SDK hands to applications: token origins, streamed tokens, results.

What belongs here: small frozen value types with no behaviour beyond validation.
What does not: anything that runs a model or touches the network.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from tether.edge._stats import GenerationStats


class Origin(str, enum.Enum):
    """Where a committed token came from.

    - ``EDGE_ACCEPTED``: drafted by the edge and accepted by the cloud's verification.
    - ``CLOUD_CORRECTED``: the cloud's token in place of a rejected draft token.
    - ``CLOUD_GENERATED``: produced by the cloud with no draft to check (cloud mode, and
      the bonus token after a fully accepted draft).
    - ``EDGE_ONLY``: produced by the edge with no cloud check (edge mode, or speculative /
      cloud mode while the cloud was unreachable).
    - ``EDGE_ROUTED``: produced by the edge because a router judged it good enough
      (route-query / route-token modes); the cloud did not check it.
    - ``EDGE_EXIT``: produced on the device by early exit at the split layer (split mode):
      the exit head was confident enough; the cloud did not choose it.
    """

    EDGE_ACCEPTED = "edge-accepted"
    CLOUD_CORRECTED = "cloud-corrected"
    CLOUD_GENERATED = "cloud-generated"
    EDGE_ONLY = "edge-only"
    EDGE_ROUTED = "edge-routed"
    EDGE_EXIT = "edge-exit"


Mode = Literal["edge", "cloud", "speculative", "route-query", "route-token", "split"]
"""The generation modes; each is declared by its entry in `tether.edge.MODE_REGISTRY`."""

FinishReason = Literal["stop", "length"]
"""``"stop"``: an end-of-sequence token or a stop string; ``"length"``: `max_new_tokens` reached."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamToken:
    """One committed token as `stream` yields it.

    Attributes:
        token_id: the token.
        text: the text this token adds to the output. Usually its own text; "" while a
            multi-byte character is incomplete (the next token carries it).
        origin: where it came from.
        index: its position in the generated output (0-based).
    """

    token_id: int
    text: str
    origin: Origin
    index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationResult:
    """A finished generation.

    Attributes:
        text: the generated text (without the stop string or end-of-sequence token).
        token_ids: the generated token ids (without the end-of-sequence token; a stop
            string's tokens are included, so `text` may be shorter than their decoding).
        origins: the origin of each token in `token_ids`.
        finish_reason: ``"stop"`` or ``"length"``.
        stats: measurements of this generation.
    """

    text: str
    token_ids: tuple[int, ...]
    origins: tuple[Origin, ...]
    finish_reason: FinishReason
    stats: GenerationStats

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form: text, token_ids, origins, finish_reason and stats."""
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "origins": [o.value for o in self.origins],
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }
