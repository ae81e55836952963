"""The one batched greedy decoder: many sequences, one ragged forward pass per step.

What belongs here: greedy decoding over any `CausalLM` (`greedy_decode` from states the
caller prefilled, `greedy_generate` from prompts), with per-sequence budgets and stops, and
the forward that also returns hidden states (`forward_with_hidden`, what routers read).
What does not: sampling, prefix caches, constraints (callers pass a `choose` hook), text.

Invariant after decoding: each state holds its prompt plus every chosen token but the last
one; the last chosen token (the stop id, or the budget's final token) is never run through
the model, so nothing is computed that no one reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from tether.errors import ConfigurationError, RuntimeStateError
from tether.runtime._base import CausalLM, KVState, LayerwiseLM

DecodeFinish = Literal["stop", "length"]

Choose = Callable[[int, torch.Tensor, int], int]
"""``choose(i, logits, remaining) -> token``: sequence i's token from its [V] logits, with
`remaining` tokens of its budget left (the default is the argmax)."""

IsDone = Callable[[int, Sequence[int]], bool]
"""``is_done(i, tokens) -> bool``: True ends sequence i after it appended its latest token."""


def forward_with_hidden(
    runtime: CausalLM, state: KVState, token_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Append `token_ids` to `state` in one forward pass that also yields hidden states.

    Args:
        runtime: the model.
        state: a state of `runtime`.
        token_ids: the n tokens to append.

    Returns:
        (logits [n, V], hidden [n, H] float32 or None): layerwise runtimes (the torch backend)
        give the last decoder layer's output (before the final norm) from the same pass;
        others (ONNX) give None.

    Raises:
        RuntimeStateError: from the runtime (a released state, or one past `max_positions`).
    """
    if isinstance(runtime, LayerwiseLM):
        hidden = runtime.run_layers(state, runtime.embed(token_ids), 0, runtime.info.num_layers)  # [n, H]
        logits = runtime.head(hidden)  # [n, V]
        assert logits.shape == (len(token_ids), runtime.info.vocab_size)
        return logits, hidden.float().cpu()
    return runtime.extend(state, token_ids), None


@dataclass(frozen=True, slots=True, kw_only=True)
class Decoded:
    """One sequence's greedy continuation.

    Attributes:
        token_ids: the generated tokens, the stop id excluded.
        finish_reason: ``"stop"`` (a stop id, or `is_done` said so) or ``"length"`` (budget spent).
        stop_id: the stop id that ended it, else None (it is not in `token_ids`).
        logits: with ``keep_logits=m``: [min(m, chosen), V], row j being the logits token j
            was chosen from, where the chosen tokens are `token_ids` then `stop_id`; else None.
    """

    token_ids: tuple[int, ...]
    finish_reason: DecodeFinish
    stop_id: int | None = None
    logits: torch.Tensor | None = None


def greedy_decode(
    model: CausalLM,
    states: Sequence[KVState],
    logits: Sequence[torch.Tensor],
    *,
    max_new_tokens: int | Sequence[int],
    stop_ids: Collection[int] = (),
    choose: Choose | None = None,
    is_done: IsDone | None = None,
    keep_logits: int = 0,
    on_forward: Callable[[float], None] | None = None,
) -> list[Decoded]:
    """Greedy-decode every sequence at once from prefilled states.

    Each step picks one token per live sequence, then runs every sequence that goes on in
    one `extend_batch` call. A sequence ends when it picks a stop id (not appended), when
    `is_done` says so, or when it has `max_new_tokens` tokens.

    Args:
        model: the runtime.
        states: one prefilled state per sequence; they stay the caller's (not released).
        logits: per sequence, the [V] logits after its state's last position.
        max_new_tokens: the most tokens per sequence (one int for all, or one per sequence).
        stop_ids: ids that end a sequence.
        choose: picks a token instead of the argmax (e.g. a JSON constraint).
        is_done: ends a sequence after a token (e.g. a stop string or a closed JSON object).
        keep_logits: keep the logits rows of each sequence's first `keep_logits` choices.
        on_forward: called with the seconds of each batched forward pass.

    Returns:
        One `Decoded` per sequence, in order.

    Raises:
        ConfigurationError: lengths of `states`, `logits` and budgets differ, or a budget
            or `keep_logits` is negative.
        RuntimeStateError: from the runtime (a state would exceed `max_positions`).
    """
    n = len(states)
    budget = [max_new_tokens] * n if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]
    if len(logits) != n or len(budget) != n:
        raise ConfigurationError(
            f"greedy_decode needs one logits row and one budget per state: {n} states, "
            f"{len(logits)} logits rows, {len(budget)} budgets"
        )
    if min(budget, default=0) < 0 or keep_logits < 0:
        raise ConfigurationError(f"max_new_tokens and keep_logits must be >= 0, got {budget} and {keep_logits}")
    stops = frozenset(int(t) for t in stop_ids)
    nxt = list(logits)  # nxt[i]: [V], the distribution of sequence i's next token
    assert all(row.ndim == 1 for row in nxt), "each logits row must be [vocab]"
    tokens: list[list[int]] = [[] for _ in range(n)]
    kept: list[list[torch.Tensor]] = [[] for _ in range(n)]  # each [V]
    finish: list[DecodeFinish] = ["length"] * n
    stopped_by: list[int | None] = [None] * n
    live = [i for i in range(n) if budget[i] > 0]
    while live:
        going: list[int] = []
        for i in live:
            row = nxt[i]
            tok = int(row.argmax()) if choose is None else int(choose(i, row, budget[i] - len(tokens[i])))
            if len(kept[i]) < keep_logits:
                kept[i].append(row)
            if tok in stops:
                finish[i], stopped_by[i] = "stop", tok
                continue
            tokens[i].append(tok)
            if is_done is not None and is_done(i, tokens[i]):
                finish[i] = "stop"
            elif len(tokens[i]) < budget[i]:
                going.append(i)
        live = going
        if live:
            t0 = time.perf_counter()
            rows = model.extend_batch([states[i] for i in live], [[tokens[i][-1]] for i in live])  # each [1, V]
            if on_forward is not None:
                on_forward(time.perf_counter() - t0)
            for i, r in zip(live, rows, strict=True):
                nxt[i] = r[-1]
    width = nxt[0].shape[-1] if n else 0
    return [
        Decoded(
            token_ids=tuple(tokens[i]), finish_reason=finish[i], stop_id=stopped_by[i],
            logits=(torch.stack(kept[i]) if kept[i] else torch.zeros(0, width)) if keep_logits else None,
        )
        for i in range(n)
    ]


def greedy_generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Collection[int] = (),
    batch_size: int = 8,
    keep_logits: int = 0,
) -> list[Decoded]:
    """Greedy continuations of `prompts`, `batch_size` at a time (one ragged prefill pass each).

    Args:
        model: the runtime.
        prompts: token ids of each prompt (any lengths, at least one token each).
        max_new_tokens: the most tokens per continuation.
        stop_ids: ids that end a continuation (not included in it).
        batch_size: sequences prefilled and decoded together.
        keep_logits: see `greedy_decode`.

    Returns:
        One `Decoded` per prompt, in order; every state made here is released.

    Raises:
        ConfigurationError: an empty prompt, or `batch_size` < 1, or `max_new_tokens` < 0.
        RuntimeStateError: a prompt plus its continuation exceeds the model's `max_positions`
            (checked before anything runs).
    """
    if batch_size < 1 or max_new_tokens < 0:
        raise ConfigurationError(f"batch_size must be >= 1 and max_new_tokens >= 0, got {batch_size}, {max_new_tokens}")
    limit = model.info.max_positions
    for j, p in enumerate(prompts):
        if not p:
            raise ConfigurationError(f"prompt {j} is empty; every prompt needs at least one token")
        # The last chosen token is never run, so a state holds at most prompt + n - 1 positions.
        if len(p) + max(max_new_tokens - 1, 0) > limit:
            raise RuntimeStateError(
                f"prompt {j} of {len(p)} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                f"{limit} positions; shorten the prompt or lower max_new_tokens"
            )
    out: list[Decoded] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [[int(t) for t in p] for p in prompts[start : start + batch_size]]
        states = [model.new_state() for _ in chunk]
        try:
            prefill = model.extend_batch(states, chunk)  # each [len(prompt), V]
            out += greedy_decode(model, states, [rows[-1] for rows in prefill], max_new_tokens=max_new_tokens,
                                 stop_ids=stop_ids, keep_logits=keep_logits)
        finally:
            for s in states:
                model.release(s)
    return out
