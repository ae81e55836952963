"""The session contract's values: what goes in and out of a `CloudSessionAPI` call.

What belongs here: the frozen request/result dataclasses of the session API and the one
rule for sampling settings (`validate_sampling`), used by the edge, the cloud and the wire.
What does not: any I/O, model code or wire encoding (the protocol embeds or converts these
values; see `tether.protocol`'s operation table).

Glossary (p = target/cloud distribution, q = draft/edge distribution)
- committed sequence: the tokens the session has agreed on (prompt + accepted output).
- pending tail: committed tokens not yet run through the cloud's KV cache. After every
  operation the last committed token is pending, so the next verify / score / generate gets
  the prediction that follows it in the *same* forward pass: every verify is ONE forward
  pass over ``pending + draft``.
- draft: k tokens the edge proposes to append.
- accepted: the longest prefix of the draft the cloud keeps (greedy: matches the cloud's
  argmax; sampling: passes the rejection test ``u < min(1, p/q)``).
- correction token: the token the cloud puts in place of the first rejected draft token
  (greedy: argmax of p; sampling: drawn from ``norm(max(0, p - q))``).
- bonus token: after a fully accepted draft, one more token drawn from p at the position
  after the draft. Either way every verify commits ``accepted + 1`` tokens.
"""

from __future__ import annotations
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from tether.contract._errors import InvalidRequest, InvalidSampling

FinishReason = Literal["stop", "length"]
"""Why a generation ended: a stop/eos id was produced, or the token budget ran out."""


CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
"""The roles a `ChatMessage` may have."""

MAX_TEMPERATURE = 100.0
"""The largest sampling temperature accepted anywhere (edge, cloud, wire); far past it the
distribution is uniform to float precision, so a larger value is a mistake, not a setting."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidRequest(message)


def validate_sampling(*, temperature: float, top_k: int, top_p: float) -> None:
    """The one rule for sampling settings, applied by the edge, the cloud and the wire.

    Args:
        temperature: finite, in [0, `MAX_TEMPERATURE`]; 0 means greedy.
        top_k: >= 0; 0 disables it.
        top_p: in (0, 1]; 1 disables it.
    Raises:
        InvalidSampling: (an `InvalidRequest` and a `ValueError`) naming the setting.
    """
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
            and 0.0 <= temperature <= MAX_TEMPERATURE):
        raise InvalidSampling(f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}], got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise InvalidSampling(f"top_k must be >= 0 (0 disables it), got {top_k!r}")
    if not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
        raise InvalidSampling(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How the cloud (target) samples; fixed when a session is opened.

    Attributes:
        temperature: 0 means greedy (argmax); > 0 scales logits before softmax.
        top_p: nucleus mass in (0, 1]; 1 disables it. Applied to p before acceptance.
        top_k: keep the k most likely tokens; 0 disables it. Applied to p before acceptance.
        seed: seeds the session's random generator (rejection tests, corrections, bonus
            tokens, generate); None draws a random seed.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        validate_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    @property
    def greedy(self) -> bool:
        """True when the target decodes by argmax (temperature 0)."""
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SparseProbs:
    """The draft distribution q at each draft position, given exactly on its support.

    Row i is q(. | prefix, d_0..d_{i-1}), the distribution the edge sampled draft token d_i
    from. Tokens outside ``ids[i]`` have probability 0. Losslessness holds for *any* q the
    verifier knows exactly, so the edge may truncate (top-k, top-p) as long as it samples from
    the truncated, renormalised distribution it sends. Each row must sum to 1 within 1e-3
    (the verifier renormalises) and must give the drafted token a positive probability.

    Attributes:
        ids: per position, distinct token ids of the support.
        probs: per position, their probabilities (same shape as ``ids``).
    """

    ids: tuple[tuple[int, ...], ...]
    probs: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        _check(len(self.ids) == len(self.probs),
               f"SparseProbs: {len(self.ids)} id rows but {len(self.probs)} prob rows")
        for i, (row_ids, row_p) in enumerate(zip(self.ids, self.probs)):
            _check(len(row_ids) == len(row_p) and len(row_ids) > 0,
                   f"SparseProbs row {i}: {len(row_ids)} ids, {len(row_p)} probs (need equal, > 0)")
            _check(len(set(row_ids)) == len(row_ids), f"SparseProbs row {i}: duplicate token ids")
            _check(all(t >= 0 for t in row_ids), f"SparseProbs row {i}: negative token id")
            _check(all(math.isfinite(x) and x >= 0.0 for x in row_p),
                   f"SparseProbs row {i}: probabilities must be finite and >= 0")
            total = math.fsum(row_p)
            _check(abs(total - 1.0) <= 1e-3, f"SparseProbs row {i}: probabilities sum to {total:.6f}, not 1")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_dense(cls, rows: npt.ArrayLike, *, top_k: int | None = None) -> SparseProbs:
        """Build from dense [k, vocab] probabilities, keeping the support (or the top_k, renormalised).

        Note that with `top_k` the edge must sample from the truncated distribution it sends.
        """
        arr = np.asarray(rows, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[None, :]
        ids: list[tuple[int, ...]] = []
        probs: list[tuple[float, ...]] = []
        for row in arr:
            if top_k is not None and top_k < row.shape[0]:
                idx = np.argpartition(-row, top_k - 1)[:top_k]
            else:
                idx = np.nonzero(row > 0)[0]
            idx = idx[row[idx] > 0]
            p = row[idx]
            p = p / p.sum()
            ids.append(tuple(int(i) for i in idx))
            probs.append(tuple(float(x) for x in p))
        return cls(ids=tuple(ids), probs=tuple(probs))

    def prob_of(self, position: int, token_id: int) -> float:
        """q(token_id) at `position` (0 outside the support)."""
        try:
            j = self.ids[position].index(token_id)
        except ValueError:
            return 0.0
        return self.probs[position][j]


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    """Which operations a backend supports, so the edge can adapt (e.g. route instead of verify).

    Attributes:
        verify: greedy draft verification.
        sampling_verify: rejection-sampling verification with sparse draft probabilities.
        score: per-position logprobs of given tokens.
        generate: cloud-side generation of n tokens (streamed).
        hidden: split computing (`continue_hidden`).
        chat: chat completion over messages.
        json_mode: chat can constrain its output to JSON.
        rollback: the committed sequence can be cut back.
        max_draft: most draft tokens per verify.
        max_top_k: most alternatives per position that score returns.
    """

    verify: bool = True
    sampling_verify: bool = True
    score: bool = True
    generate: bool = True
    hidden: bool = False
    chat: bool = True
    json_mode: bool = False
    rollback: bool = True
    max_draft: int = 32
    max_top_k: int = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInfo:
    """What `open` returns: the session's identity, model facts, limits and capabilities."""

    session_id: str
    model: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    eos_token_ids: tuple[int, ...]
    max_tokens: int
    capabilities: Capabilities


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyResult:
    """Outcome of verifying one draft block (one cloud forward pass over pending + draft).

    Attributes:
        accepted: how many leading draft tokens were kept (0..k).
        next_token: the correction token (if ``accepted < k``) or the bonus token (if all
            k were accepted); it is committed too, so the session grew by ``accepted + 1``.
        is_bonus: True when ``next_token`` is a bonus token (full acceptance).
        length: the committed length after this verify.
        forward_passes: cloud forward passes spent (1, or 0 for an empty no-op).
        compute_s: cloud compute seconds of those passes (this session's batch share
            is not separated out: it is the wall time of the batched forward).
        queue_s: seconds the request waited for a batch slot before its forward ran.
    """

    accepted: int
    next_token: int
    is_bonus: bool
    length: int
    forward_passes: int = 1
    compute_s: float = 0.0
    queue_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreResult:
    """Cloud log-probabilities (temperature 1, no truncation) for scored tokens.

    For n scored tokens t_0..t_{n-1}:

    Attributes:
        token_logprobs: n values, log p(t_i | committed prefix, t_0..t_{i-1}).
        top_ids: n + 1 rows; row i holds the top-k token ids of the distribution that
            predicts t_i, and row n the distribution after the last scored token.
        top_logprobs: n + 1 rows of the matching logprobs, descending.
        length: committed length afterwards (scored tokens are committed unless
            ``commit=False``).
        forward_passes, compute_s, queue_s: as in `VerifyResult`.
    """

    token_logprobs: tuple[float, ...]
    top_ids: tuple[tuple[int, ...], ...]
    top_logprobs: tuple[tuple[float, ...], ...]
    length: int
    forward_passes: int = 1
    compute_s: float = 0.0
    queue_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateChunk:
    """Tokens the cloud generated and committed, streamed as they are produced.

    Attributes:
        token_ids: newly committed tokens (usually one per chunk).
        finish_reason: None while more follow; ``"stop"`` or ``"length"`` on the last chunk.
        length: committed length after this chunk.
        forward_passes, compute_s: spent producing this chunk.
        logprobs: per token, its log-probability (temperature 1), when asked for.
        top_ids, top_logprobs: per token, the top-k alternatives at its position, when asked for.
    """

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    length: int
    forward_passes: int = 1
    compute_s: float = 0.0
    logprobs: tuple[float, ...] = ()
    top_ids: tuple[tuple[int, ...], ...] = ()
    top_logprobs: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HiddenResult:
    """Outcome of `continue_hidden`: the cloud ran layers [layer, L) and the LM head.

    Attributes:
        next_token: sampled with the session's sampling params from the last position;
            *not* committed (the edge runs it through its own layers and sends its hidden).
        top_ids, top_logprobs: top-k of the last position's distribution (temperature 1),
            empty when ``top_k=0`` was asked.
        length: positions the cloud now holds for this split session.
        forward_passes, compute_s, queue_s: as in `VerifyResult`.
    """

    next_token: int
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]
    length: int
    forward_passes: int = 1
    compute_s: float = 0.0
    queue_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    """One chat message. `role` is one of `CHAT_ROLES` (system, user, assistant, tool)."""

    role: str
    content: str

    def __post_init__(self) -> None:
        _check(self.role in CHAT_ROLES, f"chat role must be one of {CHAT_ROLES}, got {self.role!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatResult:
    """A chat completion.

    Attributes:
        text: the assistant's reply (JSON text when ``json_mode`` was asked).
        prompt_tokens: tokens of the templated prompt.
        completion_tokens: tokens generated.
        finish_reason: ``"stop"`` or ``"length"``.
        compute_s: cloud compute seconds.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason = "stop"
    compute_s: float = 0.0


def as_messages(messages: Sequence[ChatMessage | Mapping[str, Any]]) -> tuple[ChatMessage, ...]:
    """Normalise OpenAI-style dicts or `ChatMessage`s into a tuple of `ChatMessage`."""
    out: list[ChatMessage] = []
    for m in messages:
        if isinstance(m, ChatMessage):
            out.append(m)
        else:
            _check(isinstance(m, Mapping) and "role" in m and "content" in m,
                   "each chat message needs 'role' and 'content'")
            out.append(ChatMessage(role=str(m["role"]), content=str(m["content"])))
    _check(len(out) > 0, "chat needs at least one message")
    return tuple(out)
