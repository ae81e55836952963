"""The one decoding loop every mode runs: budget, end of sequence, stop strings, text, timing.

What belongs here: `Generation`, an async iterator of `StreamToken`s that drives a
`Strategy` to completion and then holds the `GenerationResult`. What does not: how tokens
are chosen (strategies) or where requests go (the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from tether.edge._errors import ContextLengthExceeded
from tether.edge._stats import GenerationStats
from tether.edge._strategies import Committed, Strategy
from tether.edge._text import IncrementalDetokenizer, StopStrings, Tokenizer
from tether.edge._types import FinishReason, GenerationResult, Origin, StreamToken


class Generation:
    """One generation in progress: iterate it for tokens, then read `result`.

    Tokens are released once their text is final: a token whose text could still be the
    start of a stop string is held back until it cannot be. Closing the iterator early
    (``aclose()``, or cancelling the task iterating it) stops the generation and frees the
    strategy's state; `result` is then the partial result.

    A generation that reaches a context limit ends with ``finish_reason="length"``: the
    edge model's (`max_context`) or the cloud session's (the strategy commits nothing more).

    Raises:
        ContextLengthExceeded: (when built) the prompt is longer than `max_context`.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_ids: Sequence[int],
        stop: Sequence[str],
        stats: GenerationStats,
        max_context: int | None = None,
    ) -> None:
        if max_context is not None and len(prompt_ids) > max_context:
            raise ContextLengthExceeded(prompt_tokens=len(prompt_ids), limit=max_context, where="edge model")
        self._strategy = strategy
        self._prompt_ids = list(prompt_ids)
        self._max_new = max_new_tokens if max_context is None else min(max_new_tokens, max_context - len(prompt_ids))
        self._eos = frozenset(eos_ids)
        self._stops = StopStrings(stop) if stop else None
        self._detok = IncrementalDetokenizer(tokenizer)
        self.stats = stats
        self.stats.prompt_tokens = len(self._prompt_ids)
        self._result: GenerationResult | None = None
        self._iter = self._run()

    @property
    def result(self) -> GenerationResult:
        """The finished result (after the iterator is exhausted or closed).

        Raises:
            RuntimeError: the generation has not finished.
        """
        if self._result is None:
            raise RuntimeError("the generation has not finished; iterate it to the end first")
        return self._result

    def __aiter__(self) -> AsyncIterator[StreamToken]:
        return self

    async def __anext__(self) -> StreamToken:
        return await self._iter.__anext__()

    async def aclose(self) -> None:
        """Stop the generation early and release its state."""
        await self._iter.aclose()

    async def collect(self) -> GenerationResult:
        """Run to the end and return the result."""
        async for _ in self:
            pass
        return self.result

    async def _run(self) -> AsyncGenerator[StreamToken, None]:
        stats = self.stats
        t0 = time.perf_counter()
        ids: list[int] = []
        origins: list[Origin] = []
        texts: list[str] = []  # text each token adds (after stop-string trimming)
        text = ""  # all text so far
        released = 0  # tokens yielded
        released_chars = 0
        finish: FinishReason = "length"
        stopped = False
        try:
            await self._strategy.start(self._prompt_ids)
            while len(ids) < self._max_new and not stopped:
                block: list[Committed] = await self._strategy.step(self._max_new - len(ids))
                if not block:  # the context is full
                    break
                for c in block:
                    if len(ids) >= self._max_new:
                        break
                    if c.token_id in self._eos:
                        finish, stopped = "stop", True
                        break
                    ids.append(c.token_id)
                    origins.append(c.origin)
                    stats.record_token(c.origin)
                    if stats.ttft_s is None:
                        stats.ttft_s = time.perf_counter() - t0
                    piece = self._detok.push(c.token_id)
                    search_from = len(text)
                    text += piece
                    texts.append(piece)
                    if self._stops is not None and piece:
                        at = self._stops.find(text, search_from)
                        if at is not None:
                            text = text[:at]
                            finish, stopped = "stop", True
                            break
                if len(ids) >= self._max_new or stopped:
                    break
                # Release what is final.
                safe = self._stops.safe_length(text) if self._stops is not None else len(text)
                while released < len(ids):
                    end = released_chars + len(texts[released])
                    if end > safe:
                        break
                    stats.wall_s = time.perf_counter() - t0
                    yield StreamToken(token_id=ids[released], text=texts[released], origin=origins[released], index=released)
                    released, released_chars = released + 1, end
            if not stopped:
                tail = self._detok.flush()
                if tail:
                    text += tail
                    if texts:
                        texts[-1] += tail
                    if self._stops is not None:
                        at = self._stops.find(text, len(text) - len(tail))
                        if at is not None:
                            text = text[:at]
                            finish = "stop"
            # Release the rest, trimming text past a stop string.
            while released < len(ids):
                piece = texts[released]
                piece = piece[: max(0, len(text) - released_chars)]
                stats.wall_s = time.perf_counter() - t0
                yield StreamToken(token_id=ids[released], text=piece, origin=origins[released], index=released)
                released, released_chars = released + 1, released_chars + len(piece)
        finally:
            stats.wall_s = time.perf_counter() - t0
            self._result = GenerationResult(
                text=text, token_ids=tuple(ids), origins=tuple(origins), finish_reason=finish, stats=stats
            )
            # Shield the clean-up so that a cancelled consumer still frees the states.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._strategy.close())
