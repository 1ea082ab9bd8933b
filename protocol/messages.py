"""Typed, frozen message records and their strict msgpack mapping.

Every wire message is a ``@message`` class: a frozen, slotted, keyword-only
dataclass with a stable ``KIND`` string (its wire name), the ``ACTOR`` that
handles it on the receiving node, and a one-line ``describe()``. Nested values
are ``@record`` classes. The codec is derived from the annotations, so there is
no list of fields to keep in sync by hand:

* ``int`` (default range 0..2**64-1), ``float`` (finite), ``bool``, ``str``,
  ``bytes``, ``tuple[T, ...]``, ``T | None``, records.
* Bounds come from ``typing.Annotated`` markers: ``Len(n)`` exact byte length,
  ``MaxLen(n)`` for str/bytes, ``MaxItems(n)`` for tuples, ``Range(lo, hi)`` for
  ints. Unannotated: str <= 1024 chars, bytes <= 65536, tuple <= 1024 items.

On the wire a message body (and every record) is a msgpack map from field name
(str) to value. Decoding rejects unknown fields, missing required fields, wrong
types and out-of-range values with ``MalformedError``; it never raises anything
else.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Annotated, ClassVar, get_args, get_origin

from .errors import LocalProtocolError, MalformedError
from .identity import public_key_from_peer_id

U64_MAX = 2**64 - 1
DEFAULT_MAX_STR = 1024
DEFAULT_MAX_BYTES = 65536
DEFAULT_MAX_ITEMS = 1024


@dataclass(frozen=True, slots=True)
class Len:
    """Exact length in bytes (for ``bytes``)."""

    n: int


@dataclass(frozen=True, slots=True)
class MaxLen:
    """Maximum length: characters for ``str``, bytes for ``bytes``."""

    n: int


@dataclass(frozen=True, slots=True)
class MaxItems:
    n: int


@dataclass(frozen=True, slots=True)
class Range:
    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class PeerIdMark:
    """Marks a ``str`` field that must be a canonical peer id (52 chars base32)."""


# ---------------------------------------------------------------- field codecs


class _Codec:
    __slots__ = ()

    def check(self, value: Any, path: str) -> Any:  # wire value -> python
        raise NotImplementedError

    def dump(self, value: Any) -> Any:  # python -> wire value
        return value


class _Int(_Codec):
    __slots__ = ("lo", "hi")

    def __init__(self, lo: int = 0, hi: int = U64_MAX) -> None:
        self.lo, self.hi = lo, hi

    def check(self, value: Any, path: str) -> int:
        if type(value) is not int:
            raise MalformedError(f"{path}: expected int, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise MalformedError(f"{path}: {value} outside [{self.lo}, {self.hi}]")
        return value

    def dump(self, value: Any) -> int:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise LocalProtocolError(f"int field value {value!r} outside [{self.lo}, {self.hi}]")
        return value


class _Float(_Codec):
    __slots__ = ()

    def check(self, value: Any, path: str) -> float:
        if type(value) is int and abs(value) < 2**53:
            value = float(value)
        if type(value) is not float or not math.isfinite(value):
            raise MalformedError(f"{path}: expected a finite float")
        return value


class _Bool(_Codec):
    __slots__ = ()

    def check(self, value: Any, path: str) -> bool:
        if type(value) is not bool:
            raise MalformedError(f"{path}: expected bool")
        return value


class _Str(_Codec):
    __slots__ = ("max_len",)

    def __init__(self, max_len: int = DEFAULT_MAX_STR) -> None:
        self.max_len = max_len

    def check(self, value: Any, path: str) -> str:
        if type(value) is not str:
            raise MalformedError(f"{path}: expected str, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise MalformedError(f"{path}: longer than {self.max_len} characters")
        return value

    def dump(self, value: Any) -> str:
        if type(value) is not str or len(value) > self.max_len:
            raise LocalProtocolError(f"str field must be a str of <= {self.max_len} characters")
        return value


class _PeerId(_Str):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(52)

    def check(self, value: Any, path: str) -> str:
        value = super().check(value, path)  # a str first: the key lookup below is cached by value
        try:
            public_key_from_peer_id(value)
        except MalformedError as exc:
            raise MalformedError(f"{path}: {exc}") from None
        return value

    def dump(self, value: Any) -> str:
        if type(value) is not str:
            raise LocalProtocolError(f"not a peer id: a {type(value).__name__}")
        try:
            public_key_from_peer_id(value)
        except MalformedError as exc:
            raise LocalProtocolError(f"not a peer id: {exc}") from None
        return value


class _Bytes(_Codec):
    __slots__ = ("exact", "max_len")

    def __init__(self, exact: int | None = None, max_len: int = DEFAULT_MAX_BYTES) -> None:
        self.exact, self.max_len = exact, max_len

    def check(self, value: Any, path: str) -> bytes:
        if type(value) is not bytes:
            raise MalformedError(f"{path}: expected bytes, got {type(value).__name__}")
        if self.exact is not None and len(value) != self.exact:
            raise MalformedError(f"{path}: expected exactly {self.exact} bytes")
        if len(value) > self.max_len:
            raise MalformedError(f"{path}: longer than {self.max_len} bytes")
        return value

    def dump(self, value: Any) -> bytes:
        if type(value) is not bytes or len(value) > self.max_len or (
                self.exact is not None and len(value) != self.exact):
            raise LocalProtocolError(f"bytes field must be bytes of <= {self.max_len} bytes"
                                     + (f" (exactly {self.exact})" if self.exact is not None else ""))
        return value


class _Tuple(_Codec):
    __slots__ = ("item", "max_items")

    def __init__(self, item: _Codec, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        self.item, self.max_items = item, max_items

    def check(self, value: Any, path: str) -> tuple:
        if type(value) is not list:
            raise MalformedError(f"{path}: expected array")
        if len(value) > self.max_items:
            raise MalformedError(f"{path}: more than {self.max_items} items")
        return tuple(self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value))

    def dump(self, value: Any) -> list:
        if len(value) > self.max_items:
            raise LocalProtocolError(f"sequence field has more than {self.max_items} items")
        return [self.item.dump(v) for v in value]


class _Optional(_Codec):
    __slots__ = ("inner",)

    def __init__(self, inner: _Codec) -> None:
        self.inner = inner

    def check(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.check(value, path)

    def dump(self, value: Any) -> Any:
        return None if value is None else self.inner.dump(value)


class _Record(_Codec):
    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def check(self, value: Any, path: str) -> Any:
        return decode_fields(self.cls, value, path)

    def dump(self, value: Any) -> dict:
        return encode_fields(value)


def _codec_for(tp: Any, marks: tuple = ()) -> _Codec:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extra = get_args(tp)
        return _codec_for(base, marks + tuple(extra))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(get_args(tp)) != 2:
            raise LocalProtocolError(f"only 'T | None' unions are supported, got {tp}")
        return _Optional(_codec_for(args[0], marks))
    if origin is tuple:
        args = get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise LocalProtocolError("use tuple[T, ...] for sequences")
        max_items = next((m.n for m in marks if isinstance(m, MaxItems)), DEFAULT_MAX_ITEMS)
        inner_marks = tuple(m for m in marks if not isinstance(m, MaxItems))
        return _Tuple(_codec_for(args[0], inner_marks), max_items)
    if tp is bool:
        return _Bool()
    if tp is int:
        rng = next((m for m in marks if isinstance(m, Range)), None)
        return _Int(rng.lo, rng.hi) if rng else _Int()
    if tp is float:
        return _Float()
    if tp is str:
        if any(isinstance(m, PeerIdMark) for m in marks):
            return _PeerId()
        return _Str(next((m.n for m in marks if isinstance(m, MaxLen)), DEFAULT_MAX_STR))
    if tp is bytes:
        exact = next((m.n for m in marks if isinstance(m, Len)), None)
        max_len = next((m.n for m in marks if isinstance(m, MaxLen)), DEFAULT_MAX_BYTES)
        return _Bytes(exact, max(max_len, exact or 0))
    if isinstance(tp, type) and hasattr(tp, "__chimera_fields__"):
        return _Record(tp)
    raise LocalProtocolError(f"unsupported field type {tp!r}")


def _build_fields(cls: type) -> None:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        fields.append((f.name, _codec_for(hints[f.name]), required))
    cls.__chimera_fields__ = tuple(fields)


def encode_fields(obj: Any) -> dict:
    """Wire map of a record or message (nested records become maps)."""
    return {name: codec.dump(getattr(obj, name)) for name, codec, _ in obj.__chimera_fields__}


PeerId = Annotated[str, PeerIdMark()]


def reject_duplicate_keys(pairs: list) -> dict:
    """msgpack ``object_pairs_hook``: a map with a repeated key is malformed."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise MalformedError("map with a duplicate key")
    return out


def decode_fields(cls: type, value: Any, path: str = "body") -> Any:
    """Build ``cls`` from its wire map. Raises ``MalformedError`` only."""
    if type(value) is not dict:
        raise MalformedError(f"{path}: expected map")
    spec = cls.__chimera_fields__
    known = {name for name, _, _ in spec}
    for key in value:
        if key not in known:
            raise MalformedError(f"{path}: unknown field {str(key)[:32]!r}")
    kwargs = {}
    for name, codec, required in spec:
        if name in value:
            kwargs[name] = codec.check(value[name], f"{path}.{name}")
        elif required:
            raise MalformedError(f"{path}: missing field {name!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ invariants
        raise MalformedError(f"{path}: {exc}") from exc


# ------------------------------------------------------------------ registries

_T = typing.TypeVar("_T")
MESSAGE_TYPES: dict[str, type] = {}


def record(cls: type[_T]) -> type[_T]:
    """Make ``cls`` a frozen wire record (nested value inside messages)."""
    cls = dataclass(frozen=True, slots=True, kw_only=True)(cls)
    _build_fields(cls)
    return cls


def message(kind: str, *, actor: str) -> typing.Callable[[type[_T]], type[_T]]:
    """Register a wire message class under ``kind`` handled by local ``actor``."""

    def wrap(cls: type[_T]) -> type[_T]:
        if kind in MESSAGE_TYPES:
            raise LocalProtocolError(f"message kind {kind!r} registered twice")
        cls = record(cls)
        cls.KIND = kind
        cls.ACTOR = actor
        MESSAGE_TYPES[kind] = cls
        return cls

    return wrap


class Message(typing.Protocol):
    KIND: ClassVar[str]
    ACTOR: ClassVar[str]

    def describe(self) -> str: ...
