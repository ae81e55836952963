"""One rule for sampling settings at every entry point: the edge, the contract and the wire
agree, so a bad value fails where it is given instead of degrading a generation later."""

from __future__ import annotations

from typing import Any

import pytest

from tether.contract import InvalidRequest, InvalidSampling, SamplingParams, validate_sampling
from tether.edge import EdgeClient
from tether.protocol import BadMetadata, OpenSession
from tether.sampling import validate_warp

BAD = [{"temperature": 150.0}, {"temperature": float("nan")}, {"temperature": -0.5}, {"top_p": 0.0},
       {"top_p": 1.5}, {"top_k": -1}]
GOOD = {"temperature": 0.7, "top_k": 0, "top_p": 1.0}


@pytest.mark.parametrize("bad", BAD)
def test_every_entry_point_refuses_the_same_values(bad: dict[str, Any], edge_model: Any) -> None:
    settings = {**GOOD, **bad}
    with pytest.raises(InvalidSampling) as contract:
        validate_sampling(**settings)
    assert isinstance(contract.value, InvalidRequest) and isinstance(contract.value, ValueError)
    with pytest.raises(InvalidSampling) as edge:
        validate_warp(**settings)
    with pytest.raises(InvalidSampling) as api:
        SamplingParams(**settings)
    assert str(edge.value) == str(api.value) == str(contract.value)
    # The edge refuses it when the generation is asked for, before anything runs.
    client = EdgeClient(edge_model, None, mode="edge")
    with pytest.raises(ValueError):
        client.stream("x", **settings)
    # A peer that sends it fails decoding, at the field's path.
    meta = OpenSession(model="m")._to_metadata()
    meta["sampling"] = {"temperature": GOOD["temperature"], "top_p": GOOD["top_p"], "top_k": GOOD["top_k"], **bad}
    with pytest.raises(BadMetadata, match="OpenSession.sampling"):
        OpenSession._from_metadata(meta, "OpenSession", True)


def test_the_edge_of_the_range_is_accepted_everywhere() -> None:
    validate_warp(temperature=100.0, top_k=0, top_p=1.0)
    meta = OpenSession(model="m", sampling=SamplingParams(temperature=100.0))._to_metadata()
    assert OpenSession._from_metadata(meta, "OpenSession", True).sampling.temperature == 100.0
