"""tether.sampling: warping, seeded sampling, and the exact sparse draft distribution."""

from __future__ import annotations

import pytest
import torch

from tether.sampling import SparseDist, make_generator, sample, sparsify, warp


def test_greedy_is_one_hot_at_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 1.0, 5.0]])
    p = warp(logits, temperature=0.0)
    assert p.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # ties -> lowest id


def test_temperature_topk_topp_match_transformers() -> None:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    for t, k, p in [(0.7, 0, 1.0), (1.3, 10, 1.0), (0.9, 0, 0.8), (1.0, 20, 0.6)]:
        x = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            x = TopKLogitsWarper(k)(None, x)
        if p < 1.0:
            x = TopPLogitsWarper(p)(None, x)
        expected = torch.softmax(x, dim=-1)
        got = warp(logits, temperature=t, top_k=k, top_p=p)
        assert torch.allclose(got, expected, atol=1e-6), (t, k, p)


def test_float64_matches_float32() -> None:
    logits = torch.randn(2, 100)
    a = warp(logits, temperature=0.8, top_p=0.9)
    b = warp(logits, temperature=0.8, top_p=0.9, dtype=torch.float64)
    assert b.dtype == torch.float64
    assert torch.allclose(a.double(), b, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be a finite number in [0, 100], got -1.0"),
        ({"top_k": -2}, "top_k must be >= 0 (0 disables it), got -2"),
        ({"top_p": 0.0}, "top_p must be in (0, 1] (1 disables it), got 0.0"),
    ],
)
def test_invalid_settings_raise(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError) as info:
        warp(torch.zeros(4), **kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_sample_is_seeded_and_follows_probs() -> None:
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    draws = [sample(probs, make_generator(s)) for s in range(3000)]
    assert 1 not in draws
    freq = [draws.count(i) / len(draws) for i in range(4)]
    assert abs(freq[2] - 0.6) < 0.04 and abs(freq[3] - 0.3) < 0.04
    g1, g2 = make_generator(5), make_generator(5)
    assert [sample(probs, g1) for _ in range(20)] == [sample(probs, g2) for _ in range(20)]


def test_sparsify_keeps_mass_and_is_exact() -> None:
    probs = torch.softmax(torch.randn(1000) * 4, dim=-1)
    d = sparsify(probs, max_support=16, tail_mass=1e-3)
    assert 1 <= len(d) <= 16
    assert abs(float(d.probs.sum()) - 1.0) < 1e-5
    top = torch.topk(probs, len(d)).indices
    assert set(d.token_ids.tolist()) == set(top.tolist())
    # The edge samples from exactly the distribution it describes.
    gen = make_generator(0)
    draws = [d.sample(gen) for _ in range(2000)]
    assert all(d.prob(t) > 0 for t in draws)
    dense = d.dense(1000)
    assert torch.allclose(dense[d.token_ids], d.probs)


def test_sparse_dist_validates() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        SparseDist(torch.tensor([1, 2]), torch.tensor([0.5, 0.2]))
    with pytest.raises(ValueError, match="distinct"):
        SparseDist(torch.tensor([1, 1]), torch.tensor([0.5, 0.5]))
    assert SparseDist.point(7).prob(7) == 1.0
