"""The real cloud model (Qwen2.5-Coder-1.5B) split in two: fp32 split greedy == the unsplit model, token for token.

One loaded copy (~7 GiB) serves both halves and the cloud; run under
``flock /tmp/tether-bigmem.lock``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPTS = (
    "Write a Python function that checks whether a number is prime.",
    "Write a SQL query that counts rows per category in a table named items.",
)  # two prompts only: real-model tests stay few and short (the suite's 15-minute budget)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real() -> AsyncIterator[Any]:
    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager
    from tether.edge import EdgeClient, EdgeModel, InProcessCloud, SplitModel
    from tether.models import DEFAULT_CLOUD_MODEL
    from tether.runtime._loader import load_runtime

    rt, tok = load_runtime(DEFAULT_CLOUD_MODEL, "torch", progress=False)
    manager = SessionManager(rt, tokenizer=tok, model_name=DEFAULT_CLOUD_MODEL, config=CloudConfig(batch_window_s=0.0))
    await manager.start()
    edge = EdgeModel(rt, tok)  # the tokenizer; the model would only run if the link dropped
    split_model = SplitModel(rt, name=DEFAULT_CLOUD_MODEL)
    try:
        yield EdgeClient(edge, InProcessCloud(manager), split_model=split_model)
    finally:
        split_model.close()
        edge.close()
        await manager.aclose()


@pytest.mark.asyncio(loop_scope="module")
async def test_fp32_split_equals_the_unsplit_model(real) -> None:  # type: ignore[no-untyped-def]
    from tether.edge import Origin, SplitOptions, SplitStats

    mismatches = []
    for i, prompt in enumerate(PROMPTS):
        cloud = await real.generate(prompt, mode="cloud", max_new_tokens=16)
        for k in ((7, 21) if i == 0 else (14,)):
            split = await real.generate(prompt, mode="split", max_new_tokens=16,
                                        split=SplitOptions(split_layer=k, compression="fp32"))
            if split.token_ids != cloud.token_ids:
                mismatches.append((prompt, k, cloud.text, split.text))
            s = split.stats
            assert isinstance(s, SplitStats) and set(split.origins) == {Origin.CLOUD_GENERATED}
            assert s.hidden_bytes_sent == s.hidden_rows_sent * 1536 * 4
    assert not mismatches, mismatches


@pytest.mark.asyncio(loop_scope="module")
async def test_int8_and_early_exit_run_on_the_real_model(real) -> None:  # type: ignore[no-untyped-def]
    from tether.edge import SplitOptions, SplitStats

    cloud = await real.generate(PROMPTS[0], mode="cloud", max_new_tokens=16)
    int8 = await real.generate(PROMPTS[0], mode="split", max_new_tokens=16,
                               split=SplitOptions(split_layer=14, compression="int8"))
    assert isinstance(int8.stats, SplitStats) and int8.stats.hidden_bytes_sent == int8.stats.hidden_rows_sent * 1540
    same = sum(1 for _ in zip(int8.token_ids, cloud.token_ids))
    assert int8.token_ids[:8] == cloud.token_ids[:8], (same, int8.text, cloud.text)
    exit21 = await real.generate(PROMPTS[0], mode="split", max_new_tokens=16,
                                 split=SplitOptions(split_layer=21, compression="int8", exit_threshold=0.9))
    assert isinstance(exit21.stats, SplitStats) and exit21.stats.exit_kind == "model-head"
    assert exit21.stats.early_exits > 0  # the logit lens at 3/4 depth is sure of some tokens
