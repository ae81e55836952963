"""The real default pair: greedy speculative output equals the cloud model's, prompt by prompt.

One test process at a time (both models take ~10 GiB): run it under
``flock /tmp/tether-bigmem.lock``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

from benchmarks.prompts import CHAT_PROMPTS

PROMPTS = CHAT_PROMPTS[:3]  # a few only: the suite must stay short on a 2-core CPU


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real_client() -> AsyncIterator[Any]:
    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager
    from tether.edge import EdgeClient, EdgeModel, InProcessCloud
    from tether.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL
    from tether.runtime._loader import load_runtime

    cloud_rt, tokenizer = load_runtime(DEFAULT_CLOUD_MODEL, "torch", progress=False)
    manager = SessionManager(cloud_rt, tokenizer=tokenizer, config=CloudConfig(batch_window_s=0.0))
    await manager.start()
    edge = EdgeModel.load(DEFAULT_EDGE_MODEL, backend="torch", progress=False)
    try:
        yield EdgeClient(edge, InProcessCloud(manager))
    finally:
        await manager.aclose()
        edge.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_greedy_speculative_equals_cloud_on_real_pair(real_client) -> None:  # type: ignore[no-untyped-def]
    drafted = accepted = 0
    mismatches = []
    for prompt in PROMPTS:
        cloud = await real_client.generate(prompt, mode="cloud", max_new_tokens=12)
        spec = await real_client.generate(prompt, mode="speculative", max_new_tokens=12)
        if spec.token_ids != cloud.token_ids:
            mismatches.append((prompt, cloud.text, spec.text))
        assert not spec.stats.degraded
        drafted += spec.stats.drafted_tokens
        accepted += spec.stats.accepted_tokens
        assert spec.stats.cloud_forward_passes < cloud.stats.cloud_forward_passes or len(spec.token_ids) <= 2
    assert not mismatches, mismatches
    assert accepted / drafted > 0.3
