"""Prompts, streaming detokenisation and stop strings."""

from __future__ import annotations

import pytest

from tests.edge.conftest import ToyTokenizer
from tether.edge._text import IncrementalDetokenizer, StopStrings, build_prompt
from tether.errors import ConfigurationError


def test_string_prompt_uses_chat_template_when_present() -> None:
    tok = ToyTokenizer(chat_template="yes")
    ids = build_prompt(tok, "hi", system="be brief")
    assert ids == tok.encode("[system]be brief[user]hi[assistant]")
    assert build_prompt(tok, "hi", chat_template=False) == tok.encode("hi")


def test_messages_need_a_template() -> None:
    with pytest.raises(ConfigurationError, match="no chat template"):
        build_prompt(ToyTokenizer(), [{"role": "user", "content": "x"}])
    with pytest.raises(ConfigurationError, match="needs 'role' and 'content'"):
        build_prompt(ToyTokenizer(chat_template="t"), [{"content": "x"}])


def test_detokenizer_holds_back_incomplete_characters() -> None:
    class Bytes(ToyTokenizer):
        # token i < 256 is one byte; decode as UTF-8 with replacement
        def decode(self, token_ids, skip_special_tokens=False):  # type: ignore[no-untyped-def]
            return bytes(token_ids).decode("utf-8", errors="replace")

    det = IncrementalDetokenizer(Bytes())
    data = "aé€b".encode()
    pieces = [det.push(b) for b in data]
    assert "".join(pieces) + det.flush() == "aé€b"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings() -> None:
    s = StopStrings(["\n\n", "END"])
    assert s.find("abc\n\nx") == 3
    assert s.find("xxEN", 0) is None
    assert s.safe_length("hello E") == 6  # "E" may start "END"
    assert s.safe_length("hello\n") == 5
    assert s.safe_length("hello") == 5
    with pytest.raises(ConfigurationError):
        StopStrings([""])
