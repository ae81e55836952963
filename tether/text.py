"""Streamed text shared by the edge's decoding loop and the cloud's OpenAI port.

What belongs here: turning generated ids into text that is safe to show (whole characters)
and finding stop strings in it; pure, no I/O, a tokenizer only through its ``decode``.
What does not: prompt building or choosing tokens (each side's own modules).

Stop strings are matched on the decoded text, never on token ids: a stop string may span
several tokens or begin or end in the middle of one, and the text returned ends just before
it (OpenAI's convention: the stop string itself is left out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tether.errors import ConfigurationError

__all__ = ["Detokenizer", "IncrementalDetokenizer", "StopStrings"]


class Detokenizer(Protocol):
    """The part of a Hugging Face tokenizer that turns ids back into text."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decode a growing token list into text deltas without splitting characters.

    The prefix/read offsets method of text-generation-inference: decode a short window
    before and after the new tokens and emit the difference, holding text back while it
    ends in an incomplete UTF-8 sequence (decoded as U+FFFD).
    """

    def __init__(self, tokenizer: Detokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be "")."""
        self._ids.append(int(token_id))
        before = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end)."""
        before = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=True)
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopStrings:
    """Find stop strings in streamed text, and how much text is safe to release.

    Text that could be the beginning of a stop string is held back until it cannot be.

    Args:
        stops: the stop strings (each non-empty).

    Raises:
        ConfigurationError: a stop string is empty or not a string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ConfigurationError(f"stop strings must be non-empty strings, got {s!r}")
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, start: int = 0) -> int | None:
        """Index in `text` of the earliest stop string ending at or after `start`, else None.

        Args:
            text: all the text so far.
            start: where the text not yet searched begins (a stop string found before it
                would have been found by an earlier call).

        Returns:
            Where the text should end (the stop string's first character), or None.
        """
        best: int | None = None
        for s in self.stops:
            i = text.find(s, max(0, start - len(s) + 1))
            if i >= 0 and (best is None or i < best):
                best = i
        return best

    def safe_length(self, text: str) -> int:
        """How much of `text` can be released: all but a suffix that starts a stop string."""
        n = len(text)
        for keep in range(min(self._longest - 1, n), 0, -1):
            tail = text[n - keep :]
            if any(s.startswith(tail) for s in self.stops):
                return n - keep
        return n
