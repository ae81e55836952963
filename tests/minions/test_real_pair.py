"""End to end with the real default pair on a small document (slow: loads both models).

The small pair's quality is measured by `tether bench minions`, not asserted here: the test
checks what must hold whatever the models say. The session ends with an answer or with a
clean `MinionsFailed`; the edge model did the reading; nothing of the document went to the
cloud except edge-written results; the cost counters add up.
"""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import REPORT
from .test_privacy import edge_written, leaks

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def real_client() -> Any:
    from tether.edge import Client

    client = Client.local(lazy=False)
    yield client
    client.close()


@pytest.mark.parametrize("mode", ["minions"])  # Minion is covered on tiny models; real-model tests stay few
def test_real_pair_answers_without_sending_the_document(real_client: Any, mode: str) -> None:
    from tether.edge import ChunkingOptions, MinionsFailed, MinionsOptions

    try:
        result = real_client.ask(
            "How many units did the Aurora team sell in March? Give the number.", documents=[REPORT], mode=mode,
            max_rounds=1, options=MinionsOptions(chunking=ChunkingOptions(max_tokens=64, min_tokens=16),
                                                 edge_max_tokens=48),
        )
    except MinionsFailed as exc:  # the 1.5B planner broke the schema twice: a clean, typed end
        result = exc.partial
        assert exc.errors
    cost = result.cost
    assert cost.cloud_calls >= 1 and cost.cloud_prompt_tokens > 0
    assert cost.whole_document_tokens > 0
    assert cost.cloud_calls == sum(len(r.cloud) for r in result.rounds)
    assert cost.edge_calls == sum(r.edge_runs for r in result.rounds)
    if result.answer is not None:
        assert cost.edge_calls >= 1  # the first turn must ask for edge work
    assert leaks(result.sent_to_cloud(), REPORT, edge_written(result)) == set()
    print(mode, repr(result.answer), cost.to_dict())
