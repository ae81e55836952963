"""What routers read from the edge model: hidden states, token signals, query probes.

What belongs here: per-token signals (log-prob, entropy, margin), and `EdgeProbe`,
the edge model's view of a query (prompt log-probs, a short greedy draft, hidden states).
The forward that yields hidden states is the runtime's (`tether.runtime.forward_with_hidden`).
What does not: the routers that turn these into scores (`_query.py`, `_token.py`).

Shapes: logits [n, vocab] float32, hidden [n, hidden_size] float32. The hidden state is
the output of the last decoder layer *before* the final norm (the runtime's `head` applies
the norm); routers standardise their features, so the missing norm costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from tether.runtime import CausalLM, KVState, forward_with_hidden, greedy_decode

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class TokenSignals:
    """Signals of the edge distribution at n positions (each an array of n floats).

    Attributes:
        logprob: log q of the chosen token.
        top_prob: q of the most likely token (the edge's confidence).
        margin: q(top-1) - q(top-2).
        entropy: entropy of q in nats.
    """

    logprob: FloatArray
    top_prob: FloatArray
    margin: FloatArray
    entropy: FloatArray

    def as_matrix(self) -> FloatArray:
        """[n, 3]: top_prob, margin, entropy (the scalar features of token routers)."""
        return np.stack([self.top_prob, self.margin, self.entropy], axis=1).astype(np.float32)


def token_signals(logits: torch.Tensor, chosen: Sequence[int] | None = None) -> TokenSignals:
    """Signals of each row of `logits` [n, V]; `chosen` defaults to each row's argmax."""
    assert logits.ndim == 2, f"logits must be [n, vocab], got {tuple(logits.shape)}"
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values
    idx = logits.argmax(dim=-1) if chosen is None else torch.as_tensor(list(chosen), dtype=torch.long)
    entropy = -(p * logp).nan_to_num().sum(-1)
    return TokenSignals(
        logprob=logp.gather(1, idx[:, None])[:, 0].numpy().astype(np.float32),
        top_prob=top2[:, 0].numpy().astype(np.float32),
        margin=(top2[:, 0] - top2[:, 1]).numpy().astype(np.float32),
        entropy=entropy.numpy().astype(np.float32),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeProbe:
    """The edge model's view of a query: how it reads the prompt and starts the answer.

    Attributes:
        prompt_logprobs: log q(prompt[i] | prompt[:i]) for i >= 1.
        draft_ids: the first greedy tokens of the edge's answer (the "short draft").
        draft: signals of those draft tokens.
        hidden_mean: mean last-layer hidden state over the prompt [H] (None without one).
        hidden_last: last-layer hidden state at the prompt's last position [H].
    """

    prompt_logprobs: FloatArray
    draft_ids: tuple[int, ...]
    draft: TokenSignals
    hidden_mean: FloatArray | None
    hidden_last: FloatArray | None

    @property
    def prompt_mean_logprob(self) -> float:
        """Mean prompt log-prob (minus log perplexity); 0 for a one-token prompt."""
        return float(self.prompt_logprobs.mean()) if self.prompt_logprobs.size else 0.0

    def signal(self, name: str) -> float:
        """A named scalar signal where higher means the edge is more at ease (see `SIGNALS`)."""
        d = self.draft
        if name == "prompt_logprob":
            return self.prompt_mean_logprob
        if not len(self.draft_ids):
            return 0.0
        if name == "draft_mean_logprob":
            return float(d.logprob.mean())
        if name == "draft_min_logprob":
            return float(d.logprob.min())
        if name == "draft_neg_entropy":
            return -float(d.entropy.mean())
        if name == "draft_mean_margin":
            return float(d.margin.mean())
        raise KeyError(f"unknown signal {name!r}; choose one of {', '.join(SIGNALS)}")

    def signal_vector(self) -> FloatArray:
        """All `SIGNALS`, in order."""
        return np.array([self.signal(s) for s in SIGNALS], dtype=np.float32)

    def to_arrays(self) -> dict[str, FloatArray]:
        """Flat arrays for caching (see `from_arrays`)."""
        out: dict[str, FloatArray] = {
            "prompt_logprobs": self.prompt_logprobs,
            "draft_ids": np.asarray(self.draft_ids, dtype=np.float32),
            "draft_logprob": self.draft.logprob, "draft_top_prob": self.draft.top_prob,
            "draft_margin": self.draft.margin, "draft_entropy": self.draft.entropy,
        }
        if self.hidden_mean is not None and self.hidden_last is not None:
            out["hidden_mean"], out["hidden_last"] = self.hidden_mean, self.hidden_last
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, FloatArray]) -> EdgeProbe:
        return cls(
            prompt_logprobs=a["prompt_logprobs"],
            draft_ids=tuple(int(x) for x in a["draft_ids"]),
            draft=TokenSignals(a["draft_logprob"], a["draft_top_prob"], a["draft_margin"], a["draft_entropy"]),
            hidden_mean=a.get("hidden_mean"), hidden_last=a.get("hidden_last"),
        )


#: Training-free query signals, each oriented so that higher = easier for the edge.
SIGNALS: tuple[str, ...] = ("prompt_logprob", "draft_mean_logprob", "draft_min_logprob", "draft_neg_entropy", "draft_mean_margin")


def probe_from_forward(
    prompt_ids: Sequence[int],
    prefill_logits: torch.Tensor,
    prefill_hidden: torch.Tensor | None,
    draft_ids: Sequence[int],
    draft_logits: torch.Tensor,
) -> EdgeProbe:
    """Build an `EdgeProbe` from a prefill forward and the logits that chose each draft token.

    Args:
        prompt_ids: the n prompt tokens.
        prefill_logits: [n, V] logits of the prefill (row i predicts token i + 1).
        prefill_hidden: [n, H] hidden states of the prefill, or None.
        draft_ids: the m greedy draft tokens.
        draft_logits: [m, V]; row j is the distribution draft token j was chosen from.
    """
    n = len(prompt_ids)
    assert prefill_logits.shape[0] == n and draft_logits.shape[0] == len(draft_ids)
    if n > 1:
        lp = torch.log_softmax(prefill_logits[:-1].float(), dim=-1)
        prompt_lp = lp.gather(1, torch.as_tensor(list(prompt_ids[1:]))[:, None])[:, 0].numpy().astype(np.float32)
    else:
        prompt_lp = np.zeros(0, dtype=np.float32)
    h_mean = h_last = None
    if prefill_hidden is not None:
        h_mean = prefill_hidden.mean(0).numpy().astype(np.float32)
        h_last = prefill_hidden[-1].numpy().astype(np.float32)
    sig = token_signals(draft_logits, draft_ids) if len(draft_ids) else token_signals(torch.zeros(0, 2))
    if not math.isfinite(float(np.sum(prompt_lp))):
        prompt_lp = np.nan_to_num(prompt_lp, neginf=-50.0)
    return EdgeProbe(prompt_logprobs=prompt_lp, draft_ids=tuple(int(t) for t in draft_ids), draft=sig,
                     hidden_mean=h_mean, hidden_last=h_last)


def probe_query(runtime: CausalLM, prompt_ids: Sequence[int], draft_tokens: int = 16,
                eos_ids: Sequence[int] = ()) -> tuple[EdgeProbe, KVState, torch.Tensor]:
    """Prefill the prompt and draft up to `draft_tokens` greedy tokens on the edge.

    The draft is decoded by the runtime's batched greedy decoder (one sequence); it ends
    early at an end-of-sequence id, which it then includes.

    Args:
        runtime: the edge model.
        prompt_ids: the prompt (at least one token).
        draft_tokens: the most draft tokens.
        eos_ids: ids that end the draft.

    Returns:
        (probe, state, last_logits): the state holds ``prompt + draft[:-1]`` (the last draft
        token is not run), so an edge answer continues from it by appending ``draft[-1]``;
        `last_logits` [V] is the distribution after the state's last position, the one
        ``draft[-1]`` was chosen from. The caller owns (and releases) the state.
    """
    state = runtime.new_state()
    logits, hidden = forward_with_hidden(runtime, state, prompt_ids)  # [n, V], [n, H] or None
    (d,) = greedy_decode(runtime, [state], [logits[-1]], max_new_tokens=draft_tokens, stop_ids=eos_ids,
                         keep_logits=draft_tokens)
    assert d.logits is not None  # [len(draft), V]
    # The draft ends with the end-of-sequence token when one was chosen (the probe reads its q).
    draft = list(d.token_ids) + ([d.stop_id] if d.stop_id is not None else [])
    probe = probe_from_forward(prompt_ids, logits, hidden, draft, d.logits)
    return probe, state, d.logits[-1] if draft else logits[-1]
