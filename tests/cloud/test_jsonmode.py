"""The JSON prefix automaton behind chat's json_mode."""

from __future__ import annotations

import json

import pytest
import torch

from tether.cloud import SamplingParams
from tether.jsonmode import JsonConstraint, JsonPrefix


@pytest.mark.parametrize(
    "text",
    ['{}', '{"a": 1}', '{"a": [1, -2.5e3, true, false, null], "b": {"c": "x\\"\\u00e9"}}', '{ "k" : [ ] }'],
)
def test_accepts_valid_objects(text: str) -> None:
    p = JsonPrefix()
    assert p.feed_text(text) and p.complete
    json.loads(text)


@pytest.mark.parametrize("text", ['[1]', ' {}', '{a', '{"a" 1}', '{"a": 01}', '{"a": tru3}', '{"a": 1,}', '{}x',
                                  '{"a": 1.}', '{"a": "\x01"}', '{"a": -}'])
def test_rejects_invalid_text(text: str) -> None:
    p = JsonPrefix()
    assert not (p.feed_text(text) and p.complete)


@pytest.mark.parametrize("prefix", ['{', '{"ab', '{"a": [1, {"b": tr', '{"a": "x\\', '{"a": -', '{"a": 1.5e', '{"a"'])
def test_closing_text_completes_any_prefix(prefix: str) -> None:
    p = JsonPrefix()
    assert p.feed_text(prefix)
    closed = prefix + p.closing_text()
    json.loads(closed)


def test_constraint_never_emits_special_tokens(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    c = JsonConstraint(byte_tokenizer, len(byte_tokenizer))
    eos = byte_tokenizer.eos_token_id
    logits = torch.zeros(len(byte_tokenizer))
    logits[eos] = 100.0  # the model wants to stop right away
    out = []
    g = torch.Generator().manual_seed(0)
    for i in range(30):
        t = c.choose(logits, SamplingParams(temperature=1.0), g, eos_ids={eos}, remaining=30 - i)
        if c.complete and t == eos:
            break
        out.append(t)
        if c.complete:
            break
    assert eos not in out
    assert isinstance(json.loads(byte_tokenizer.decode(out)), dict)
