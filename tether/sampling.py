"""Logits -> probabilities, shared by the edge (draft q) and the cloud (target p).

What belongs here: the one implementation of temperature / top-k / top-p warping, seeded
sampling, and `SparseDist`, the exact sparse form of a draft distribution that travels
to the cloud with a speculative draft. What does not: acceptance rules (cloud), I/O.

Conventions (see docs/modes.md, glossary): p is the target (cloud) distribution, q the
draft (edge) distribution. `temperature == 0` means greedy: the warped distribution is a
one-hot vector at the argmax (ties broken towards the lowest token id, like `argmax`).
Warping order follows transformers' logits processors: temperature, then top-k, then
top-p (the smallest set of most likely tokens whose mass reaches `top_p`, at least one).

Losslessness of speculative sampling needs the cloud to know *exactly* the distribution
each draft token was drawn from. The edge therefore draws its drafts from the
`SparseDist` it sends (a truncated, renormalised copy of its warped distribution, kept in
float32 on both sides), never from the dense tensor it came from: q is exact by
construction, whatever the truncation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from tether.contract import validate_sampling

__all__ = [
    "SparseDist",
    "WarpSettings",
    "is_greedy",
    "make_generator",
    "sample",
    "sparsify",
    "validate_warp",
    "warp",
]

# Default bounds of a draft distribution's support: at most this many tokens, and
# tokens are added (most likely first) until the kept mass reaches 1 - this tail.
DEFAULT_MAX_SUPPORT = 64
DEFAULT_TAIL_MASS = 1e-4


class WarpSettings(Protocol):
    """Anything with the three warping fields (e.g. the cloud API's `SamplingParams`)."""

    @property
    def temperature(self) -> float: ...

    @property
    def top_k(self) -> int: ...

    @property
    def top_p(self) -> float: ...


def is_greedy(temperature: float) -> bool:
    """True when `temperature` selects greedy decoding (0 or below)."""
    return temperature <= 0.0


def validate_warp(*, temperature: float, top_k: int, top_p: float) -> None:
    """Check warping settings with the one rule the edge, the cloud and the wire share.

    Raises:
        InvalidSampling: a `ValueError` naming the setting (see `tether.contract.validate_sampling`).
    """
    validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p)


def warp(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Turn logits into the probabilities a token is drawn from.

    Args:
        logits: [vocab] or [n, vocab] float tensor; each row is warped independently.
        temperature: 0 for greedy (one-hot at the argmax), else the softmax temperature.
        top_k: keep only the k most likely tokens (0: no limit).
        top_p: keep the smallest most-likely set whose mass reaches top_p (1: no limit).
        dtype: the floating type to compute and return in (float32 on the edge; the
            cloud's acceptance rule uses float64).

    Returns:
        probabilities in `dtype` of the same shape; each row sums to 1 and is exactly 0
        outside the kept set.

    Raises:
        InvalidSampling: (a `ValueError`) a setting is out of range (see `validate_warp`).
    """
    validate_warp(temperature=temperature, top_k=top_k, top_p=top_p)
    squeeze = logits.dim() == 1
    rows = logits.unsqueeze(0) if squeeze else logits
    assert rows.dim() == 2, f"logits must be [vocab] or [n, vocab], got {tuple(logits.shape)}"
    rows = rows.to(dtype)
    vocab = rows.shape[-1]
    if is_greedy(temperature):
        out = torch.zeros_like(rows)
        out.scatter_(-1, rows.argmax(dim=-1, keepdim=True), 1.0)
        return out[0] if squeeze else out
    scaled = rows / temperature
    if 0 < top_k < vocab:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Mass strictly before each token; a token is kept while that mass is < top_p,
        # so the first token is always kept and the set just reaches top_p.
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs[0] if squeeze else probs


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed` (a random seed when None)."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Draw one token id from a [vocab] probability vector.

    One uniform draw inverted through the float64 cumulative sum, so a seeded draw is
    reproducible across machines and a one-hot vector always returns its token.
    """
    assert probs.dim() == 1, f"probs must be [vocab], got {tuple(probs.shape)}"
    cdf = torch.cumsum(probs.double(), dim=0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    idx = int(torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[0] - 1))
    # Never return a zero-probability token (u can land exactly on a flat step's edge).
    while float(probs[idx]) <= 0.0 and idx > 0:
        idx -= 1
    return idx


@dataclass(frozen=True, slots=True)
class SparseDist:
    """A probability distribution over a few token ids: the exact draft q of one position.

    `token_ids` ([m] int64, distinct) and `probs` ([m] float32, positive, summing to 1 up to
    float error) describe q completely: every other token has probability 0. Build one
    with `sparsify`; it validates on construction.
    """

    token_ids: torch.Tensor
    probs: torch.Tensor
    _lookup: dict[int, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids, probs = self.token_ids, self.probs
        if ids.dim() != 1 or probs.dim() != 1 or ids.shape != probs.shape or ids.numel() == 0:
            raise ValueError(
                f"SparseDist needs two equal-length non-empty 1-D tensors, got "
                f"{tuple(ids.shape)} and {tuple(probs.shape)}"
            )
        if ids.dtype != torch.int64 or probs.dtype != torch.float32:
            raise ValueError(f"SparseDist needs int64 ids and float32 probs, got {ids.dtype}, {probs.dtype}")
        if bool((probs <= 0).any()) or not bool(torch.isfinite(probs).all()):
            raise ValueError("SparseDist probabilities must be finite and > 0")
        total = float(probs.double().sum())
        if abs(total - 1.0) > 1e-4:
            raise ValueError(f"SparseDist probabilities must sum to 1, got {total:.6f}")
        lookup = dict(zip(ids.tolist(), probs.tolist(), strict=True))
        if len(lookup) != ids.numel():
            raise ValueError("SparseDist token ids must be distinct")
        object.__setattr__(self, "_lookup", lookup)

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    def prob(self, token_id: int) -> float:
        """q(token_id); 0.0 for a token outside the support."""
        return self._lookup.get(int(token_id), 0.0)

    def dense(self, vocab_size: int) -> torch.Tensor:
        """The same distribution as a [vocab_size] float32 vector."""
        out = torch.zeros(vocab_size, dtype=torch.float32)
        out[self.token_ids] = self.probs
        return out

    def sample(self, generator: torch.Generator | None = None) -> int:
        """Draw a token id from exactly this distribution."""
        return int(self.token_ids[sample(self.probs, generator)])

    @classmethod
    def point(cls, token_id: int) -> SparseDist:
        """All mass on one token (a greedy draft)."""
        return cls(torch.tensor([int(token_id)], dtype=torch.int64), torch.ones(1, dtype=torch.float32))


def sparsify(
    probs: torch.Tensor,
    *,
    max_support: int = DEFAULT_MAX_SUPPORT,
    tail_mass: float = DEFAULT_TAIL_MASS,
) -> SparseDist:
    """Keep the most likely tokens of a [vocab] distribution and renormalise.

    Tokens are kept in order of probability until their mass reaches `1 - tail_mass` or
    `max_support` tokens are kept; zero-probability tokens are never kept. The result is
    the distribution a draft token must then be drawn from (`SparseDist.sample`).
    """
    assert probs.dim() == 1, f"probs must be [vocab], got {tuple(probs.shape)}"
    if max_support < 1:
        raise ValueError(f"max_support must be >= 1, got {max_support}")
    k = min(max_support, int((probs > 0).sum()))
    k = max(k, 1)
    top = torch.topk(probs.float(), k)
    vals, ids = top.values, top.indices
    before = torch.cumsum(vals.double(), dim=0) - vals.double()
    keep = int((before < (1.0 - tail_mass)).sum().clamp(min=1))
    vals = vals[:keep]
    vals = (vals.double() / vals.double().sum()).float()
    positive = vals > 0
    return SparseDist(ids[:keep][positive].to(torch.int64), vals[positive].contiguous())
