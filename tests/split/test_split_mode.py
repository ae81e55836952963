"""Split mode end to end on a tiny model: exactness, compression, early exit, bytes, failures."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tether.edge import EdgeClient, EmulatedLink, InProcessCloud, Origin, SplitModel, SplitOptions, SplitStats
from tether.edge._text import build_prompt
from tether.errors import ConfigurationError

SPLIT_LAYERS = 6  # layers of the tiny split model (tests/split/conftest.py)

PROMPTS = ["hello split world", "a", "the quick brown fox jumps over the lazy dog " * 3, "x = 1\ny = 2\n"]


def reference_greedy(runtime: Any, prompt_ids: list[int], n: int, eos: tuple[int, ...]) -> list[int]:
    """The unsplit model's greedy tokens: the whole prompt in one pass, then one token at a time."""
    state = runtime.new_state()
    out: list[int] = []
    try:
        logits = runtime.extend(state, prompt_ids)[-1]
        for _ in range(n):
            token = int(logits.argmax())
            if token in eos:
                break
            out.append(token)
            logits = runtime.extend(state, [token])[-1]
    finally:
        runtime.release(state)
    return out


def ids_of(client: EdgeClient, prompt: str) -> list[int]:
    return build_prompt(client.edge.tokenizer, prompt, chat_template=None, system=None)


@pytest.mark.parametrize("k", range(1, SPLIT_LAYERS))
async def test_fp32_split_greedy_equals_full_model_for_every_k(k, edge_model, manager, split_runtime) -> None:  # type: ignore[no-untyped-def]
    async with EdgeClient(edge_model, InProcessCloud(manager), mode="split",
                          split=SplitOptions(split_layer=k, compression="fp32")) as client:
        for prompt in PROMPTS:
            result = await client.generate(prompt, max_new_tokens=16)
            expected = reference_greedy(split_runtime, ids_of(client, prompt), 16, edge_model.eos_token_ids)
            assert list(result.token_ids) == expected, (k, prompt)
            assert set(result.origins) <= {Origin.CLOUD_GENERATED}
            stats = result.stats
            assert isinstance(stats, SplitStats) and stats.split_layer == k and not stats.degraded
            # the prompt in one message, then one row per token (an end-of-sequence token too)
            assert stats.messages == len(result.token_ids) + (result.finish_reason == "stop")
            assert stats.hidden_rows_sent == stats.prompt_rows + stats.messages - 1


async def test_split_equals_cloud_mode(edge_model, manager) -> None:  # type: ignore[no-untyped-def]
    async with EdgeClient(edge_model, InProcessCloud(manager)) as client:
        for prompt in PROMPTS:
            cloud = await client.generate(prompt, mode="cloud", max_new_tokens=12)
            split = await client.generate(prompt, mode="split", max_new_tokens=12,
                                          split=SplitOptions(split_layer=3, compression="fp32"))
            assert split.token_ids == cloud.token_ids


async def test_bytes_per_token_by_compression(edge_model, manager) -> None:  # type: ignore[no-untyped-def]
    hidden = manager.model.info.hidden_size  # 64
    expected = {"fp32": 4 * hidden, "fp16": 2 * hidden, "bf16": 2 * hidden, "int8": hidden + 4,
                "int4": hidden // 2 + 2 * (hidden // 32)}
    link = EmulatedLink(InProcessCloud(manager))
    async with EdgeClient(edge_model, link, mode="split") as client:
        for name, per_row in expected.items():
            r = await client.generate("compress me", max_new_tokens=8, split=SplitOptions(split_layer=2, compression=name))
            s = r.stats
            assert isinstance(s, SplitStats) and s.compression == name
            assert s.hidden_bytes_sent == s.hidden_rows_sent * per_row
            assert s.prompt_rows == len(ids_of(client, "compress me"))
            assert s.decode_bytes_per_token == pytest.approx((s.hidden_rows_sent - s.prompt_rows) * per_row / 8)
            assert s.bytes_up >= s.hidden_bytes_sent  # the link counted the tensors plus framing


async def test_lossy_compression_still_mostly_agrees(edge_model, manager, split_runtime) -> None:  # type: ignore[no-untyped-def]
    async with EdgeClient(edge_model, InProcessCloud(manager), mode="split") as client:
        prompt = PROMPTS[2]
        expected = reference_greedy(split_runtime, ids_of(client, prompt), 16, edge_model.eos_token_ids)
        for name in ("fp16", "bf16", "int8"):
            r = await client.generate(prompt, max_new_tokens=16, split=SplitOptions(split_layer=3, compression=name))
            assert list(r.token_ids[:4]) == expected[:4], name


class RecordingCloud(InProcessCloud):
    """An in-process connector whose sessions record every continue_hidden call (rows, dtype)."""

    def __init__(self, manager: Any) -> None:
        super().__init__(manager)
        self.calls: list[tuple[int, str]] = []

    async def new_session(self) -> Any:
        session = await super().new_session()
        calls = self.calls
        original = session.continue_hidden

        async def continue_hidden(hidden: Any, *, layer: int, top_k: int = 0) -> Any:
            calls.append((hidden.shape[0], getattr(hidden, "dtype", None).name))
            return await original(hidden, layer=layer, top_k=top_k)

        session.continue_hidden = continue_hidden
        return session


class AlwaysExit:
    """An exit that is sure about every other position (token 1234 when it exits)."""

    layer = None

    def __init__(self) -> None:
        self.calls = 0

    def propose(self, hidden: torch.Tensor, **_: Any) -> Any:
        from tether.edge.split._exit_head import ExitProposal

        self.calls += 1
        return ExitProposal(token=1234, confidence=1.0 if self.calls % 2 == 0 else 0.0)


async def test_early_exit_catches_the_cloud_up_lazily(edge_model, manager, split_runtime) -> None:  # type: ignore[no-untyped-def]
    cloud = RecordingCloud(manager)
    head = AlwaysExit()
    opts = SplitOptions(split_layer=2, compression="int8", exit_threshold=0.5, exit_head=head)  # type: ignore[arg-type]
    async with EdgeClient(edge_model, cloud, mode="split", split=opts) as client:
        prompt_len = len(ids_of(client, "early exit"))
        r = await client.generate("early exit", max_new_tokens=9)
    s = r.stats
    assert isinstance(s, SplitStats)
    # positions alternate: cloud, exit, cloud, exit, ...
    assert [o for o in r.origins] == [Origin.CLOUD_GENERATED, Origin.EDGE_EXIT] * 4 + [Origin.CLOUD_GENERATED]
    assert all(t == 1234 for t, o in zip(r.token_ids, r.origins) if o is Origin.EDGE_EXIT)
    assert s.early_exits == 4 and s.exit_rate == pytest.approx(4 / 9) and s.exit_kind == "custom"
    # the prompt in one message; after each exit the next request carries 2 rows (catch-up + new)
    rows = [n for n, _ in cloud.calls]
    assert rows == [prompt_len] + [2] * 4 and {d for _, d in cloud.calls} == {"INT8_ROWWISE"}
    assert s.catch_up_rows == 4 and s.messages == 5 and s.rounds == 5
    # the cloud's cache holds every position it was sent (the exits' positions included)
    assert s.hidden_rows_sent == prompt_len + 8


async def test_model_head_exit_answers_everything_at_a_tiny_threshold(edge_model, manager, split_runtime) -> None:  # type: ignore[no-untyped-def]
    """The model's own norm + head at layer k as the exit: the logit lens, sent nothing."""
    opts = SplitOptions(split_layer=5, compression="fp32", exit_threshold=1e-9)
    async with EdgeClient(edge_model, InProcessCloud(manager), mode="split") as client:
        r = await client.generate("exits", max_new_tokens=6, split=opts)
        ids = ids_of(client, "exits")
    s = r.stats
    assert isinstance(s, SplitStats) and s.exit_kind == "model-head"
    assert set(r.origins) == {Origin.EDGE_EXIT} and s.early_exits == 6
    assert s.messages == 0 and s.hidden_bytes_sent == 0  # nothing left the device
    state = split_runtime.new_state()
    try:
        expected = []
        hidden = split_runtime.run_layers(state, split_runtime.embed(ids), 0, 5)
        for _ in range(6):
            token = int(split_runtime.head(hidden[-1:])[0].argmax())
            expected.append(token)
            hidden = split_runtime.run_layers(state, split_runtime.embed([token]), 0, 5)
    finally:
        split_runtime.release(state)
    assert list(r.token_ids) == expected


async def test_split_model_loaded_with_fewer_layers(tiny_hf_dir_6, edge_model, manager) -> None:  # type: ignore[no-untyped-def]
    model = SplitModel.load(str(tiny_hf_dir_6), layers=2)
    try:
        assert (model.layers_held, model.num_layers) == (2, SPLIT_LAYERS)
        async with EdgeClient(edge_model, InProcessCloud(manager), split_model=model) as client:
            full = await client.generate("prefix only", mode="cloud", max_new_tokens=10)
            split = await client.generate("prefix only", mode="split", max_new_tokens=10,
                                          split=SplitOptions(split_layer=2, compression="fp32"))
            assert split.token_ids == full.token_ids
            with pytest.raises(ConfigurationError, match="past the 2 layers the device holds"):
                await client.generate("x", mode="split", split=SplitOptions(split_layer=3))
    finally:
        model.close()


@pytest.fixture(scope="module")
def tiny_hf_dir_6(tmp_path_factory: pytest.TempPathFactory, split_hf):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("tiny-split")
    split_hf.save_pretrained(path)
    return path


async def test_mismatched_model_is_refused(edge_model, manager, draft_hf) -> None:  # type: ignore[no-untyped-def]
    from tether.runtime import TorchCausalLM

    wrong = SplitModel(TorchCausalLM(draft_hf, name="other"))
    try:
        async with EdgeClient(edge_model, InProcessCloud(manager), split_model=wrong) as client:
            with pytest.raises(ConfigurationError, match="split mode needs the same model on both sides"):
                await client.generate("x", mode="split", split=SplitOptions(split_layer=1))
    finally:
        wrong.close()


def test_options_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="split_layer must be an int >= 1 or 'auto'"):
        SplitOptions(split_layer=0)
    with pytest.raises(ConfigurationError, match="unknown compression 'zip'"):
        SplitOptions(compression="zip")
    with pytest.raises(ConfigurationError, match=r"exit_threshold must be in \(0, 1\]"):
        SplitOptions(exit_threshold=1.5)
    with pytest.raises(ConfigurationError, match="max_layers"):
        SplitOptions(min_layers=4, max_layers=2)


async def test_out_of_range_layer(edge_model, manager) -> None:  # type: ignore[no-untyped-def]
    async with EdgeClient(edge_model, InProcessCloud(manager)) as client:
        with pytest.raises(ConfigurationError, match=r"split_layer must be in \[1, 5\]"):
            await client.generate("x", mode="split", split=SplitOptions(split_layer=6))


async def test_link_drop_falls_back_and_resends_rows(edge_model, manager, split_runtime) -> None:  # type: ignore[no-untyped-def]
    from tether.edge import ResilienceOptions

    link = EmulatedLink(InProcessCloud(manager))
    res = ResilienceOptions(request_timeout=2.0, backoff_initial=0.01, backoff_max=0.02)
    async with EdgeClient(edge_model, link, mode="split", resilience=res,
                          split=SplitOptions(split_layer=3, compression="fp32")) as client:
        gen = client.stream("drop the link", max_new_tokens=24)
        seen = 0
        async for tok in gen:
            seen += 1
            if seen == 3:
                link.sever()
            if seen == 6:
                link.restore()
        r = gen.result
    s = r.stats
    assert isinstance(s, SplitStats)
    assert s.degraded and s.link_failures >= 1 and s.reconnects >= 1
    assert Origin.EDGE_ONLY in r.origins and r.origins[-1] is Origin.CLOUD_GENERATED
    assert s.resent_rows > 0
    # after the reconnect the cloud continues from every position, the edge-only ones included:
    # the last token equals the full model's greedy choice after the committed sequence
    ids = ids_of(client, "drop the link") + list(r.token_ids)
    last_cloud = max(i for i, o in enumerate(r.origins) if o is Origin.CLOUD_GENERATED)
    prefix = ids[: len(ids) - len(r.token_ids) + last_cloud]
    state = split_runtime.new_state()
    try:
        logits = split_runtime.extend(state, prefix)[-1]
    finally:
        split_runtime.release(state)
    assert int(logits.argmax()) == r.token_ids[last_cloud]


async def test_local_client_shares_the_cloud_model(edge_model, split_runtime) -> None:  # type: ignore[no-untyped-def]
    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager
    from tether.edge import LazyCloud

    async def build() -> Any:
        m = SessionManager(split_runtime, config=CloudConfig(batch_window_s=0.0))
        await m.start()
        return InProcessCloud(m, owns=True)

    async with EdgeClient(edge_model, EmulatedLink(LazyCloud(build)), mode="split",
                          split=SplitOptions(split_layer=4, compression="bf16")) as client:
        r = await client.generate("share", max_new_tokens=5)
        assert len(r.token_ids) == 5 and isinstance(r.stats, SplitStats)
        source = client._split_source
        assert source._shared is not None and source._shared.runtime is split_runtime



async def test_long_prompt_goes_in_several_capped_messages(edge_model, manager, split_runtime) -> None:  # type: ignore[no-untyped-def]
    cloud = RecordingCloud(manager)
    prompt = "0123456789" * 60  # 600 tokens; fp32 rows of 64 floats: 256 rows per 64 KiB message
    opts = SplitOptions(split_layer=3, compression="fp32", max_message_bytes=65536)
    async with EdgeClient(edge_model, cloud, mode="split", split=opts) as client:
        r = await client.generate(prompt, max_new_tokens=4)
        expected = reference_greedy(split_runtime, ids_of(client, prompt), 4, edge_model.eos_token_ids)
    assert [n for n, _ in cloud.calls][:3] == [256, 256, 88]
    assert list(r.token_ids) == expected
    assert isinstance(r.stats, SplitStats) and r.stats.prompt_rows == 600 and r.stats.rounds == 4


async def test_sampling_is_seeded(edge_model, manager) -> None:  # type: ignore[no-untyped-def]
    async with EdgeClient(edge_model, InProcessCloud(manager), mode="split",
                          split=SplitOptions(split_layer=2, compression="bf16", exit_threshold=0.3)) as client:
        a = await client.generate("sample me", max_new_tokens=12, temperature=1.0, seed=7)
        b = await client.generate("sample me", max_new_tokens=12, temperature=1.0, seed=7)
        c = await client.generate("sample me", max_new_tokens=12, temperature=1.0, seed=8)
    assert a.token_ids == b.token_ids and a.origins == b.origins
    assert a.token_ids != c.token_ids


class LensCopy:
    """An exit that proposes what the model's own head proposes (or, `wrong`, one token off)."""

    layer = None

    def __init__(self, runtime: Any, wrong: bool = False) -> None:
        self.runtime, self.wrong = runtime, wrong

    def propose(self, hidden: torch.Tensor, **_: Any) -> Any:
        from tether.edge.split._exit_head import ExitProposal

        token = int(self.runtime.head(hidden.reshape(1, -1))[0].argmax())
        return ExitProposal(token=token + 1 if self.wrong else token, confidence=1.0)


@pytest.mark.parametrize("wrong", [False, True])
async def test_confirmed_exit_needs_both_heads_to_agree(edge_model, manager, split_runtime, wrong: bool) -> None:  # type: ignore[no-untyped-def]
    """exit_confirm: the device exits only where the model's own head proposes the same token."""
    opts = SplitOptions(split_layer=5, compression="fp32", exit_threshold=1e-9, exit_confirm=True,
                        exit_head=LensCopy(split_runtime, wrong))  # type: ignore[arg-type]
    async with EdgeClient(edge_model, InProcessCloud(manager), mode="split") as client:
        r = await client.generate("confirm", max_new_tokens=5, split=opts)
    s = r.stats
    assert isinstance(s, SplitStats) and s.exit_kind == "confirmed"
    if wrong:  # never confirmed: every token comes from the cloud
        assert set(r.origins) == {Origin.CLOUD_GENERATED} and s.early_exits == 0
    else:
        assert set(r.origins) == {Origin.EDGE_EXIT} and s.early_exits == 5


def test_exit_confirm_needs_an_exit_head() -> None:
    with pytest.raises(ConfigurationError, match="exit_confirm needs an exit_head to confirm"):
        SplitOptions(exit_threshold=0.9, exit_confirm=True)


async def test_split_ends_at_the_cloud_sessions_max_tokens(edge_model, split_runtime) -> None:  # type: ignore[no-untyped-def]
    """Reaching max_tokens is the end of the text ("length"), not a dropped link; a longer prompt is refused first."""
    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager
    from tether.edge import ContextLengthExceeded, ResilienceOptions

    prompt = "hello split world"
    n_prompt = len(build_prompt(edge_model.tokenizer, prompt, chat_template=None, system=None))
    async with SessionManager(split_runtime, config=CloudConfig(batch_window_s=0.0, max_tokens=n_prompt + 5)) as m:
        async with EdgeClient(edge_model, InProcessCloud(m), mode="split",
                              resilience=ResilienceOptions(on_disconnect="raise"),
                              split=SplitOptions(split_layer=2, compression="fp32")) as client:
            r = await client.generate(prompt, max_new_tokens=20)
            expected = reference_greedy(split_runtime, ids_of(client, prompt), 5, edge_model.eos_token_ids)
            assert list(r.token_ids) == expected
            if len(expected) == 5:
                assert r.finish_reason == "length"
            assert not r.stats.degraded and r.stats.link_failures == 0
            with pytest.raises(ContextLengthExceeded, match=f"holds at most {n_prompt + 5}"):
                await client.generate(prompt + "x" * 6, max_new_tokens=4)
