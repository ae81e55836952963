"""A toy tokenizer for the split tests (a module of its own: conftest names collide across folders)."""

from __future__ import annotations

from collections.abc import Sequence


class ToyTokenizer:
    """Token i decodes to "<i>"; text encodes as code points mod 1000 plus 1000; no chat template."""

    eos_token_id = 151_645
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1000 + (ord(c) % 1000) for c in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join("" if (skip_special_tokens and t in (151_643, 151_645)) else f"<{t}>" for t in token_ids)
