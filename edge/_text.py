"""Text on the edge: prompts through the chat template, streaming detokenisation, stop strings.

What belongs here: turning prompts into token ids and committed ids back into text that is
safe to show (no half characters, nothing that may turn out to be part of a stop string).
What does not: choosing tokens (strategies) or counting them (stats).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, Union

from tether.errors import ConfigurationError

Message = Mapping[str, Any]
Prompt = Union[str, Sequence[Message]]
"""A plain string (wrapped as one user message when the tokenizer has a chat template), or
OpenAI-style messages: ``[{"role": "user", "content": "..."}]``."""


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the edge uses."""

    chat_template: Any
    eos_token_id: Any

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def build_prompt(
    tokenizer: Tokenizer,
    prompt: Prompt,
    *,
    chat_template: bool | None = None,
    system: str | None = None,
) -> list[int]:
    """Token ids of `prompt`, through the tokenizer's chat template when it has one.

    Args:
        tokenizer: the edge tokenizer (the pair shares one vocabulary).
        prompt: a string or a list of messages.
        chat_template: True to require the template, False to encode a string as is,
            None (default) to use it when the tokenizer has one.
        system: an optional system message put first (messages or string prompts).

    Raises:
        ConfigurationError: messages were given (or the template required) but the
            tokenizer has no chat template; a message lacks role/content; empty prompt.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        use_template = has_template if chat_template is None else chat_template
        if not use_template:
            text = prompt if system is None else f"{system}\n\n{prompt}"
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if not ids:
                raise ConfigurationError("the prompt is empty")
            return ids
        messages: list[dict[str, str]] = [{"role": "user", "content": prompt}]
    else:
        if chat_template is False:
            raise ConfigurationError("messages need the chat template; pass a string to skip it")
        messages = []
        for i, m in enumerate(prompt):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ConfigurationError(f"message {i} needs 'role' and 'content' keys, got {m!r}")
            messages.append({"role": str(m["role"]), "content": str(m["content"])})
        if not messages:
            raise ConfigurationError("the message list is empty")
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if not has_template:
        raise ConfigurationError(
            "this tokenizer has no chat template; pass the prompt as a plain string "
            "with chat_template=False"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(str(text), add_special_tokens=False))


class IncrementalDetokenizer:
    """Decode a growing token list into text deltas without splitting characters.

    The prefix/read offsets method of text-generation-inference: decode a short window
    before and after the new tokens and emit the difference, holding text back while it
    ends in an incomplete UTF-8 sequence (decoded as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
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
    """

    def __init__(self, stops: Sequence[str]) -> None:
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ConfigurationError(f"stop strings must be non-empty strings, got {s!r}")
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, start: int = 0) -> int | None:
        """Index in `text` of the earliest stop string ending at or after `start`, else None."""
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
