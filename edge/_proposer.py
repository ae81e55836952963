"""The edge side of one generation: its token chain, KV cache and draft distributions.

What belongs here: `EdgeDrafter`, the edge's one decoding chain for every mode. It drafts
tokens with the runtime, keeps the exact sparse q of each speculative token, reconciles its
chain with what the cloud committed (rolling its cache back on rejection), and exposes the
next position's logits (and hidden state) that routers score. All methods are blocking and
run on the edge model's thread. What does not: choosing k, routing, talking to the cloud.

The chain: `ids` holds the committed tokens followed by speculative ones (drafted, not yet
verified). The KV cache holds a prefix of `ids`; the rest is pending and is run in the next
forward pass, so drafting after a correction costs no extra pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tether.errors import RuntimeStateError
from tether.runtime import CausalLM, KVState, forward_with_hidden
from tether.sampling import DEFAULT_MAX_SUPPORT, DEFAULT_TAIL_MASS, SparseDist, is_greedy, sample, sparsify, warp


@dataclass(frozen=True, slots=True, kw_only=True)
class DraftSettings:
    """How the edge warps and truncates its distribution.

    Attributes:
        temperature, top_k, top_p: the same warping as the cloud's (q then tracks p).
        max_support, tail_mass: truncation of each draft distribution (see `sparsify`).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_support: int = DEFAULT_MAX_SUPPORT
    tail_mass: float = DEFAULT_TAIL_MASS

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)


class EdgeDrafter:
    """Proposes draft tokens from the edge model and tracks the committed chain.

    Args:
        runtime: the edge model.
        settings: warping and truncation.
        generator: the edge's random generator (sampling only).
        want_hidden: also keep the last-layer hidden state of the chain's last position
            (`hidden`; token routers read it). Needs a `LayerwiseLM` runtime, else it stays None.
    """

    def __init__(
        self, runtime: CausalLM, settings: DraftSettings, generator: torch.Generator, *, want_hidden: bool = False
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.generator = generator
        self.want_hidden = want_hidden
        self.hidden: torch.Tensor | None = None  # [H] with the logits after ids[_cache_len - 1]
        self.ids: list[int] = []
        self.committed = 0
        self.dists: list[SparseDist | None] = []  # one per speculative token
        self.confidences: list[float] = []  # edge probability of each speculative token
        self._state: KVState | None = None
        self._cache_len = 0
        self._logits: torch.Tensor | None = None  # after ids[_cache_len - 1]
        self.forward_passes = 0
        self.compute_s = 0.0
        self.drafted_s = 0.0  # seconds spent drafting speculative tokens
        self.drafted_n = 0

    # -- chain views ----------------------------------------------------------------

    @property
    def speculative(self) -> list[int]:
        """Drafted tokens after the committed ones."""
        return self.ids[self.committed :]

    # -- model calls ----------------------------------------------------------------

    def start(self, prompt_ids: Sequence[int]) -> None:
        """Begin a sequence with `prompt_ids` (committed) and prefill them."""
        self.adopt(prompt_ids, self.runtime.new_state())
        self.next_logits()

    def adopt(self, token_ids: Sequence[int], state: KVState) -> None:
        """Begin a sequence with `token_ids` (committed) from a state that holds a prefix of them.

        The drafter owns `state` from now on; the tokens it does not hold yet run in the
        next forward pass (e.g. after route-query's probe, whose state lacks the last draft
        token).

        Raises:
            RuntimeStateError: `state` holds more positions than `token_ids` has tokens.
        """
        if state.length > len(token_ids):
            raise RuntimeStateError(
                f"the state holds {state.length} positions but only {len(token_ids)} tokens were given; "
                "pass every token the state holds, then those still to run"
            )
        if self._state is not None and self._state is not state:
            self.runtime.release(self._state)
        self._state = state
        self.ids = [int(t) for t in token_ids]
        self.committed = len(self.ids)
        self.dists, self.confidences = [], []
        self._cache_len = state.length
        self._logits = None
        self.hidden = None

    def next_logits(self) -> torch.Tensor:
        """[V] logits after the last token of the chain, running pending tokens if needed."""
        assert self._state is not None, "start() first"
        if self._cache_len < len(self.ids) or self._logits is None:
            if self._cache_len == len(self.ids):  # logits lost by a truncation: re-run one
                self.runtime.truncate(self._state, self._cache_len - 1)
                self._cache_len -= 1
            t0 = time.perf_counter()
            pending = self.ids[self._cache_len :]
            if self.want_hidden:
                logits, hidden = forward_with_hidden(self.runtime, self._state, pending)  # [n, V], [n, H] or None
                self.hidden = None if hidden is None else hidden[-1]
            else:
                logits = self.runtime.extend(self._state, pending)  # [n, V]
            self.compute_s += time.perf_counter() - t0
            self.forward_passes += 1
            self._cache_len = len(self.ids)
            self._logits = logits[-1]
        return self._logits

    def choose(self) -> tuple[int, SparseDist | None]:
        """The edge's token after the chain (not appended): the argmax when greedy, else a
        draw from its exact sparse q, returned with it."""
        return self._pick(self.next_logits())

    def _pick(self, logits: torch.Tensor) -> tuple[int, SparseDist | None]:
        if self.settings.greedy:
            return int(logits.argmax()), None
        probs = warp(logits, temperature=self.settings.temperature, top_k=self.settings.top_k,
                     top_p=self.settings.top_p)
        dist = sparsify(probs, max_support=self.settings.max_support, tail_mass=self.settings.tail_mass)
        return dist.sample(self.generator), dist

    def draft(self, n: int, *, cancel: threading.Event | None = None, min_confidence: float = 0.0) -> int:
        """Append up to `n` speculative tokens; returns how many were drafted.

        Stops early when `cancel` is set (checked before each token) or, after the first
        token, when the edge's probability of its own choice falls below `min_confidence`
        (the drafted low-confidence token is kept; the caller decides whether to send it).
        """
        done = 0
        t0 = time.perf_counter()
        while done < n and not (cancel is not None and cancel.is_set()):
            logits = self.next_logits()
            token, dist = self._pick(logits)
            conf = float(torch.softmax(logits.float(), dim=-1)[token]) if dist is None else dist.prob(token)
            self.ids.append(token)
            self.dists.append(dist)
            self.confidences.append(conf)
            done += 1
            if conf < min_confidence:
                break
        self.drafted_s += time.perf_counter() - t0
        self.drafted_n += done
        return done

    def generate_committed(self, n: int) -> list[int]:
        """Edge-only decoding: sample `n` tokens from the full warped edge distribution and commit them.

        Any speculative tokens are dropped first.
        """
        self.drop_speculative()
        out: list[int] = []
        for _ in range(n):
            logits = self.next_logits()
            probs = warp(logits, temperature=self.settings.temperature, top_k=self.settings.top_k,
                         top_p=self.settings.top_p)
            token = int(probs.argmax()) if self.settings.greedy else sample(probs, self.generator)
            self.ids.append(token)
            self.committed += 1
            out.append(token)
        return out

    # -- reconciling with the cloud ---------------------------------------------------

    def block(self, k: int, *, min_confidence: float = 0.0) -> list[int]:
        """The next draft block: up to k speculative tokens, cut after the first low-confidence one."""
        spec = self.speculative[:k]
        for i, c in enumerate(self.confidences[: len(spec)]):
            if c < min_confidence:
                return spec[: i + 1]
        return spec

    def block_dists(self, n: int) -> list[SparseDist]:
        """The exact draft distributions of the first n speculative tokens (sampling only)."""
        dists = self.dists[:n]
        assert all(d is not None for d in dists), "greedy drafts carry no distribution"
        return [d for d in dists if d is not None]

    def accept(self, accepted: int, next_token: int) -> bool:
        """Apply a verify result: keep `accepted` drafts, commit `next_token` after them.

        Returns True when the chain beyond survived (the cloud's next token equals the
        token the edge had already drafted there), so drafted-ahead tokens stay valid.
        """
        assert 0 <= accepted <= len(self.speculative), (accepted, len(self.speculative))
        pos = self.committed + accepted
        kept = pos < len(self.ids) and self.ids[pos] == next_token
        if kept:
            cut = accepted + 1
            self.committed = pos + 1
            self.dists, self.confidences = self.dists[cut:], self.confidences[cut:]
            return True
        del self.ids[pos:]
        self.ids.append(int(next_token))
        self.committed = len(self.ids)
        self.dists, self.confidences = [], []
        if self._cache_len > pos:
            assert self._state is not None
            self.runtime.truncate(self._state, pos)
            self._cache_len = pos
            self._logits = None
            self.hidden = None
        return False

    def commit_speculative(self, n: int) -> list[int]:
        """Commit the first n speculative tokens as they are (edge-only, the cloud gone)."""
        toks = self.speculative[:n]
        self.committed += len(toks)
        self.dists, self.confidences = self.dists[len(toks) :], self.confidences[len(toks) :]
        return toks

    def drop_speculative(self) -> None:
        """Forget every speculative token and roll the cache back to the committed chain."""
        if len(self.ids) > self.committed:
            del self.ids[self.committed :]
            if self._cache_len > self.committed:
                assert self._state is not None
                self.runtime.truncate(self._state, self.committed)
                self._cache_len = self.committed
                self._logits = None
                self.hidden = None
        self.dists, self.confidences = [], []

    def append_committed(self, token_ids: Sequence[int]) -> None:
        """Commit tokens produced elsewhere (cloud-generated); speculative tokens are dropped."""
        self.drop_speculative()
        self.ids.extend(int(t) for t in token_ids)
        self.committed = len(self.ids)

    def release(self) -> None:
        """Free the KV cache."""
        if self._state is not None:
            self.runtime.release(self._state)
            self._state = None
