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
* ``OmitNone()`` on an optional field: left out of the wire map (not ``nil``)
  while ``None`` (a field old peers do not know, ``MemberUpdate.signature``).

On the wire a message body (and every record) is a msgpack map from field name
(str) to value. Decoding rejects unknown fields, missing required fields, wrong
types and out-of-range values with ``MalformedError``; it never raises anything
else.

Decoding has two forms of the same rules. The *reference* walks a record field
by field through each ``_Codec.check`` (``_decode_checked``): it is the
specification in code and the only thing that produces errors, with their
exact message and path. The *compiled* decoder (``_compile_decoder``, built
once when a record is declared) is a closure per record over closures per field
(``_Codec.fast_check``) making the same checks and conversions: no path
strings, no per-field method dispatch, no kwargs dict, and the instance built
the way the dataclass ``__init__`` builds it, without the call. Whenever it
raises anything, the reference runs on the same input and its outcome is the
answer, so the compiled code only has to agree with the reference on what it
accepts and what that becomes (``tests/test_codec.py`` holds both to a frozen
copy of the original codec). It decodes small records (a member row, a vote)
2-3x faster and a 256-value proposal about 4x (``benchmarks/bench_codec.py``).
Encoding is the reference alone: compiled the same way it was no faster.
"""

from __future__ import annotations

import dataclasses
import inspect
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


@dataclass(frozen=True, slots=True)
class OmitNone:
    """Marks an optional (``T | None``) field that the encoder leaves out of the wire map
    while it is ``None``, instead of writing ``nil``: a field added to a record after
    peers that reject unknown fields were deployed (PROTOCOL.md §7). Decoding is as for
    any optional field: absent or ``nil`` both mean ``None``."""


# ---------------------------------------------------------------- field codecs


class _Refused(MalformedError):
    """Raised by a compiled decoder where the reference raises; the caller then runs
    the reference for the real error. Never leaves this module."""


_Check = typing.Callable[[Any], Any]


class _Codec:
    """One field's rules: ``check`` and ``dump`` (the reference codec), and
    ``fast_check``, a closure making ``check``'s tests and conversion that raises
    ``_Refused`` (or anything) instead of ``check``'s error. ``fast_check(none_ok=True)``
    also lets ``None`` through, tested only after the value failed its type test, so
    an optional field costs nothing more than a required one."""

    __slots__ = ()

    def check(self, value: Any, path: str) -> Any:  # wire value -> python
        raise NotImplementedError

    def dump(self, value: Any) -> Any:  # python -> wire value
        return value

    def fast_check(self, none_ok: bool = False) -> _Check:
        raise NotImplementedError


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

    def fast_check(self, none_ok: bool = False) -> _Check:
        lo, hi = self.lo, self.hi

        def check_int(value: Any) -> int | None:
            if type(value) is not int or not lo <= value <= hi:
                if none_ok and value is None:
                    return None
                raise _Refused
            return value

        return check_int


class _Float(_Codec):
    __slots__ = ()

    def check(self, value: Any, path: str) -> float:
        if type(value) is int and abs(value) < 2**53:
            value = float(value)
        if type(value) is not float or not math.isfinite(value):
            raise MalformedError(f"{path}: expected a finite float")
        return value

    def fast_check(self, none_ok: bool = False) -> _Check:
        isfinite = math.isfinite

        def check_float(value: Any) -> float | None:
            if type(value) is int and abs(value) < 2**53:
                value = float(value)
            if type(value) is not float or not isfinite(value):
                if none_ok and value is None:
                    return None
                raise _Refused
            return value

        return check_float


class _Bool(_Codec):
    __slots__ = ()

    def check(self, value: Any, path: str) -> bool:
        if type(value) is not bool:
            raise MalformedError(f"{path}: expected bool")
        return value

    def fast_check(self, none_ok: bool = False) -> _Check:
        def check_bool(value: Any) -> bool | None:
            if type(value) is not bool:
                if none_ok and value is None:
                    return None
                raise _Refused
            return value

        return check_bool


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

    def fast_check(self, none_ok: bool = False) -> _Check:
        max_len = self.max_len

        def check_str(value: Any) -> str | None:
            if type(value) is not str or len(value) > max_len:
                if none_ok and value is None:
                    return None
                raise _Refused
            return value

        return check_str


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

    def fast_check(self, none_ok: bool = False) -> _Check:
        max_len, key_of = self.max_len, public_key_from_peer_id

        def check_peer_id(value: Any) -> str | None:
            if type(value) is not str or len(value) > max_len:
                if none_ok and value is None:
                    return None
                raise _Refused
            key_of(value)  # MalformedError unless canonical (cached by value)
            return value

        return check_peer_id


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

    def fast_check(self, none_ok: bool = False) -> _Check:
        exact, max_len = self.exact, self.max_len
        if exact is None:
            def check_bytes(value: Any) -> bytes | None:
                if type(value) is not bytes or len(value) > max_len:
                    if none_ok and value is None:
                        return None
                    raise _Refused
                return value
        else:
            def check_bytes(value: Any) -> bytes | None:
                if type(value) is not bytes or len(value) != exact or len(value) > max_len:
                    if none_ok and value is None:
                        return None
                    raise _Refused
                return value

        return check_bytes


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

    def fast_check(self, none_ok: bool = False) -> _Check:
        max_items, item = self.max_items, self.item
        if type(item) in (_Str, _Bytes) and getattr(item, "exact", None) is None:
            item_type, max_len = (str if type(item) is _Str else bytes), item.max_len

            def check_sized_items(value: Any) -> tuple | None:  # tuple[str | bytes, ...]: inline
                if type(value) is not list or len(value) > max_items:
                    if none_ok and value is None:
                        return None
                    raise _Refused
                for v in value:
                    if type(v) is not item_type or len(v) > max_len:
                        raise _Refused
                return tuple(value)

            return check_sized_items
        check_item = item.fast_check()

        def check_tuple(value: Any) -> tuple | None:
            if type(value) is not list or len(value) > max_items:
                if none_ok and value is None:
                    return None
                raise _Refused
            return tuple(map(check_item, value))

        return check_tuple


class _Optional(_Codec):
    __slots__ = ("inner",)

    def __init__(self, inner: _Codec) -> None:
        self.inner = inner

    def check(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.check(value, path)

    def dump(self, value: Any) -> Any:
        return None if value is None else self.inner.dump(value)

    def fast_check(self, none_ok: bool = False) -> _Check:
        return self.inner.fast_check(none_ok=True)  # the inner closure lets None through


class _Record(_Codec):
    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def check(self, value: Any, path: str) -> Any:
        return _decode_checked(self.cls, value, path)

    def fast_check(self, none_ok: bool = False) -> _Check:
        # a nested record is declared (so compiled) before the record that holds it
        return (_DECODERS_OR_NONE if none_ok else _DECODERS).get(self.cls, _refuse)

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
    fields, omit = [], []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        codec = _codec_for(hints[f.name])
        fields.append((f.name, codec, required))
        tp = hints[f.name]
        if get_origin(tp) is Annotated and any(isinstance(m, OmitNone) for m in get_args(tp)[1:]):
            if not isinstance(codec, _Optional) or required:
                raise LocalProtocolError(f"{cls.__name__}.{f.name}: OmitNone needs an optional field "
                                         "with a default")
            omit.append(f.name)
    cls.__chimera_fields__ = tuple(fields)
    if omit:
        _OMIT_NONE[cls] = frozenset(omit)


# record class -> its OmitNone fields (only records that have any)
_OMIT_NONE: dict[type, frozenset[str]] = {}


def encode_fields(obj: Any) -> dict:
    """Wire map of a record or message (nested records become maps); an ``OmitNone``
    field holding ``None`` is left out."""
    omit = _OMIT_NONE.get(type(obj))
    if omit is None:
        return {name: codec.dump(getattr(obj, name)) for name, codec, _ in obj.__chimera_fields__}
    out = {}
    for name, codec, _ in obj.__chimera_fields__:
        value = getattr(obj, name)
        if value is None and name in omit:
            continue
        out[name] = codec.dump(value)
    return out


PeerId = Annotated[str, PeerIdMark()]


def reject_duplicate_keys(pairs: list) -> dict:
    """msgpack ``object_pairs_hook``: a map with a repeated key is malformed."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise MalformedError("map with a duplicate key")
    return out


def decode_fields(cls: type, value: Any, path: str = "body") -> Any:
    """Build ``cls`` from its wire map. Raises ``MalformedError`` only."""
    try:
        return _DECODERS[cls](value)
    except Exception:  # noqa: BLE001 - not compiled, or refused: the reference decides
        pass
    return _decode_checked(cls, value, path)  # outside the handler: nothing chained to its error


def _decode_checked(cls: type, value: Any, path: str = "body") -> Any:
    """The reference decoder: the exact ``MalformedError`` (with its path) for bad input."""
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


# ----------------------------------------------------------- compiled decoder

_DECODERS: dict[type, _Check] = {}
_DECODERS_OR_NONE: dict[type, _Check] = {}  # the same, for a ``Record | None`` field
_MISSING = object()


def _refuse(value: Any) -> typing.NoReturn:
    raise _Refused


def _slot_setters(cls: type, own_init: bool) -> tuple | None:
    """The slot setters of ``cls``'s fields, in order, when its ``__init__`` is the one
    ``dataclass`` generated with exactly one parameter per field (none written in the
    class body, no ``InitVar``) and ``__post_init__``, if any, a plain function: that
    ``__init__`` only sets each field in order, then calls ``__post_init__``, so doing
    the same directly builds the same object. ``None`` otherwise (then the decoder
    calls ``cls(...)``)."""
    post_init = getattr(cls, "__post_init__", None)
    if own_init or not (post_init is None or type(post_init) is types.FunctionType):
        return None
    names = [name for name, _, _ in cls.__chimera_fields__]
    try:
        params = list(inspect.signature(cls.__init__).parameters)[1:]
    except (TypeError, ValueError):
        return None
    slots = [cls.__dict__.get(name) for name in names]
    if params != names or any(type(slot) is not types.MemberDescriptorType for slot in slots):
        return None
    return tuple(slot.__set__ for slot in slots)


def _compile_decoder(cls: type, own_init: bool, none_ok: bool = False) -> _Check:
    """One closure: wire map -> ``cls``, making the reference's checks: a map (or
    ``None`` with ``none_ok``); no unknown field; each field present or not required,
    through its ``fast_check``; then the object, ``__post_init__`` included."""
    spec = cls.__chimera_fields__
    checks = tuple(codec.fast_check() for _, codec, _ in spec)
    names = tuple(name for name, _, _ in spec)
    each = tuple((name, check, required) for (name, _, required), check in zip(spec, checks))
    n_fields, is_superset = len(spec), frozenset(names).issuperset
    setters = _slot_setters(cls, own_init)
    post_init = getattr(cls, "__post_init__", None)
    new = object.__new__

    def fields_present(value: dict) -> dict:  # a map that leaves out fields
        out = {}
        for name, check, required in each:
            v = value.get(name, _MISSING)
            if v is not _MISSING:
                out[name] = check(v)
            elif required:
                raise _Refused
        return out

    if setters is None:
        full = tuple(zip(checks, names))

        def decode_calling_init(value: Any) -> Any:
            if type(value) is not dict or not is_superset(value):
                if none_ok and value is None:
                    return None
                raise _Refused
            if len(value) == n_fields:
                return cls(**{name: check(value[name]) for check, name in full})
            return cls(**fields_present(value))  # the left out get __init__'s defaults

        return decode_calling_init

    full = tuple(zip(setters, checks, names))
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # __init__'s defaults
    with_defaults = tuple((setter, name, defaults[name]) for setter, name in zip(setters, names))

    def decode(value: Any) -> Any:
        if type(value) is not dict or not is_superset(value):
            if none_ok and value is None:
                return None
            raise _Refused
        obj = new(cls)
        if len(value) == n_fields:  # every field there: the usual map (encode_fields writes all)
            for setter, check, name in full:
                setter(obj, check(value[name]))
        else:
            present = fields_present(value)
            for setter, name, default in with_defaults:
                setter(obj, present.get(name, default))
        if post_init is not None:
            post_init(obj)
        return obj

    return decode


def _compile(cls: type, own_init: bool) -> None:
    """The compiled decoders of a record with plain fields (one with a ``default_factory``
    or ``init=False`` field is decoded by the reference only)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    spec = cls.__chimera_fields__
    if len(fields) == len(spec) and all(
            name in fields and fields[name].init and fields[name].default_factory is dataclasses.MISSING
            for name, _, _ in spec):
        _DECODERS[cls] = _compile_decoder(cls, own_init)
        _DECODERS_OR_NONE[cls] = _compile_decoder(cls, own_init, none_ok=True)


# ------------------------------------------------------------------ registries

_T = typing.TypeVar("_T")
MESSAGE_TYPES: dict[str, type] = {}


def record(cls: type[_T]) -> type[_T]:
    """Make ``cls`` a frozen wire record (nested value inside messages)."""
    own_init = "__init__" in cls.__dict__  # dataclass keeps an __init__ of the class body
    cls = dataclass(frozen=True, slots=True, kw_only=True)(cls)
    _build_fields(cls)
    _compile(cls, own_init)
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
