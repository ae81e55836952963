"""The metadata part of a frame: strict, bounded JSON.

What belongs here: turning a small dict of str/int/float/bool/null/list/object into bytes
and back, refusing everything else. Decoding never builds objects other than those JSON
types, rejects NaN/Infinity, duplicate keys, non-string keys, integers outside signed
64 bits and nesting deeper than the configured limit.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tether.protocol._errors import BadMetadata, InvalidMessage

__all__ = ["decode_metadata", "encode_metadata"]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), sort_keys=True)


def _reject_constant(name: str) -> Any:
    raise BadMetadata(f"metadata: {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadMetadata(f"metadata: duplicate key {key!r}")
        out[key] = value
    return out


def _check(value: Any, depth: int, max_depth: int, remote: bool) -> None:
    error = BadMetadata if remote else InvalidMessage
    if depth > max_depth:
        raise error(f"metadata nesting deeper than {max_depth}")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise error("metadata: integer outside signed 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise error("metadata: non-finite number")
        return
    if isinstance(value, list):
        for item in value:
            _check(item, depth + 1, max_depth, remote)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise error("metadata: object keys must be strings")
            _check(item, depth + 1, max_depth, remote)
        return
    raise error(f"metadata: {type(value).__name__} is not a JSON value")


def encode_metadata(obj: dict[str, Any], *, max_depth: int = 32, checked: bool = False) -> bytes:
    """Canonical UTF-8 JSON (sorted keys, no spaces) of a dict of JSON values.

    `checked=True` skips the value walk for dicts built from validated records.
    """
    if not isinstance(obj, dict):
        raise InvalidMessage("metadata must be a JSON object")
    if not checked:
        _check(obj, 1, max_depth, remote=False)
    return _ENCODER.encode(obj).encode("utf-8")


def _parse_int(text: str) -> int:
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise BadMetadata("metadata: integer outside signed 64 bits")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadMetadata("metadata: non-finite number")
    return value


def decode_metadata(data: bytes | memoryview, *, max_depth: int) -> dict[str, Any]:
    """Parse metadata bytes (size already checked by the caller) into a dict.

    Raises:
        BadMetadata: not UTF-8, not JSON, not an object, or breaking a rule above.
    """
    if len(data) == 0:
        return {}
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadMetadata("metadata is not UTF-8") from exc
    try:
        obj = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
            object_pairs_hook=_no_duplicates,
        )
    except RecursionError as exc:
        raise BadMetadata(f"metadata nesting deeper than {max_depth}") from exc
    except BadMetadata:
        raise
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise BadMetadata("metadata is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise BadMetadata("metadata must be a JSON object")
    # Numbers were checked while parsing; nesting can only exceed the limit if there are
    # more opening brackets than the limit, so the walk is skipped for ordinary metadata.
    if text.count("[") + text.count("{") > max_depth:
        _check(obj, 1, max_depth, remote=True)
    return obj
