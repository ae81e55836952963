"""Typed records as data: how message fields are validated and mapped to metadata and tensors.

What belongs here: the generic machinery behind every message class (field converters,
tensor field specs, equality, repr). The catalogue itself lives in `_messages.py`.
A record's fields are either *metadata* (int, float, bool, str, IntEnum, nested records,
tuples of those, optional) or *tensors* (`np.ndarray` or `Tensor`, declared with
`tensor_field`), in declaration order; a tensor field's index among the tensor fields is
its wire slot.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from tether.errors import TetherError
from tether.protocol._errors import BadMetadata, BadTensor, InvalidMessage
from tether.protocol._metadata import INT64_MAX, INT64_MIN
from tether.protocol._tensors import _FROM_NUMPY, DType, Tensor

__all__ = ["Record", "TensorSpec", "embed", "late_field", "tensor_field"]

Converter = Callable[[Any, str, bool], Any]


class TensorFieldInvalid(InvalidMessage):
    """A cross-field rule about tensors failed (mapped to BadTensor when decoding)."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What a tensor field accepts: wire dtypes and (optionally) a fixed rank."""

    dtypes: tuple[DType, ...]
    ndim: int | None = None

    def describe(self) -> str:
        return ", ".join(d.name for d in self.dtypes)


def tensor_field(*dtypes: DType, ndim: int | None = None, optional: bool = False) -> Any:
    """Declare a tensor field (the dataclass default is None when `optional`)."""
    spec = TensorSpec(tuple(dtypes), ndim)
    if optional:
        return dataclasses.field(default=None, metadata={"tensor": spec})
    return dataclasses.field(metadata={"tensor": spec})


def late_field() -> Any:
    """Declare an optional metadata field added after a message type first shipped.

    It defaults to None and is left out of the encoding while None, so a peer that predates
    it (and rejects unknown fields) still decodes the message whenever it is unset.
    """
    return dataclasses.field(default=None, metadata={"omit_if_none": True})


@dataclass(frozen=True, slots=True)
class FieldInfo:
    name: str
    required: bool
    convert: Converter | None = None  # metadata fields
    to_json: Callable[[Any], Any] | None = None
    tensor: TensorSpec | None = None  # tensor fields
    as_tensor: bool = False  # field holds a Tensor (else an np.ndarray)
    optional: bool = False
    slot: int = -1
    default: Any = None  # used when a decoded message omits an optional field
    default_factory: Callable[[], Any] | None = None
    omit_if_none: bool = False  # a `late_field`: not encoded while None

    def default_value(self) -> Any:
        return self.default_factory() if self.default_factory is not None else self.default


def _err(remote: bool, text: str) -> Exception:
    return BadMetadata(text) if remote else InvalidMessage(text)


def _conv_int(value: Any, path: str, remote: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _err(remote, f"{path}: expected an integer, got {type(value).__name__}")
    number = int(value)
    if not INT64_MIN <= number <= INT64_MAX:
        raise _err(remote, f"{path}: integer outside signed 64 bits")
    return number


def _conv_float(value: Any, path: str, remote: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise _err(remote, f"{path}: expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise _err(remote, f"{path}: number must be finite")
    return number


def _conv_bool(value: Any, path: str, remote: bool) -> bool:
    if not isinstance(value, bool):
        raise _err(remote, f"{path}: expected true or false, got {type(value).__name__}")
    return value


def _conv_str(value: Any, path: str, remote: bool) -> str:
    if not isinstance(value, str):
        raise _err(remote, f"{path}: expected a string, got {type(value).__name__}")
    return value


def _identity(value: Any) -> Any:
    return value


def _make_converter(tp: Any) -> tuple[Converter, Callable[[Any], Any]]:
    """(validate/convert, to_json) for a metadata annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"unsupported union {tp!r}")
        inner, inner_json = _make_converter(members[0])

        def conv_optional(value: Any, path: str, remote: bool) -> Any:
            return None if value is None else inner(value, path, remote)

        return conv_optional, (lambda v: None if v is None else inner_json(v))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"only tuple[T, ...] is supported, not {tp!r}")
        item, item_json = _make_converter(args[0])

        def conv_tuple(value: Any, path: str, remote: bool) -> tuple[Any, ...]:
            if not isinstance(value, list) and (remote or not isinstance(value, tuple)):
                raise _err(remote, f"{path}: expected a list, got {type(value).__name__}")
            return tuple(item(v, f"{path}[{i}]", remote) for i, v in enumerate(value))

        return conv_tuple, (lambda v: [item_json(x) for x in v])
    if isinstance(tp, type) and issubclass(tp, enum.IntEnum):
        enum_type = tp

        def conv_enum(value: Any, path: str, remote: bool) -> Any:
            number = _conv_int(value, path, remote)
            try:
                return enum_type(number)
            except ValueError:
                raise _err(remote, f"{path}: {number} is not a known {enum_type.__name__}") from None

        return conv_enum, int
    if isinstance(tp, type) and tp in _EMBEDDED:
        return _embedded_converter(tp)
    if isinstance(tp, type) and issubclass(tp, Record):
        record_type = tp

        def conv_record(value: Any, path: str, remote: bool) -> Any:
            if isinstance(value, record_type) and not remote:
                return value
            if not isinstance(value, dict):
                raise _err(remote, f"{path}: expected an object, got {type(value).__name__}")
            return record_type._from_metadata(value, path, remote)

        return conv_record, (lambda v: v._to_metadata())
    simple: dict[Any, Converter] = {int: _conv_int, float: _conv_float, bool: _conv_bool, str: _conv_str}
    if tp in simple:
        return simple[tp], _identity
    raise TypeError(f"unsupported field type {tp!r}")


# Frozen dataclasses defined outside the protocol (the session contract's values) that
# messages embed as nested metadata objects: class -> the fields that travel, in order.
_EMBEDDED: dict[type, tuple[str, ...]] = {}


def embed(cls: type, *, fields: tuple[str, ...]) -> None:
    """Let messages carry `cls` (a frozen dataclass defined elsewhere) as a nested object.

    Only `fields` travel (a field left out must have a default, e.g. the contract's
    `SamplingParams.seed`, which the messages carry beside it). Building the value runs the
    class's own validation, so the wire and the API share one rule; on decode its errors
    become `BadMetadata`.

    Args:
        cls: a frozen, keyword-constructible dataclass.
        fields: the names of the fields that go on the wire.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    missing = [f for f in fields if f not in names]
    if missing:
        raise TypeError(f"{cls.__name__} has no fields {missing}")
    _EMBEDDED[cls] = tuple(fields)


def _embedded_converter(cls: type) -> tuple[Converter, Callable[[Any], Any]]:
    hints = typing.get_type_hints(cls)
    names = _EMBEDDED[cls]
    convs = {n: _make_converter(hints[n]) for n in names}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}

    def conv_embedded(value: Any, path: str, remote: bool) -> Any:
        if isinstance(value, cls) and not remote:
            return value
        if not isinstance(value, dict):
            raise _err(remote, f"{path}: expected an object, got {type(value).__name__}")
        for key in value:
            if key not in convs:
                raise _err(remote, f"{path}: unknown field {key!r}")
        for name in required:
            if name not in value:
                raise _err(remote, f"{path}: missing field {name!r}")
        kwargs = {n: convs[n][0](value[n], f"{path}.{n}", remote) for n in names if n in value}
        try:
            return cls(**kwargs)
        except (TetherError, ValueError) as exc:  # the contract's own rule, reported at this path
            raise _err(remote, f"{path}: {exc}") from None

    def to_json(value: Any) -> dict[str, Any]:
        return {n: convs[n][1](convs[n][0](getattr(value, n), n, False)) for n in names}

    return conv_embedded, to_json


def _summary(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray({value.dtype}, shape={value.shape})"
    return repr(value)


class Record:
    """Base of frozen, slotted, keyword-only records that validate when built.

    Subclasses are declared with `@record` (or `@message` in `_messages.py`).
    Construction errors raise `InvalidMessage`; decoding errors raise `BadMetadata` or
    `BadTensor`.
    """

    __slots__ = ()
    FIELDS: ClassVar[tuple[FieldInfo, ...]] = ()
    TENSOR_FIELDS: ClassVar[tuple[FieldInfo, ...]] = ()

    def __post_init__(self) -> None:
        name = type(self).__name__
        for info in self.FIELDS:
            value = getattr(self, info.name)
            if info.tensor is not None:
                new = _convert_tensor_local(info, value, f"{name}.{info.name}")
            else:
                assert info.convert is not None
                new = info.convert(value, f"{name}.{info.name}", False)
            if new is not value:
                object.__setattr__(self, info.name, new)
        self._check()

    def _check(self) -> None:
        """Cross-field rules; raise InvalidMessage (or TensorFieldInvalid) when broken."""

    def _to_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for info in self.FIELDS:
            if info.tensor is None:
                assert info.to_json is not None
                value = getattr(self, info.name)
                if value is None and info.omit_if_none:
                    continue
                out[info.name] = info.to_json(value)
        return out

    @classmethod
    def _from_metadata(
        cls, meta: dict[str, Any], path: str, remote: bool, tensors: dict[str, Any] | None = None
    ) -> Any:
        known = {info.name for info in cls.FIELDS if info.tensor is None}
        for key in meta:
            if key not in known:
                raise _err(remote, f"{path}: unknown field {key!r}")
        kwargs: dict[str, Any] = dict(tensors or {})
        for info in cls.FIELDS:
            if info.tensor is not None:
                continue
            if info.name in meta:
                assert info.convert is not None
                kwargs[info.name] = info.convert(meta[info.name], f"{path}.{info.name}", remote)
            elif info.required:
                raise _err(remote, f"{path}: missing field {info.name!r}")
        try:
            if not remote:
                return cls(**kwargs)
            # Decoded values were converted above (and tensors checked by the frame decoder),
            # so build without converting twice; the cross-field rules still run.
            obj = object.__new__(cls)
            for info in cls.FIELDS:
                value = kwargs[info.name] if info.name in kwargs else info.default_value()
                object.__setattr__(obj, info.name, value)
            obj._check()
            return obj
        except TensorFieldInvalid as exc:
            if remote:
                raise BadTensor(str(exc)) from None
            raise
        except InvalidMessage as exc:
            if remote:
                raise BadMetadata(str(exc)) from None
            raise

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for info in self.FIELDS:
            a, b = getattr(self, info.name), getattr(other, info.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not (
                    isinstance(a, np.ndarray)
                    and isinstance(b, np.ndarray)
                    and a.dtype == b.dtype
                    and a.shape == b.shape
                    and a.tobytes() == b.tobytes()
                ):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.repr:
                parts.append(f"{f.name}={_summary(getattr(self, f.name))}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _convert_tensor_local(info: FieldInfo, value: Any, path: str) -> Any:
    spec = info.tensor
    assert spec is not None
    if value is None:
        if info.optional:
            return None
        raise InvalidMessage(f"{path}: a tensor is required")
    if info.as_tensor:
        if isinstance(value, np.ndarray):
            value = Tensor.from_numpy(value)
        if not isinstance(value, Tensor):
            raise InvalidMessage(f"{path}: expected a Tensor or numpy array, got {type(value).__name__}")
        if value.dtype not in spec.dtypes:
            raise InvalidMessage(f"{path}: dtype {value.dtype.name} not allowed ({spec.describe()})")
        ndim = len(value.shape)
    else:
        if isinstance(value, Tensor):
            value = value.data if value.dtype in (DType.FLOAT32, DType.FLOAT16, DType.INT32, DType.INT64) else value
        if isinstance(value, (list, tuple)):
            default = {DType.INT32: np.int32, DType.INT64: np.int64, DType.FLOAT32: np.float32}[spec.dtypes[0]]
            try:
                value = np.asarray(value, dtype=default)
            except (OverflowError, ValueError, TypeError) as exc:
                raise InvalidMessage(f"{path}: cannot convert to {np.dtype(default)}: {exc}") from None
        if not isinstance(value, np.ndarray):
            raise InvalidMessage(f"{path}: expected a numpy array, got {type(value).__name__}")
        wire = _FROM_NUMPY.get(value.dtype.newbyteorder("=")) if value.dtype.byteorder != "|" else None
        if wire not in spec.dtypes:
            raise InvalidMessage(f"{path}: dtype {value.dtype} not allowed ({spec.describe()})")
        ndim = value.ndim
    if spec.ndim is not None and ndim != spec.ndim:
        raise InvalidMessage(f"{path}: expected {spec.ndim} dimensions, got {ndim}")
    return value


def check_decoded_tensor(info: FieldInfo, tensor: Tensor, path: str) -> Any:
    """Validate a decoded tensor against its field and return the field's value (BadTensor on failure)."""
    spec = info.tensor
    assert spec is not None
    if tensor.dtype not in spec.dtypes:
        raise BadTensor(f"{path}: dtype {tensor.dtype.name} not allowed ({spec.describe()})")
    if spec.ndim is not None and len(tensor.shape) != spec.ndim:
        raise BadTensor(f"{path}: expected {spec.ndim} dimensions, got {len(tensor.shape)}")
    return tensor if info.as_tensor else tensor.data


def build_fields(cls: type) -> tuple[FieldInfo, ...]:
    """Inspect a dataclass and build its FieldInfo tuple (called once per class)."""
    hints = typing.get_type_hints(cls)
    out = []
    slot = 0
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        spec = f.metadata.get("tensor")
        if spec is not None:
            args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
            base = [a for a in args if a is not type(None)][0]
            out.append(
                FieldInfo(
                    f.name,
                    required,
                    tensor=spec,
                    as_tensor=base is Tensor,
                    optional=type(None) in args,
                    slot=slot,
                )
            )
            slot += 1
        else:
            convert, to_json = _make_converter(tp)
            default = None if f.default is dataclasses.MISSING else f.default
            factory = None if f.default_factory is dataclasses.MISSING else f.default_factory
            out.append(
                FieldInfo(f.name, required, convert=convert, to_json=to_json, default=default, default_factory=factory,
                          omit_if_none=bool(f.metadata.get("omit_if_none")))
            )
    return tuple(out)


_R = typing.TypeVar("_R", bound=type)


def record(cls: _R) -> _R:
    """Finish a Record subclass: compute its field table (apply after @dataclass)."""
    fields = build_fields(cls)
    cls.FIELDS = fields  # type: ignore[attr-defined]
    cls.TENSOR_FIELDS = tuple(f for f in fields if f.tensor is not None)  # type: ignore[attr-defined]
    return cls
