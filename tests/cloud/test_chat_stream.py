"""Chat streaming: text deltas from the incremental detokenizer, multi-byte characters included.

The model is scripted to reply with the UTF-8 bytes of a known text, one byte per token (the
byte tokenizer), so every character past ASCII is split across tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from cloudkit import BYTE_EOS
from tether.cloud._config import CloudConfig
from tether.cloud._manager import SessionManager
from tether.runtime import CausalLM, KVState

TEXT = "Grüße, 世界! ✓ naïve café 🙂 end"
MESSAGES = [{"role": "user", "content": "hi"}]


class ScriptLM(CausalLM):
    """Wraps a real tiny model (for its KV states). After the first block a fresh state is
    extended with (the prompt), it predicts `script` token by token, then end of sequence."""

    def __init__(self, inner: CausalLM, script: Sequence[int]) -> None:
        self.inner, self.info = inner, inner.info
        self.script = list(script)
        self._prompt_len: dict[int, int] = {}

    def new_state(self) -> KVState:
        return self.inner.new_state()

    def extend(self, state: KVState, token_ids: Sequence[int]) -> torch.Tensor:
        first = state.length
        start = self._prompt_len.setdefault(id(state), len(token_ids))
        self.inner.extend(state, token_ids)
        out = torch.zeros(len(token_ids), self.info.vocab_size)  # [n, V]; row j predicts position first + j + 1
        for j in range(len(token_ids)):
            k = first + j + 1 - start
            out[j, self.script[k] if 0 <= k < len(self.script) else BYTE_EOS] = 5.0
        return out

    def truncate(self, state: KVState, length: int) -> None:
        self.inner.truncate(state, length)

    def fork(self, state: KVState) -> KVState:
        return self.inner.fork(state)

    def release(self, state: KVState) -> None:
        self._prompt_len.pop(id(state), None)
        self.inner.release(state)


class CountingTokenizer:
    """The byte tokenizer, counting how many ids `decode` is handed in all."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.decoded_ids = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.decoded_ids += len(token_ids)
        return str(self._inner.decode(token_ids, skip_special_tokens=skip_special_tokens))


async def _stream(tiny_lm: CausalLM, tokenizer: Any, text: str, max_tokens: int) -> tuple[list[str], Any]:
    model = ScriptLM(tiny_lm, tokenizer.encode(text, add_special_tokens=False))
    async with SessionManager(model, tokenizer=tokenizer, config=CloudConfig(batch_window_s=0.0)) as m:
        s = await m.open_session()
        deltas: list[str] = []
        final = None
        async for delta, result in s.chat_stream(MESSAGES, max_tokens=max_tokens):
            if result is None:
                deltas.append(delta)
            else:
                assert delta == ""
                final = result
        await s.close()
    return deltas, final


async def test_stream_concatenates_to_the_text_with_split_characters(tiny_lm: CausalLM, byte_tokenizer: Any) -> None:
    ids = byte_tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT)  # multi-byte characters do span several tokens
    deltas, final = await _stream(tiny_lm, byte_tokenizer, TEXT, max_tokens=200)
    assert final.text == TEXT and "".join(deltas) == TEXT
    assert final.finish_reason == "stop" and final.completion_tokens == len(ids)
    assert deltas == list(TEXT)  # one delta per character, as soon as its last byte arrives


async def test_stream_cut_inside_a_character(tiny_lm: CausalLM, byte_tokenizer: Any) -> None:
    ids = byte_tokenizer.encode(TEXT, add_special_tokens=False)
    cut = len("Grüße, ".encode()) + 2  # two of the three bytes of 世
    deltas, final = await _stream(tiny_lm, byte_tokenizer, TEXT, max_tokens=cut)
    assert final.finish_reason == "length" and final.completion_tokens == cut
    assert "".join(deltas) == final.text == byte_tokenizer.decode(ids[:cut], skip_special_tokens=True)
    assert final.text.startswith("Grüße, ") and all("\ufffd" not in d for d in deltas[:-1])


async def test_stream_does_not_redecode_the_reply(tiny_lm: CausalLM, byte_tokenizer: Any) -> None:
    text = TEXT * 8
    tok = CountingTokenizer(byte_tokenizer)
    deltas, final = await _stream(tiny_lm, tok, text, max_tokens=1000)
    n = final.completion_tokens
    assert "".join(deltas) == final.text == text and n > 300
    # Re-decoding the whole reply per token would hand decode about n * n / 2 ids.
    assert tok.decoded_ids < 10 * n, (tok.decoded_ids, n)
