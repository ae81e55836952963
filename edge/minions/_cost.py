"""What a Minion or MinionS session cost: tokens per round, the whole-document baseline, money.

What belongs here: plain counters and the arithmetic on them, and the price-table hook.
What does not: measuring (the protocol drivers fill the counters in).

Cloud tokens are what the remote model reports for each chat call (prompt + completion).
The baseline is the cloud prompt that sending the whole document with the task would take,
counted with the edge tokenizer (exact for the default pair, which shares one vocabulary;
an estimate for another remote model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tether.errors import ConfigurationError


@runtime_checkable
class Pricing(Protocol):
    """Turns token counts into money (any currency); `PriceTable` is the simple one."""

    def cloud_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The price of one cloud call's tokens."""
        ...

    def edge_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The price of edge tokens (energy, say); 0 if the device is free."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceTable:
    """Prices per million tokens, like a provider's price list.

    Attributes:
        prompt_per_million: price of a million cloud prompt (input) tokens.
        completion_per_million: price of a million cloud completion (output) tokens.
        edge_per_million: price of a million edge tokens (prompt and completion alike).
    """

    prompt_per_million: float
    completion_per_million: float
    edge_per_million: float = 0.0

    def __post_init__(self) -> None:
        for name in ("prompt_per_million", "completion_per_million", "edge_per_million"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigurationError(f"PriceTable.{name} must be a number >= 0, got {value!r}")

    def cloud_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_per_million + completion_tokens * self.completion_per_million) / 1e6

    def edge_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens + completion_tokens) * self.edge_per_million / 1e6


@dataclass(slots=True)
class RoundCost:
    """Counters of one round.

    Attributes:
        cloud_calls: chat calls to the remote model (re-asks included).
        cloud_prompt_tokens, cloud_completion_tokens: as the remote model reported them.
        edge_calls: replies the edge model generated.
        edge_prompt_tokens: tokens of those prompts (what the edge model read).
        edge_prefilled_tokens: prompt tokens actually computed (the rest came from cache).
        edge_completion_tokens: tokens the edge model generated.
        edge_s: wall seconds of edge work; cloud_s: wall seconds waiting for the cloud.
    """

    cloud_calls: int = 0
    cloud_prompt_tokens: int = 0
    cloud_completion_tokens: int = 0
    edge_calls: int = 0
    edge_prompt_tokens: int = 0
    edge_prefilled_tokens: int = 0
    edge_completion_tokens: int = 0
    edge_s: float = 0.0
    cloud_s: float = 0.0

    @property
    def cloud_tokens(self) -> int:
        return self.cloud_prompt_tokens + self.cloud_completion_tokens

    def to_dict(self) -> dict[str, float | int]:
        return {name: getattr(self, name) for name in self.__slots__} | {"cloud_tokens": self.cloud_tokens}


@dataclass(slots=True)
class CostReport:
    """The cost of one `ask`: per-round counters, totals, and the whole-document baseline.

    Attributes:
        rounds: one `RoundCost` per round, in order (the final answer's call is in the last).
        whole_document_tokens: cloud prompt tokens that sending every document with the
            task would have taken (no completion counted).
        pricing: the price hook used by `cloud_money` and friends (None: no prices).
    """

    rounds: list[RoundCost] = field(default_factory=list)
    whole_document_tokens: int = 0
    pricing: Pricing | None = None

    def _sum(self, name: str) -> int:
        return sum(int(getattr(r, name)) for r in self.rounds)

    @property
    def cloud_prompt_tokens(self) -> int:
        return self._sum("cloud_prompt_tokens")

    @property
    def cloud_completion_tokens(self) -> int:
        return self._sum("cloud_completion_tokens")

    @property
    def cloud_tokens(self) -> int:
        """All cloud tokens, prompt and completion, over every round."""
        return self.cloud_prompt_tokens + self.cloud_completion_tokens

    @property
    def cloud_calls(self) -> int:
        return self._sum("cloud_calls")

    @property
    def edge_prompt_tokens(self) -> int:
        return self._sum("edge_prompt_tokens")

    @property
    def edge_completion_tokens(self) -> int:
        return self._sum("edge_completion_tokens")

    @property
    def edge_calls(self) -> int:
        return self._sum("edge_calls")

    @property
    def reduction(self) -> float | None:
        """``whole_document_tokens / cloud_tokens``: how many times fewer cloud tokens were spent."""
        return self.whole_document_tokens / self.cloud_tokens if self.cloud_tokens else None

    def _money(self, rounds: Sequence[RoundCost]) -> float | None:
        if self.pricing is None:
            return None
        return sum(self.pricing.cloud_cost(r.cloud_prompt_tokens, r.cloud_completion_tokens) for r in rounds)

    @property
    def cloud_money(self) -> float | None:
        """What the cloud tokens cost under `pricing` (None without prices)."""
        return self._money(self.rounds)

    @property
    def edge_money(self) -> float | None:
        if self.pricing is None:
            return None
        return sum(self.pricing.edge_cost(r.edge_prompt_tokens, r.edge_completion_tokens) for r in self.rounds)

    @property
    def whole_document_money(self) -> float | None:
        """What sending the whole document's prompt would cost (None without prices)."""
        return None if self.pricing is None else self.pricing.cloud_cost(self.whole_document_tokens, 0)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready totals, per-round counters and (with prices) money."""
        return {
            "cloud_calls": self.cloud_calls,
            "cloud_prompt_tokens": self.cloud_prompt_tokens,
            "cloud_completion_tokens": self.cloud_completion_tokens,
            "cloud_tokens": self.cloud_tokens,
            "edge_calls": self.edge_calls,
            "edge_prompt_tokens": self.edge_prompt_tokens,
            "edge_completion_tokens": self.edge_completion_tokens,
            "whole_document_tokens": self.whole_document_tokens,
            "reduction": None if self.reduction is None else round(self.reduction, 2),
            "cloud_money": self.cloud_money,
            "edge_money": self.edge_money,
            "whole_document_money": self.whole_document_money,
            "rounds": [r.to_dict() for r in self.rounds],
        }
