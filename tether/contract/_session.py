"""`CloudSessionAPI`: the one contract of a cloud session, implemented by every backend.

What belongs here: the session protocol (its methods, arguments, results and errors).
Implementations: the in-process `tether.cloud.CloudSession`, the OpenAI-compatible HTTP
backend, the device-side `tether.edge.RemoteCloudSession` over the encrypted protocol and
the edge's link wrappers. What does not: any of those implementations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from tether.contract._types import (
    Capabilities,
    ChatMessage,
    ChatResult,
    GenerateChunk,
    HiddenResult,
    SamplingParams,
    ScoreResult,
    SessionInfo,
    SparseProbs,
    VerifyResult,
)

if TYPE_CHECKING:  # the wire's tensor type, accepted as is; typing only (the contract sits below the wire)
    from tether.protocol import Tensor

__all__ = ["CloudSessionAPI"]


@runtime_checkable
class CloudSessionAPI(Protocol):
    """One edge conversation's state on the cloud; implemented by every backend and by the remote client.

    The session holds the committed token sequence. Tokens committed but not yet in the
    cloud's KV cache (the prompt's last token, a correction or bonus token, appended tokens
    with ``prefill=False``) are kept as a pending tail and run in the next forward pass, so
    a verify is always ONE forward pass over ``pending + draft``.

    Errors: every method raises `tether.contract.CloudError` subclasses. `InvalidRequest`,
    `SessionLimitExceeded` and `UnsupportedOperation` leave the session unchanged.
    `SessionEvicted` means the server dropped the state: the session is closed and a new
    one must be opened and re-prefilled. Calls on one session are processed in order.
    """

    @property
    def length(self) -> int:
        """Number of committed tokens (0 before any append)."""
        ...

    @property
    def capabilities(self) -> Capabilities:
        """What this backend supports (valid before `open`)."""
        ...

    async def open(self, *, sampling: SamplingParams = SamplingParams(), model: str | None = None) -> SessionInfo:
        """Open the session with the target's sampling params.

        Args:
            sampling: how the target samples (greedy when temperature is 0); seeds the
                session's generator.
            model: the model name the caller expects; None accepts the server's.
        Returns:
            `SessionInfo` (id, model facts, limits, capabilities).
        Raises:
            InvalidRequest: unknown model, or the session is already open.
            ServerOverloaded: the server holds its maximum number of sessions.
        """
        ...

    async def append(self, token_ids: Sequence[int], *, prefill: bool = True) -> int:
        """Commit tokens (a prompt, or tokens the edge produced on its own).

        Args:
            token_ids: tokens to commit after the current sequence.
            prefill: run them through the cloud now (all but the last, which stays
                pending), overlapping that cost with the edge's drafting; False keeps
                them pending for the next forward pass (cheapest for a few tokens).
        Returns:
            The committed length.
        Raises:
            SessionLimitExceeded: the sequence would exceed ``max_tokens``.
        """
        ...

    async def verify(self, draft_ids: Sequence[int], draft_probs: SparseProbs | None = None) -> VerifyResult:
        """Verify a draft block in one forward pass and commit ``accepted + 1`` tokens.

        Greedy sessions accept the longest prefix equal to the target's argmax and add the
        argmax after it (correction or bonus); `draft_probs` is ignored. Sampling sessions
        run standard speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023)
        with p = the target's tempered/truncated distribution and q = `draft_probs`; None
        means a deterministic draft (q is one-hot on each draft token). The result is
        distributed exactly as the target sampling alone.

        Raises:
            InvalidRequest: no committed token yet, mismatched `draft_probs`, a draft token
                outside q's support, or a token id outside the vocabulary.
            SessionLimitExceeded: more than ``max_draft`` tokens, or past ``max_tokens``.
        """
        ...

    async def score(self, token_ids: Sequence[int], *, top_k: int = 5, commit: bool = True) -> ScoreResult:
        """Score `token_ids` after the committed sequence in one forward pass.

        Args:
            token_ids: tokens to score (may be empty: then only the next-token
                distribution is returned).
            top_k: alternatives per position (<= ``capabilities.max_top_k``).
            commit: keep the scored tokens committed (default) or roll them back.
        """
        ...

    def generate(self, n: int, *, stop_ids: Sequence[int] = ()) -> AsyncIterator[GenerateChunk]:
        """Let the cloud generate up to `n` tokens with the session's sampling, committing them.

        Stops early after producing a token in `stop_ids` (included in the output), and
        after the token that fills the session to ``max_tokens``: then the last chunk's
        `finish_reason` is ``"length"`` (a full session yields one empty ``"length"`` chunk).
        Yields chunks as tokens are produced; the last chunk has a `finish_reason`.
        """
        ...

    async def continue_hidden(
        self, hidden: npt.NDArray[np.floating[Any]] | Tensor, *, layer: int, top_k: int = 0
    ) -> HiddenResult:
        """Split computing: continue the same model from hidden states at layer `layer`.

        Args:
            hidden: [n, hidden_size] outputs of layers [0, layer) for the next n positions
                (the edge runs the first `layer` layers of the *same* model), as a float
                array or as a `tether.protocol.Tensor` in a compressed wire dtype (fp16,
                bf16, int8 per row, int4 per group), which remote backends send as is.
                Several positions in one call are how the edge catches the cloud up on
                positions it answered itself (split-mode early exit).
            layer: the split point, 0 < layer < num_layers; fixed for the session after
                the first call. A session used this way cannot verify/score/generate.
            top_k: also return the top-k of the next-token distribution.
        Returns:
            `HiddenResult` with the next token sampled from the last position.
        """
        ...

    async def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        json_mode: bool = False,
    ) -> ChatResult:
        """Chat completion over `messages` with the tokenizer's chat template (for Minions).

        Independent of the session's committed sequence (it neither reads nor changes it).
        With `json_mode` the reply is constrained to a single JSON value.
        """
        ...

    async def rollback(self, length: int) -> int:
        """Cut the committed sequence back to its first `length` tokens; returns the new length.

        Raises:
            InvalidRequest: `length` is negative or greater than the committed length.
        """
        ...

    async def close(self) -> None:
        """Release the session's state; idempotent."""
        ...
