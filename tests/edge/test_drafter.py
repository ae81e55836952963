"""`EdgeDrafter`, the edge's one decoding chain: adopting a state, hidden states, `choose`."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tether.edge._proposer import DraftSettings, EdgeDrafter
from tether.errors import RuntimeStateError
from tether.runtime import TorchCausalLM, forward_with_hidden
from tether.sampling import make_generator

PROMPT = [1000, 1005, 1010, 7, 99]


@pytest.fixture(scope="module")
def rt(tiny_edge_hf: Any) -> TorchCausalLM:
    return TorchCausalLM(tiny_edge_hf, name="tiny-edge")


def test_adopted_state_continues_like_a_fresh_start(rt: TorchCausalLM) -> None:
    fresh = EdgeDrafter(rt, DraftSettings(), make_generator(0))
    fresh.start(PROMPT)
    want = fresh.generate_committed(6)
    state = rt.new_state()
    rt.extend(state, PROMPT[:2])  # e.g. a probe's state: a prefix of the chain
    d = EdgeDrafter(rt, DraftSettings(), make_generator(0))
    d.adopt(PROMPT, state)
    assert d.forward_passes == 0  # the rest runs with the first token's forward
    assert d.generate_committed(6) == want and d.forward_passes == 6
    assert state.length == len(PROMPT) + 5  # the drafter owns and extends the adopted state
    for x in (d, fresh):
        x.release()


def test_adopt_refuses_a_state_longer_than_the_chain(rt: TorchCausalLM) -> None:
    state = rt.new_state()
    rt.extend(state, PROMPT)
    d = EdgeDrafter(rt, DraftSettings(), make_generator(0))
    with pytest.raises(RuntimeStateError, match="holds 5 positions but only 3 tokens were given"):
        d.adopt(PROMPT[:3], state)
    rt.release(state)


def test_hidden_state_follows_the_chain_through_a_rollback(rt: TorchCausalLM) -> None:
    d = EdgeDrafter(rt, DraftSettings(), make_generator(0), want_hidden=True)
    d.start(PROMPT)
    d.append_committed([5, 6])
    d.draft(3)
    d.accept(0, 9)  # the cloud rejects the first draft: roll back, commit 9 instead
    logits = d.next_logits()
    state = rt.new_state()
    ref_logits, ref_hidden = forward_with_hidden(rt, state, [*PROMPT, 5, 6, 9])
    assert ref_hidden is not None and d.hidden is not None
    torch.testing.assert_close(logits, ref_logits[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d.hidden, ref_hidden[-1], atol=1e-4, rtol=1e-4)
    rt.release(state)
    d.release()
    plain = EdgeDrafter(rt, DraftSettings(), make_generator(0))
    plain.start(PROMPT)
    assert plain.hidden is None


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_choose_is_the_token_draft_would_append(rt: TorchCausalLM, temperature: float) -> None:
    a = EdgeDrafter(rt, DraftSettings(temperature=temperature), make_generator(3))
    b = EdgeDrafter(rt, DraftSettings(temperature=temperature), make_generator(3))
    for x in (a, b):
        x.start(PROMPT)
    for _ in range(4):
        tok, dist = a.choose()
        assert (dist is None) == (temperature == 0.0)
        a.append_committed([tok])
        b.draft(1)
        assert b.speculative == [tok]
        b.commit_speculative(1)
    assert a.ids == b.ids
    for x in (a, b):
        x.release()
