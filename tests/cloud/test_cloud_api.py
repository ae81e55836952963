"""The session API's values validate when built."""

from __future__ import annotations

import pytest

from tether.cloud import (
    ChatMessage,
    InvalidRequest,
    SamplingParams,
    SessionEvicted,
    SessionLimitExceeded,
    SparseProbs,
    as_messages,
    error_from_code,
)


def test_sampling_params_validate() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.5).greedy
    with pytest.raises(InvalidRequest, match=r"temperature must be a finite number in \[0, 100\], got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequest, match=r"temperature must be a finite number in \[0, 100\], got 150"):
        SamplingParams(temperature=150)  # the wire's limit is the API's: one rule everywhere
    with pytest.raises(InvalidRequest, match=r"top_p must be in \(0, 1\] \(1 disables it\), got 0"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequest, match="top_k must be >= 0"):
        SamplingParams(top_k=-2)


def test_sparse_probs_validate() -> None:
    q = SparseProbs(ids=((3, 5),), probs=((0.25, 0.75),))
    assert len(q) == 1 and q.prob_of(0, 5) == 0.75 and q.prob_of(0, 4) == 0.0
    with pytest.raises(InvalidRequest, match="sum to 0.500000, not 1"):
        SparseProbs(ids=((1,),), probs=((0.5,),))
    with pytest.raises(InvalidRequest, match="duplicate token ids"):
        SparseProbs(ids=((1, 1),), probs=((0.5, 0.5),))
    with pytest.raises(InvalidRequest, match="1 id rows but 2 prob rows"):
        SparseProbs(ids=((1,),), probs=((1.0,), (1.0,)))
    with pytest.raises(InvalidRequest, match="finite and >= 0"):
        SparseProbs(ids=((1, 2),), probs=((1.5, -0.5),))


def test_sparse_from_dense_top_k_renormalises() -> None:
    q = SparseProbs.from_dense([[0.1, 0.6, 0.3, 0.0]], top_k=2)
    assert sorted(q.ids[0]) == [1, 2]
    assert q.prob_of(0, 1) == pytest.approx(2 / 3)


def test_messages_and_error_codes() -> None:
    msgs = as_messages([{"role": "user", "content": "hi"}, ChatMessage(role="assistant", content="yo")])
    assert [m.role for m in msgs] == ["user", "assistant"]
    with pytest.raises(InvalidRequest):
        as_messages([])
    with pytest.raises(InvalidRequest, match="chat role must be one of"):
        ChatMessage(role="robot", content="x")
    err = error_from_code("evicted", "session abc evicted", reason="idle")
    assert isinstance(err, SessionEvicted) and err.reason == "idle"
    # The reason is a field: text that merely mentions one is not parsed for it.
    assert error_from_code("evicted", "session abc evicted (idle)").reason == "memory"
    assert isinstance(error_from_code("limit_exceeded", "x"), SessionLimitExceeded)
    assert type(error_from_code("nope", "x")).__name__ == "CloudError"
