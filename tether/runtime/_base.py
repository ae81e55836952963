"""The model runtime interface: a causal LM whose KV cache the caller controls exactly.

What belongs here: the abstract contract every backend (torch, onnxruntime) fulfils.
What does not: sampling, acceptance rules, networking — those live in the modes.

Conventions
- Token ids are plain Python ints (or a 1-D int sequence); logits are CPU float32
  `torch.Tensor`s of shape [n_new, vocab_size], one row per position passed in,
  row i being the distribution of the token *after* input position i.
- A `KVState` is one sequence's cache. It belongs to the model that created it;
  states are never shared between threads without the caller's own locking.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """Static facts about a loaded model that strategies need."""

    name: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    eos_token_ids: tuple[int, ...]
    max_positions: int


class KVState(abc.ABC):
    """One sequence's key/value cache, owned by the model that created it."""

    @property
    @abc.abstractmethod
    def length(self) -> int:
        """Number of positions currently held in the cache."""


class CausalLM(abc.ABC):
    """A decoder-only LM with an explicit, per-sequence KV cache.

    Every mode (routing, speculative drafting, split computing, Minions) drives a
    model only through this interface, on the edge and in the cloud alike.
    """

    info: ModelInfo

    @abc.abstractmethod
    def new_state(self) -> KVState:
        """Return an empty cache for a new sequence."""

    @abc.abstractmethod
    def extend(self, state: KVState, token_ids: Sequence[int]) -> torch.Tensor:
        """Append `token_ids` to the sequence and return logits for every new position.

        Returns a [len(token_ids), vocab_size] float32 tensor. One forward pass, so a
        block of k draft tokens is scored at once. Raises `RuntimeStateError` if the
        state is released, belongs to another model, or would exceed `max_positions`.
        """

    def prefill(self, state: KVState, token_ids: Sequence[int]) -> torch.Tensor:
        """Fill an empty state with a prompt; same result as `extend` on an empty state."""
        if state.length != 0:
            from tether.errors import RuntimeStateError

            raise RuntimeStateError(
                f"prefill needs an empty state, this one holds {state.length} positions; "
                "use extend() to append or truncate(0) first"
            )
        return self.extend(state, token_ids)

    @abc.abstractmethod
    def truncate(self, state: KVState, length: int) -> None:
        """Roll the cache back to its first `length` positions (after rejected drafts)."""

    @abc.abstractmethod
    def fork(self, state: KVState) -> KVState:
        """Return an independent copy of `state`; later changes to either do not affect the other."""

    @abc.abstractmethod
    def release(self, state: KVState) -> None:
        """Free the memory held by `state`; using it afterwards raises `RuntimeStateError`."""

    def extend_batch(
        self, states: Sequence[KVState], token_ids: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Extend several sequences (of any lengths) at once; one logits tensor per sequence.

        Backends override this with a real batched forward pass; the result must
        equal calling `extend` on each sequence in turn (within float tolerance).
        """
        return [self.extend(s, ids) for s, ids in zip(states, token_ids, strict=True)]


class LayerwiseLM(CausalLM):
    """A `CausalLM` that can also run a range of its layers (for split computing).

    A state used with `run_layers` keeps a cache only for the layers it has run;
    the edge holds layers [0, k) and the cloud [k, L) of the same model.
    """

    @abc.abstractmethod
    def embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Token embeddings, shape [n, hidden_size]."""

    @abc.abstractmethod
    def run_layers(
        self, state: KVState, hidden: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        """Run decoder layers [start, stop) on `hidden` ([n, hidden_size]) for the next n positions.

        Positions continue from what `state` holds for layer `start`; the new keys and
        values are appended to `state` for layers [start, stop). Returns [n, hidden_size].
        """

    @abc.abstractmethod
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [n, hidden_size] -> [n, vocab_size] float32 logits."""
