"""``mode="edge"``: the edge model alone, through the client, the loop and the stream."""

from __future__ import annotations

import pytest
import torch

from tether.edge import Client, EdgeClient, Origin
from tether.errors import ConfigurationError


def reference_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Plain greedy decoding with transformers, no cache tricks."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = hf_model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


async def test_edge_greedy_matches_transformers(edge_model, tiny_edge_hf) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, None, mode="edge")
    result = await client.generate("hello there", max_new_tokens=12)
    prompt_ids = edge_model.tokenizer.encode("hello there")
    expected = reference_greedy(tiny_edge_hf, prompt_ids, 12)
    cut = expected.index(151_645) if 151_645 in expected else len(expected)
    assert list(result.token_ids) == expected[:cut]
    assert set(result.origins) <= {Origin.EDGE_ONLY}
    s = result.stats
    assert s.completion_tokens == len(result.token_ids)
    assert s.edge_forward_passes >= s.completion_tokens
    assert s.ttft_s is not None and 0 < s.ttft_s <= s.wall_s
    assert s.cloud_forward_passes == 0 and not s.degraded
    assert result.finish_reason in ("length", "stop")
    assert result.text == edge_model.tokenizer.decode(list(result.token_ids), skip_special_tokens=True)


async def test_stream_yields_tokens_then_result(edge_model) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, None, mode="edge")
    gen = client.stream("abc", max_new_tokens=8, temperature=0.9, seed=3)
    toks = [t async for t in gen]
    assert [t.index for t in toks] == list(range(len(toks)))
    assert tuple(t.token_id for t in toks) == gen.result.token_ids
    assert "".join(t.text for t in toks) == gen.result.text
    again = await client.generate("abc", max_new_tokens=8, temperature=0.9, seed=3)
    assert again.token_ids == gen.result.token_ids  # seeded sampling is reproducible


async def test_stop_string_cuts_text(edge_model) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, None, mode="edge")
    full = await client.generate("xyz", max_new_tokens=10)
    assert len(full.token_ids) >= 4
    stop = full.text[full.text.index(">", 1) + 1 :][:6]  # text inside the 2nd token's rendering
    cut = await client.generate("xyz", max_new_tokens=10, stop=stop)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


async def test_closing_a_stream_early_releases_state(edge_model) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, None, mode="edge")
    gen = client.stream("abc", max_new_tokens=50)
    async for _ in gen:
        break
    await gen.aclose()
    assert len(gen.result.token_ids) >= 1
    # the client still works
    assert len((await client.generate("abc", max_new_tokens=3)).token_ids) >= 1


async def test_bad_arguments_raise_before_running(edge_model) -> None:  # type: ignore[no-untyped-def]
    client = EdgeClient(edge_model, None, mode="edge")
    with pytest.raises(ConfigurationError, match="unknown mode 'fast'"):
        client.stream("x", mode="fast")
    with pytest.raises(ConfigurationError, match="needs a cloud"):
        client.stream("x", mode="speculative")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        client.stream("x", max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        client.stream("x", top_p=1.5)


def test_sync_client(edge_model) -> None:  # type: ignore[no-untyped-def]
    with Client(EdgeClient(edge_model, None, mode="edge")) as client:
        result = client.generate("hello", max_new_tokens=5)
        with client.stream("hello", max_new_tokens=5) as gen:
            toks = list(gen)
        assert tuple(t.token_id for t in toks) == result.token_ids == gen.result.token_ids
