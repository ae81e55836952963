"""Acceptance rules for draft verification, as pure functions over the target's logits.

What belongs here: turning the target's logits for ``pending[-1] + draft`` positions and the
draft's (sparse) distribution into "accepted n, next token". What does not: running models,
session state, I/O. Convention: p = target (cloud), q = draft (edge).

Shapes: for a draft of k tokens the caller passes k + 1 logits rows; row i predicts the token
at draft position i (row k predicts the bonus position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tether.contract import SamplingParams, SparseProbs
from tether.contract import InvalidRequest
from tether.sampling import warp


@dataclass(frozen=True, slots=True, kw_only=True)
class Acceptance:
    """What an acceptance rule decided.

    Attributes:
        accepted: number of leading draft tokens kept.
        next_token: correction token (accepted < k) or bonus token (accepted == k).
        is_bonus: True when every draft token was accepted.
    """

    accepted: int
    next_token: int
    is_bonus: bool


def _check_rows(draft_ids: Sequence[int], logits: torch.Tensor) -> int:
    k = len(draft_ids)
    if logits.ndim != 2 or logits.shape[0] != k + 1:
        raise InvalidRequest(f"need {k + 1} logits rows for a draft of {k}, got shape {tuple(logits.shape)}")
    vocab = logits.shape[1]
    for t in draft_ids:
        if not 0 <= t < vocab:
            raise InvalidRequest(f"draft token id {t} outside the vocabulary (size {vocab})")
    return k


def greedy_accept(draft_ids: Sequence[int], logits: torch.Tensor) -> Acceptance:
    """Greedy verification: keep the longest prefix equal to the target's argmax.

    Args:
        draft_ids: the k drafted tokens.
        logits: [k + 1, vocab] target logits (row i predicts draft position i).
    Returns:
        `Acceptance` whose next token is the target's argmax after the accepted prefix, so
        the committed tokens equal the target's own greedy decoding.
    """
    k = _check_rows(draft_ids, logits)
    argmax = logits.argmax(dim=-1).tolist()  # [k + 1]
    n = 0
    while n < k and argmax[n] == draft_ids[n]:
        n += 1
    return Acceptance(accepted=n, next_token=int(argmax[n]), is_bonus=n == k)


def target_probs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """The target's sampling distribution p per row: temperature, then top-k, then top-p.

    Args:
        logits: [n, vocab] raw logits.
        sampling: the session's params; temperature must be > 0.
    Returns:
        [n, vocab] float64 probabilities (rows sum to 1; tokens cut by top-k/top-p are 0).
    """
    if sampling.greedy:
        raise InvalidRequest("target_probs needs temperature > 0; greedy sessions use greedy_accept")
    # One warping rule for the edge's drafts and the cloud's target, so q and p agree on
    # what top-k/top-p mean; float64 keeps the acceptance ratios exact enough.
    return warp(logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                dtype=torch.float64)


def dense_draft_row(q: SparseProbs | None, position: int, draft_token: int, vocab: int) -> torch.Tensor:
    """q at one draft position as a dense [vocab] float64 vector (one-hot when q is None)."""
    row = torch.zeros(vocab, dtype=torch.float64)
    if q is None:
        row[draft_token] = 1.0
        return row
    ids = torch.tensor(q.ids[position], dtype=torch.long)
    if int(ids.max()) >= vocab:
        raise InvalidRequest(f"draft_probs row {position}: token id {int(ids.max())} outside the vocabulary")
    vals = torch.tensor(q.probs[position], dtype=torch.float64)
    row[ids] = vals / vals.sum()
    return row


def speculative_accept(
    draft_ids: Sequence[int],
    p: torch.Tensor,
    q: SparseProbs | None,
    generator: torch.Generator,
) -> Acceptance:
    """Standard speculative rejection sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023).

    For i = 0..k-1: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); on the first
    rejection, sample the correction from norm(max(0, p_i - q_i)) and stop. If all k are
    accepted, sample the bonus token from p_k. The committed tokens are then distributed
    exactly as sampling from p alone, for any q the verifier knows exactly.

    Args:
        draft_ids: the k drafted tokens; d_i must have q_i(d_i) > 0.
        p: [k + 1, vocab] target probabilities (already tempered/truncated, see `target_probs`).
        q: the draft distributions, k rows; None means a deterministic draft (one-hot q).
        generator: the session's random generator (CPU).
    Raises:
        InvalidRequest: shapes disagree or a draft token has q = 0.
    """
    k = _check_rows(draft_ids, p)
    if q is not None and len(q) != k:
        raise InvalidRequest(f"draft_probs has {len(q)} rows for a draft of {k} tokens")
    vocab = p.shape[1]
    p = p.to(torch.float64)
    r = torch.rand(k, generator=generator, dtype=torch.float64)  # [k] one uniform per position
    for i, d in enumerate(draft_ids):
        q_i = dense_draft_row(q, i, d, vocab)  # [V]
        qd = float(q_i[d])
        if qd <= 0.0:
            raise InvalidRequest(f"draft token {d} at position {i} has probability 0 under draft_probs")
        pd = float(p[i, d])
        if float(r[i]) < min(1.0, pd / qd):
            continue
        residual = torch.clamp(p[i] - q_i, min=0.0)
        total = float(residual.sum())
        # total == 0 only if p_i == q_i, where rejection has probability 0; guard float noise.
        dist = residual / total if total > 0.0 else p[i]
        token = int(torch.multinomial(dist, 1, generator=generator))
        return Acceptance(accepted=i, next_token=token, is_bonus=False)
    bonus = int(torch.multinomial(p[k], 1, generator=generator))
    return Acceptance(accepted=k, next_token=bonus, is_bonus=True)


def sample_token(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token from a single [vocab] logits row with the session's sampling (argmax if greedy)."""
    if sampling.greedy:
        return int(logits.argmax())
    probs = target_probs(logits[None, :], sampling)[0]
    return int(torch.multinomial(probs, 1, generator=generator))
