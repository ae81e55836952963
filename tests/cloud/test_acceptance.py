"""Acceptance rules: greedy exactness and distributional losslessness of rejection sampling."""

from __future__ import annotations



import numpy as np
import pytest
import torch

from _stats import chi2_sf, chi_square_pvalue
from tether.cloud import InvalidRequest, SamplingParams, SparseProbs
from tether.cloud._acceptance import greedy_accept, sample_token, speculative_accept, target_probs

V = 5


def test_chi2_sf_matches_known_values() -> None:
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, abs=1e-3)
    assert chi2_sf(18.307, 10) == pytest.approx(0.05, abs=1e-3)
    assert chi2_sf(0.0, 3) == 1.0


def _onehot_logits(tokens: list[int], vocab: int = V) -> torch.Tensor:
    out = torch.full((len(tokens), vocab), -5.0)
    for i, t in enumerate(tokens):
        out[i, t] = 5.0
    return out


def test_greedy_full_acceptance_gives_bonus() -> None:
    r = greedy_accept([1, 2, 3], _onehot_logits([1, 2, 3, 4]))
    assert (r.accepted, r.next_token, r.is_bonus) == (3, 4, True)


def test_greedy_first_mismatch_gives_correction() -> None:
    r = greedy_accept([1, 2, 3], _onehot_logits([1, 0, 3, 4]))
    assert (r.accepted, r.next_token, r.is_bonus) == (1, 0, False)
    r = greedy_accept([1, 2], _onehot_logits([2, 2, 2]))
    assert (r.accepted, r.next_token, r.is_bonus) == (0, 2, False)


def test_greedy_empty_draft_is_one_step() -> None:
    r = greedy_accept([], _onehot_logits([3]))
    assert (r.accepted, r.next_token, r.is_bonus) == (0, 3, True)


def test_rules_reject_bad_shapes_and_ids() -> None:
    with pytest.raises(InvalidRequest, match="need 3 logits rows for a draft of 2"):
        greedy_accept([1, 2], _onehot_logits([1, 2]))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        greedy_accept([9], _onehot_logits([1, 2]))
    g = torch.Generator().manual_seed(0)
    q = SparseProbs(ids=((0, 1),), probs=((0.5, 0.5),))
    with pytest.raises(InvalidRequest, match="has probability 0 under draft_probs"):
        speculative_accept([3], torch.full((2, V), 1.0 / V), q, g)
    with pytest.raises(InvalidRequest, match="1 rows for a draft of 2"):
        speculative_accept([0, 1], torch.full((3, V), 1.0 / V), q, g)


def test_target_probs_top_k_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert p[0].tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])
    p = target_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    assert p[0, 3] == 0 and float(p.sum()) == pytest.approx(1.0)
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.4))
    assert p[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    with pytest.raises(InvalidRequest):
        target_probs(logits, SamplingParams())


# --- distributional test -------------------------------------------------------------
# A Markov "language model" over V tokens: the target's logits depend on the previous token.
_rng = np.random.default_rng(1234)
TARGET_LOGITS = torch.tensor(_rng.normal(0.0, 1.5, size=(V, V)), dtype=torch.float32)
DRAFT_LOGITS = torch.tensor(_rng.normal(0.0, 1.5, size=(V, V)), dtype=torch.float32)


def _draft_table(top_k: int) -> np.ndarray:
    """q[prev] : the draft's (truncated, renormalised) distribution, exactly what the edge samples from."""
    q = torch.softmax(DRAFT_LOGITS.double(), dim=-1).numpy()
    out = np.zeros_like(q)
    for prev in range(V):
        keep = np.argsort(-q[prev])[:top_k]
        out[prev, keep] = q[prev, keep] / q[prev, keep].sum()
    return out


def _simulate(sampling: SamplingParams, *, k: int, draft_top_k: int | None, trials: int, seed: int) -> np.ndarray:
    """Decode 2 tokens after token 0 by draft + verify rounds; return counts of (t1, t2)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    q_table = _draft_table(draft_top_k or V)
    p_table = target_probs(TARGET_LOGITS, sampling)  # [V, V]: p[prev] (rows of a Markov target)
    counts = np.zeros((V, V), dtype=np.int64)
    for _ in range(trials):
        out: list[int] = []
        last = 0
        while len(out) < 2:
            draft, rows_ids, rows_p = [], [], []
            prev = last
            for _ in range(k):
                qrow = q_table[prev]
                d = int(np.searchsorted(np.cumsum(qrow), rng.random() * qrow.sum()))
                support = np.nonzero(qrow)[0]
                rows_ids.append(tuple(int(s) for s in support))
                rows_p.append(tuple(float(qrow[s]) for s in support))
                draft.append(d)
                prev = d
            ctx = [last, *draft]  # row i predicts draft position i
            p = p_table[ctx]
            q = SparseProbs(ids=tuple(rows_ids), probs=tuple(rows_p)) if draft_top_k != 0 else None
            if q is None:  # deterministic draft: argmax chain
                draft = []
                prev = last
                for _ in range(k):
                    prev = int(np.argmax(q_table[prev]))
                    draft.append(prev)
                p = p_table[[last, *draft]]
            res = speculative_accept(draft, p, q, gen)
            new = [*draft[: res.accepted], res.next_token]
            out.extend(new)
            last = out[-1]
        counts[out[0], out[1]] += 1
    return counts


def _expected(sampling: SamplingParams) -> np.ndarray:
    p = target_probs(TARGET_LOGITS, sampling).numpy()  # p[prev, next]
    return np.array([[p[0, a] * p[a, b] for b in range(V)] for a in range(V)])


@pytest.mark.parametrize(
    ("sampling", "draft_top_k"),
    [
        (SamplingParams(temperature=1.0), None),  # dense q
        (SamplingParams(temperature=0.7, top_p=0.9), 3),  # sparse q, truncated p
        (SamplingParams(temperature=1.3, top_k=3), 0),  # deterministic draft (q one-hot)
    ],
)
def test_rejection_sampling_matches_target_distribution(sampling: SamplingParams, draft_top_k: int | None) -> None:
    counts = _simulate(sampling, k=3, draft_top_k=draft_top_k, trials=6000, seed=7)
    pvalue = chi_square_pvalue(counts.ravel().tolist(), _expected(sampling).ravel().tolist())
    assert pvalue > 1e-3, f"output distribution differs from the target's (p={pvalue:.2e})"


def test_chi_square_has_power_against_the_draft_distribution() -> None:
    """Sanity check of the test itself: accepting every draft token yields q, which is rejected."""
    sampling = SamplingParams(temperature=1.0)
    rng = np.random.default_rng(3)
    q_table = _draft_table(V)
    counts = np.zeros((V, V), dtype=np.int64)
    for _ in range(6000):
        a = int(rng.choice(V, p=q_table[0]))
        b = int(rng.choice(V, p=q_table[a]))
        counts[a, b] += 1
    pvalue = chi_square_pvalue(counts.ravel().tolist(), _expected(sampling).ravel().tolist())
    assert pvalue < 1e-6


def test_sample_token_greedy_and_seeded() -> None:
    logits = torch.tensor([0.1, 3.0, 0.2])
    assert sample_token(logits, SamplingParams(), torch.Generator()) == 1
    s = SamplingParams(temperature=1.0)
    a = [sample_token(logits, s, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(a)) == 1
    seen = {sample_token(logits, s, g) for g in [torch.Generator().manual_seed(i) for i in range(200)]}
    assert seen == {0, 1, 2}
