"""The optional cost fields of replies: bounded, and absent from the encoding when unset."""

from __future__ import annotations

import numpy as np
import pytest

from tether.protocol import Generated, InvalidMessage, Verified
from tether.protocol._frames import decode_frame, encode_frame
from tether.protocol._limits import Limits


def _roundtrip(msg):  # type: ignore[no-untyped-def]
    frame = encode_frame(msg, request_id=7)
    buf = bytearray(frame.size)
    frame.write_into(memoryview(buf))
    return decode_frame(buf, Limits()).message


def test_cost_fields_roundtrip() -> None:
    msg = Verified(session_id="s", accepted=2, next_token=5, length=9, forward_passes=1, compute_s=0.25,
                       queue_s=0.01)
    back = _roundtrip(msg)
    assert back == msg and back.compute_s == 0.25 and back.forward_passes == 1


def test_unset_cost_fields_are_not_encoded() -> None:
    """A peer that predates the fields (and rejects unknown ones) still decodes the reply."""
    msg = Generated(session_id="s", length=3, tokens=np.array([1, 2], dtype=np.int64))
    assert not {"forward_passes", "compute_s", "queue_s"} & set(msg._to_metadata())
    back = _roundtrip(msg)
    assert back.compute_s is None and back.forward_passes is None


@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        ("forward_passes", -1, "Verified.forward_passes must be in [0, 1048576], got -1"),
        ("forward_passes", 1 << 21, "Verified.forward_passes must be in [0, 1048576], got 2097152"),
        ("compute_s", -0.5, "Verified.compute_s must be in [0, 86400] seconds, got -0.5"),
        ("queue_s", 1e9, "Verified.queue_s must be in [0, 86400] seconds, got 1000000000.0"),
    ],
)
def test_cost_fields_are_bounded(field: str, value: float, text: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        Verified(session_id="s", accepted=0, next_token=1, length=1, **{field: value})
    assert str(info.value) == text
