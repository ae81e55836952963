"""Text on the edge: prompts through the chat template; streaming detokenisation and stop strings
come from the kernel (`tether.text`, shared with the cloud's OpenAI port) and are re-exported.

What belongs here: turning prompts into token ids. What does not: choosing tokens
(strategies) or counting them (stats).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, Union

from tether.errors import ConfigurationError
from tether.text import IncrementalDetokenizer as IncrementalDetokenizer  # shared with the cloud (re-exported)
from tether.text import StopStrings as StopStrings  # one matcher for edge and cloud (re-exported)

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
