"""Generating router data with the real models: batched greedy answers and token-agreement pairs.

What belongs here: `greedy_answers` (ragged-batched greedy decoding of many prompts on one
runtime, recording the edge probe of each) and `agreement_pairs` (teacher-forced: the
edge's hidden state at each position of a sequence, labelled by whether the edge's and the
cloud's next-token argmax agree). What does not: caching and curves (benchmarks/routing.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tether.routing._signals import EdgeProbe, FloatArray, probe_from_forward, token_signals
from tether.runtime import CausalLM, LayerwiseLM, forward_with_hidden, greedy_decode


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """One greedy answer: its tokens (without the end-of-sequence token) and the edge probe."""

    token_ids: tuple[int, ...]
    probe: EdgeProbe


def greedy_answers(
    runtime: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    is_done: Callable[[list[int]], bool] = lambda ids: False,
    batch_size: int = 8,
    probe_tokens: int = 16,
    on_done: Callable[[int, Answer], None] | None = None,
) -> list[Answer]:
    """Greedy-decode every prompt, `batch_size` sequences per ragged forward pass (`greedy_decode`).

    Args:
        runtime: the model.
        prompts: token ids of each prompt.
        max_new_tokens: the most tokens per answer.
        eos_ids: end-of-sequence ids (not included in answers).
        is_done: called with an answer's tokens so far; True stops it (a stop string).
        batch_size: sequences decoded together.
        probe_tokens: how many first answer tokens make the probe's draft.
        on_done: called with (index, answer) as each batch's answers finish (for caching).
    """
    out: list[Answer] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        states = [runtime.new_state() for _ in chunk]
        try:
            # Prefilled one prompt at a time: the probe reads each prompt's logits and hidden states.
            pre = [forward_with_hidden(runtime, st, p) for st, p in zip(states, chunk, strict=True)]
            decoded = greedy_decode(runtime, states, [logits[-1] for logits, _ in pre], max_new_tokens=max_new_tokens,
                                    stop_ids=eos_ids, is_done=lambda _, ids: is_done(list(ids)),
                                    keep_logits=probe_tokens)
        finally:
            for st in states:
                runtime.release(st)
        for j, (p, (logits, hidden), d) in enumerate(zip(chunk, pre, decoded, strict=True)):
            assert d.logits is not None  # [min(probe_tokens, chosen), V]
            m = min(probe_tokens, len(d.token_ids))
            answer = Answer(token_ids=d.token_ids,
                            probe=probe_from_forward(p, logits, hidden, d.token_ids[:m], d.logits[:m]))
            out.append(answer)
            if on_done is not None:
                on_done(start + j, answer)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class AgreementPairs:
    """Training pairs for a token router, one row per answer position.

    Attributes:
        hidden: [n, H] edge hidden state that predicts the token at each position.
        signals: [n, 3] edge top_prob, margin, entropy there.
        agree: [n] 1.0 where the edge's argmax equals the cloud's argmax, else 0.0.
    """

    hidden: FloatArray
    signals: FloatArray
    agree: FloatArray


def agreement_pairs(
    edge: CausalLM, cloud: CausalLM | None, prompt_ids: Sequence[int], answer_ids: Sequence[int],
    *, cloud_is_author: bool = False,
) -> AgreementPairs:
    """Teacher-force ``prompt + answer`` through both models and label each answer position.

    One forward pass per model. When `cloud_is_author` the answer is the cloud's own greedy
    output, so its argmax at each position is the answer token and `cloud` is not run.
    """
    n, m = len(prompt_ids), len(answer_ids)
    seq = list(prompt_ids) + list(answer_ids)
    st = edge.new_state()
    e_logits, e_hidden = forward_with_hidden(edge, st, seq[:-1] if m else seq)
    edge.release(st)
    if e_hidden is None:
        raise ValueError("agreement pairs need the edge's hidden states (a layerwise runtime, e.g. torch)")
    rows = slice(n - 1, n - 1 + m)  # the rows that predict answer tokens
    e_arg = e_logits[rows].argmax(-1)
    if cloud_is_author:
        c_arg = torch.as_tensor(list(answer_ids))
    else:
        assert cloud is not None
        cs = cloud.new_state()
        c_logits = cloud.extend(cs, seq[:-1])
        cloud.release(cs)
        c_arg = c_logits[rows].argmax(-1)
    sig = token_signals(e_logits[rows])
    return AgreementPairs(hidden=e_hidden[rows].numpy().astype(np.float32), signals=sig.as_matrix(),
                          agree=(e_arg == c_arg).numpy().astype(np.float32))


def _forward_hidden_batch(runtime: CausalLM, states: list[Any], token_ids: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Ragged-batched forward returning logits and (for torch) last-layer hidden states per sequence."""
    fwd = getattr(runtime, "_forward", None)
    if fwd is None or not isinstance(runtime, LayerwiseLM):
        return runtime.extend_batch(states, token_ids), [None] * len(states)
    # TorchCausalLM's ragged forward (what extend_batch runs), stopping before the head so the
    # hidden states come out of the same pass.
    lens = [len(t) for t in token_ids]
    with torch.inference_mode():
        return _ragged(runtime, fwd, states, token_ids, lens)


def _ragged(runtime: Any, fwd: Any, states: list[Any], token_ids: list[list[int]], lens: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    hidden = runtime.embed([t for ids in token_ids for t in ids])
    hidden = fwd([runtime._own(s) for s in states], hidden, lens, 0, runtime.info.num_layers)  # type: ignore[attr-defined]
    logits = runtime.head(hidden)
    hs = hidden.float().cpu()
    return list(logits.split(lens)), list(hs.split(lens))


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRun:
    """One greedy route-token generation: tokens, which output positions the cloud supplied, scores."""

    token_ids: tuple[int, ...]
    routed: tuple[int, ...]
    scores: tuple[float, ...]


@dataclass(slots=True)
class Prefilled:
    """Edge and cloud states holding each prompt, reused (forked) by every route-token run.

    The cloud state holds ``prompt[:-1]``; the last prompt token stays pending, as in a
    cloud session after ``append``.
    """

    prompts: list[list[int]]
    edge_states: list[Any]
    edge_logits: list[torch.Tensor]
    edge_hidden: list[torch.Tensor | None]
    cloud_states: list[Any]

    def release(self, edge: CausalLM, cloud: CausalLM) -> None:
        for s in self.edge_states:
            edge.release(s)
        for s in self.cloud_states:
            cloud.release(s)


def prefill_pair(edge: CausalLM, cloud: CausalLM, prompts: Sequence[Sequence[int]], *, batch_size: int = 8) -> Prefilled:
    """Prefill every prompt on both models (in ragged batches)."""
    pre = Prefilled([list(p) for p in prompts], [], [], [], [])
    for i in range(0, len(prompts), batch_size):
        chunk = pre.prompts[i : i + batch_size]
        es = [edge.new_state() for _ in chunk]
        logits, hidden = _forward_hidden_batch(edge, es, chunk)
        cs = [cloud.new_state() for _ in chunk]
        cloud.extend_batch(cs, [p[:-1] for p in chunk])
        pre.edge_states += es
        pre.edge_logits += [lg[-1] for lg in logits]
        pre.edge_hidden += [None if h is None else h[-1] for h in hidden]
        pre.cloud_states += cs
    return pre


def route_tokens_batch(
    edge: CausalLM,
    cloud: CausalLM,
    prompts: Sequence[Sequence[int]] | Prefilled,
    score: Callable[[torch.Tensor, torch.Tensor | None], float],
    threshold: float,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    is_done: Callable[[list[int]], bool] = lambda ids: False,
) -> list[TokenRun]:
    """Greedy route-token decoding of many prompts at once: the rule of ``mode="route-token"``, batched.

    At each position the edge's logits (and hidden state) are scored; below `threshold`
    the token is the cloud's argmax after the committed prefix (the cloud runs its pending
    tokens in one ragged forward, as the session's ``score`` does), else the edge's argmax.
    Used by the benchmark to sweep thresholds at batch throughput; `RouteTokenStrategy` is
    the same rule over the cloud session API, one sequence at a time. `prompts` may be a
    `Prefilled` (its states are forked, not consumed).
    """
    eos = set(eos_ids)
    pre = prompts if isinstance(prompts, Prefilled) else prefill_pair(edge, cloud, prompts)
    n = len(pre.prompts)
    es = [edge.fork(s) for s in pre.edge_states]
    cs = [cloud.fork(s) for s in pre.cloud_states]
    nxt = list(pre.edge_logits)
    hid = list(pre.edge_hidden)
    out: list[list[int]] = [[] for _ in range(n)]
    routed: list[list[int]] = [[] for _ in range(n)]
    scores: list[list[float]] = [[] for _ in range(n)]
    pending: list[list[int]] = [[p[-1]] for p in pre.prompts]  # committed tokens the cloud has not run
    active = list(range(n))
    while active:
        to_cloud = []
        for i in active:
            s = score(nxt[i], hid[i])
            scores[i].append(s)
            if s < threshold:
                to_cloud.append(i)
        cloud_tok: dict[int, int] = {}
        if to_cloud:
            cl = cloud.extend_batch([cs[i] for i in to_cloud], [pending[i] for i in to_cloud])
            for i, lg in zip(to_cloud, cl):
                cloud_tok[i] = int(lg[-1].argmax())
                pending[i] = []
        feed = []
        for i in active:
            tok = cloud_tok[i] if i in cloud_tok else int(nxt[i].argmax())
            if i in cloud_tok:
                routed[i].append(len(out[i]))
            if tok in eos:
                continue
            out[i].append(tok)
            pending[i].append(tok)
            if len(out[i]) < max_new_tokens and not is_done(out[i]):
                feed.append(i)
        active = feed
        if active:
            logits, hidden = _forward_hidden_batch(edge, [es[i] for i in active], [[out[i][-1]] for i in active])
            for j, i in enumerate(active):
                nxt[i] = logits[j][-1]
                hid[i] = None if hidden[j] is None else hidden[j][-1]
    for s in es:
        edge.release(s)
    for s in cs:
        cloud.release(s)
    if not isinstance(prompts, Prefilled):
        pre.release(edge, cloud)
    return [TokenRun(token_ids=tuple(out[i]), routed=tuple(routed[i]), scores=tuple(scores[i])) for i in range(n)]
