"""The edge side's batched greedy decoding, prefix cache and prompt segments, on a tiny model."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tether.edge.minions._worker import BatchGenerator, EdgePrompt, encode_segments, render_segments
from tether.errors import ConfigurationError, RuntimeStateError

from .conftest import REPORT


@pytest.fixture
def lm(tiny_byte_hf: Any) -> Any:
    from tether.runtime import TorchCausalLM

    return TorchCausalLM(tiny_byte_hf, name="tiny-byte")


def greedy(lm: Any, ids: list[int], n: int, eos: int) -> list[int]:
    state = lm.new_state()
    logits = lm.extend(state, ids)
    out: list[int] = []
    for _ in range(n):
        t = int(logits[-1].argmax())
        if t == eos:
            break
        out.append(t)
        logits = lm.extend(state, [t])
    lm.release(state)
    return out


def test_batched_decoding_equals_one_at_a_time(lm: Any, byte_tokenizer: Any) -> None:
    eos = byte_tokenizer.eos_token_id
    gen = BatchGenerator(lm, byte_tokenizer, eos_ids=[eos], max_batch=3, prefill_chunk=7)
    shared = tuple(byte_tokenizer.encode("Shared prefix about the report. "))
    prompts = [EdgePrompt(prefix=shared, suffix=tuple(byte_tokenizer.encode(s)), max_new_tokens=n)
               for s, n in [("one?", 6), ("two, longer question?", 9), ("", 4), ("three", 5), ("four!", 1)]]
    outs = gen.generate(prompts)
    for p, o in zip(prompts, outs, strict=True):
        ref = greedy(lm, list(p.prefix + p.suffix), p.max_new_tokens, eos)
        assert o.text == byte_tokenizer.decode(ref, skip_special_tokens=True)
        assert o.completion_tokens == len(ref) and o.prompt_tokens == len(p.prefix) + len(p.suffix)
        assert o.finish_reason == ("length" if len(ref) == p.max_new_tokens else "stop")


def test_prefix_cache_prefills_once_and_evicts(lm: Any, byte_tokenizer: Any) -> None:
    gen = BatchGenerator(lm, byte_tokenizer, eos_ids=[byte_tokenizer.eos_token_id], cache_tokens=300)
    a = tuple(byte_tokenizer.encode("A" * 200))
    b = tuple(byte_tokenizer.encode("B" * 200))
    q = tuple(byte_tokenizer.encode("?"))
    first = gen.generate([EdgePrompt(prefix=a, suffix=q, max_new_tokens=2)])[0]
    again = gen.generate([EdgePrompt(prefix=a, suffix=q, max_new_tokens=2)])[0]
    assert (first.prefilled_tokens, again.prefilled_tokens) == (201, 1)
    assert again.text == first.text
    # A longer prefix extends the cached one instead of starting over.
    longer = gen.generate([EdgePrompt(prefix=a + q, suffix=q, max_new_tokens=1)])[0]
    assert longer.prefilled_tokens == 2
    gen.generate([EdgePrompt(prefix=b, suffix=q, max_new_tokens=1)])
    assert gen.cached_tokens <= 300
    gen.clear()
    assert gen.cached_tokens == 0


def test_no_cache_mode(lm: Any, byte_tokenizer: Any) -> None:
    gen = BatchGenerator(lm, byte_tokenizer, eos_ids=[byte_tokenizer.eos_token_id], cache_tokens=0)
    p = EdgePrompt(prefix=tuple(byte_tokenizer.encode("abc")), suffix=(), max_new_tokens=3)
    outs = gen.generate([p, p])
    assert outs[0].text == outs[1].text and all(o.prefilled_tokens == 3 for o in outs)


def test_json_prompts_always_give_a_json_object(lm: Any, byte_tokenizer: Any) -> None:
    gen = BatchGenerator(lm, byte_tokenizer, eos_ids=[byte_tokenizer.eos_token_id])
    start = '{"answer":'
    prompts = [EdgePrompt(prefix=(), suffix=tuple(byte_tokenizer.encode(f"q{i} {start}")), max_new_tokens=n,
                          json_prefix=start) for i, n in enumerate([40, 12, 6])]
    for out in gen.generate(prompts):
        assert out.text.startswith(start)
        assert isinstance(json.loads(out.text), dict)  # closed even when cut short


def test_limits(lm: Any, byte_tokenizer: Any) -> None:
    gen = BatchGenerator(lm, byte_tokenizer, eos_ids=[0])
    with pytest.raises(RuntimeStateError, match="exceeds the model's 2048 positions"):
        gen.generate([EdgePrompt(prefix=(1,) * 2040, suffix=(), max_new_tokens=10)])
    with pytest.raises(ConfigurationError, match="max_new_tokens must be >= 1"):
        EdgePrompt(prefix=(1,), suffix=(), max_new_tokens=0)
    with pytest.raises(ConfigurationError, match="needs at least one token"):
        EdgePrompt(prefix=(), suffix=(), max_new_tokens=1)
    with pytest.raises(ConfigurationError, match="does not start a JSON object"):
        gen.generate([EdgePrompt(prefix=(1,), suffix=(), max_new_tokens=1, json_prefix="[1")])


def test_segments_concatenate_to_the_template_and_share_prefixes(byte_tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "sys"},
                {"role": "user", "content": [REPORT, "Question one?"]}]
    segs = render_segments(byte_tokenizer, messages, assistant_prefill="{")
    whole = byte_tokenizer.apply_chat_template(
        [{"role": "system", "content": "sys"}, {"role": "user", "content": REPORT + "Question one?"}],
        tokenize=False, add_generation_prompt=True) + "{"
    assert "".join(segs) == whole and len(segs) == 2
    other = render_segments(byte_tokenizer, [messages[0], {"role": "user", "content": [REPORT, "Another?"]}])
    assert other[0] == segs[0]
    assert encode_segments(byte_tokenizer, segs)[: len(encode_segments(byte_tokenizer, segs[:1]))] == \
        encode_segments(byte_tokenizer, other[:1])


def test_sentinels_in_user_text_cannot_move_the_cut(byte_tokenizer: Any) -> None:
    segs = render_segments(byte_tokenizer, [{"role": "user", "content": ["a\ue0000\ue001b", "c"]}])
    assert len(segs) == 2 and segs[1].startswith("c")


def test_cached_logits_do_not_pin_the_prefill_block(lm: Any, byte_tokenizer: Any) -> None:
    gen = BatchGenerator(lm, byte_tokenizer, eos_ids=[0], prefill_chunk=64)
    gen.warm([tuple(byte_tokenizer.encode("x" * 100))])
    (_, _, last), = gen.prefixes()
    assert last.shape == (lm.info.vocab_size,)
    assert last.untyped_storage().nbytes() == lm.info.vocab_size * 4  # one row, not the [n, vocab] block
