"""The batched greedy decoder against one-prompt-at-a-time greedy decoding on a tiny model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from tether.errors import ConfigurationError, RuntimeStateError
from tether.runtime import TorchCausalLM, greedy_decode, greedy_generate

# Ragged on purpose: one token, a few, and longer than the batch's shortest by far.
PROMPTS = [[11, 22, 33, 44, 55], [7], [101, 5, 9, 13, 2, 8, 1000, 4, 77, 3000, 12, 6, 9], [400, 401, 402]]


@pytest.fixture(scope="module")
def lm(tiny_hf_model: Any) -> TorchCausalLM:
    return TorchCausalLM(tiny_hf_model, name="tiny-qwen2")


def reference(
    lm: TorchCausalLM, prompt: Sequence[int], n: int, stops: Sequence[int] = ()
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding of one prompt, one `extend` per token: (tokens with the stop id, logits rows)."""
    state = lm.new_state()
    row = lm.extend(state, prompt)[-1]
    out: list[int] = []
    rows: list[torch.Tensor] = []
    while len(out) < n:
        tok = int(row.argmax())
        out.append(tok)
        rows.append(row)
        if tok in stops:
            break
        row = lm.extend(state, [tok])[-1]
    lm.release(state)
    return out, rows


def test_batched_equals_per_prompt_greedy(lm: TorchCausalLM) -> None:
    got = greedy_generate(lm, PROMPTS, max_new_tokens=10, batch_size=3)
    for p, d in zip(PROMPTS, got, strict=True):
        want, _ = reference(lm, p, 10)
        assert list(d.token_ids) == want
        assert d.finish_reason == "length" and d.stop_id is None and d.logits is None


def test_stop_ids_end_each_sequence_on_its_own(lm: TorchCausalLM) -> None:
    full = [reference(lm, p, 10)[0] for p in PROMPTS]
    stop = full[0][4]  # the fifth token of the first prompt's continuation
    got = greedy_generate(lm, PROMPTS, max_new_tokens=10, stop_ids=[stop], batch_size=4)
    for want, d in zip(full, got, strict=True):
        if stop in want:
            cut = want.index(stop)
            assert list(d.token_ids) == want[:cut] and d.stop_id == stop and d.finish_reason == "stop"
        else:
            assert list(d.token_ids) == want and d.stop_id is None and d.finish_reason == "length"
    assert len(got[0].token_ids) <= 4


def test_zero_tokens_runs_nothing(lm: TorchCausalLM) -> None:
    state = lm.new_state()
    row = lm.extend(state, PROMPTS[0])[-1]
    passes: list[float] = []
    (d,) = greedy_decode(lm, [state], [row], max_new_tokens=0, keep_logits=3, on_forward=passes.append)
    assert d.token_ids == () and d.finish_reason == "length" and d.stop_id is None
    assert d.logits is not None and tuple(d.logits.shape) == (0, row.shape[0])
    assert passes == [] and state.length == len(PROMPTS[0])
    lm.release(state)
    for e in greedy_generate(lm, PROMPTS, max_new_tokens=0):
        assert e.token_ids == () and e.finish_reason == "length" and e.logits is None


def test_states_hold_all_but_the_last_choice_and_logits_are_kept(lm: TorchCausalLM) -> None:
    full = [reference(lm, p, 6) for p in PROMPTS]
    stop = full[1][0][2]
    states = [lm.new_state() for _ in PROMPTS]
    first = [r[-1] for r in lm.extend_batch(states, PROMPTS)]
    budgets = [6, 6, 2, 1]
    passes: list[float] = []
    got = greedy_decode(lm, states, first, max_new_tokens=budgets, stop_ids=[stop], keep_logits=4,
                        on_forward=passes.append)
    for p, s, (want, rows), n, d in zip(PROMPTS, states, full, budgets, got, strict=True):
        chosen = list(d.token_ids) + ([d.stop_id] if d.stop_id is not None else [])
        assert chosen == reference(lm, p, n, [stop])[0]
        assert s.length == len(p) + len(chosen) - 1
        assert d.logits is not None and d.logits.shape[0] == min(4, len(chosen))
        torch.testing.assert_close(d.logits, torch.stack(rows[: d.logits.shape[0]]), atol=1e-4, rtol=1e-4)
        lm.release(s)
    assert len(passes) == max(len(d.token_ids) for d in got) - 1


def test_choose_and_is_done_hooks(lm: TorchCausalLM) -> None:
    seen: list[tuple[int, int]] = []

    def choose(i: int, row: torch.Tensor, remaining: int) -> int:
        seen.append((i, remaining))
        return 100 + i  # a forced token per sequence

    states = [lm.new_state() for _ in PROMPTS[:2]]
    first = [r[-1] for r in lm.extend_batch(states, PROMPTS[:2])]
    out = greedy_decode(lm, states, first, max_new_tokens=5, choose=choose,
                        is_done=lambda i, toks: i == 1 and len(toks) == 2)
    assert out[0].token_ids == (100,) * 5 and out[0].finish_reason == "length"
    assert out[1].token_ids == (101,) * 2 and out[1].finish_reason == "stop"
    assert [r for i, r in seen if i == 0] == [5, 4, 3, 2, 1]
    for s in states:
        lm.release(s)


def test_bad_arguments_raise_before_running(tiny_hf_model: Any) -> None:
    short = TorchCausalLM(tiny_hf_model, name="short", max_positions=8)
    with pytest.raises(RuntimeStateError, match="prompt 1 of 5 tokens plus max_new_tokens=5 exceeds the model's 8"):
        greedy_generate(short, [[1, 2], [1, 2, 3, 4, 5]], max_new_tokens=5)
    assert greedy_generate(short, [[1, 2, 3, 4, 5]], max_new_tokens=4)[0].finish_reason == "length"
    with pytest.raises(ConfigurationError, match="prompt 0 is empty"):
        greedy_generate(short, [[]], max_new_tokens=2)
    state = short.new_state()
    with pytest.raises(ConfigurationError, match="1 states, 2 logits rows, 1 budgets"):
        greedy_decode(short, [state], [torch.zeros(4), torch.zeros(4)], max_new_tokens=1)
    with pytest.raises(ConfigurationError, match="must be >= 0"):
        greedy_decode(short, [state], [torch.zeros(4)], max_new_tokens=-1)
