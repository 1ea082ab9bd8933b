"""The compiled message decoder against the codec it replaced.

``protocol/messages.py`` decodes through closures compiled per record and falls
back to its reference decoder (``_decode_checked``) whenever a closure refuses;
it encodes with the reference encoder. The section below is a frozen copy of the codec as
it was before the compiled one (commit da172eb), with its own field specs built
from the annotations: every record of the protocol, valid and mutated, must
decode (and encode) to the same result or the same error, type and message.
One rule was added to the codec since, and to this copy with it: a field marked
``OmitNone`` (``MemberUpdate.signature``) is left out of the encoded map while None.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Annotated, Any, get_args, get_origin

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chimera.consensus import bft, quorum, reputation, training, votes
from chimera.fabric import deploy, resources, wire
from chimera.protocol import diagnostics, membership, messages
from chimera.protocol.errors import LocalProtocolError, MalformedError
from chimera.protocol.identity import SigningIdentity, b32, public_key_from_peer_id
from chimera.protocol.messages import (
    MESSAGE_TYPES,
    Len,
    MaxItems,
    MaxLen,
    OmitNone,
    PeerIdMark,
    Range,
    decode_fields,
    encode_fields,
    record,
)

# ------------------------------------------------------- the old codec (frozen)

U64_MAX = 2**64 - 1
DEFAULT_MAX_STR = 1024
DEFAULT_MAX_BYTES = 65536
DEFAULT_MAX_ITEMS = 1024


class _Codec:
    __slots__ = ()

    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
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
        value = super().check(value, path)
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
        return old_decode_fields(self.cls, value, path)

    def dump(self, value: Any) -> dict:
        return old_encode_fields(value)


def _codec_for(tp: Any, marks: tuple = ()) -> _Codec:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extra = get_args(tp)
        return _codec_for(base, marks + tuple(extra))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        assert len(args) == 1 and len(get_args(tp)) == 2
        return _Optional(_codec_for(args[0], marks))
    if origin is tuple:
        args = get_args(tp)
        assert len(args) == 2 and args[1] is Ellipsis
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
    raise AssertionError(f"unsupported field type {tp!r}")


_OLD_SPECS: dict[type, tuple] = {}


def old_spec(cls: type) -> tuple:
    """What the old ``_build_fields`` stored in ``cls.__chimera_fields__``."""
    if cls not in _OLD_SPECS:
        hints = typing.get_type_hints(cls, include_extras=True)
        _OLD_SPECS[cls] = tuple(
            (f.name, _codec_for(hints[f.name]),
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls))
    return _OLD_SPECS[cls]


def omitted_when_none(cls: type) -> frozenset[str]:
    """The fields of ``cls`` annotated ``OmitNone`` (the rule added after the freeze)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return frozenset(name for name, tp in hints.items() if get_origin(tp) is Annotated
                     and any(isinstance(m, OmitNone) for m in get_args(tp)[1:]))


def old_encode_fields(obj: Any) -> dict:
    obj.__chimera_fields__  # the original read the spec here: AttributeError for a non-record
    omit = omitted_when_none(type(obj))
    return {name: codec.dump(getattr(obj, name)) for name, codec, _ in old_spec(type(obj))
            if not (name in omit and getattr(obj, name) is None)}


def old_decode_fields(cls: type, value: Any, path: str = "body") -> Any:
    if type(value) is not dict:
        raise MalformedError(f"{path}: expected map")
    cls.__chimera_fields__  # as the original: AttributeError for a non-record
    spec = old_spec(cls)
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
    except (ValueError, TypeError) as exc:
        raise MalformedError(f"{path}: {exc}") from exc


# ------------------------------------------------------------------ helpers

WIRE_MODULES = (bft, quorum, reputation, training, votes, deploy, resources, wire, diagnostics, membership)


def all_records() -> list[type]:
    """Every record of the protocol (of ``WIRE_MODULES``, imported for that): the registered
    messages and what they nest."""
    seen: dict[type, None] = {}

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen[cls] = None
        for _, codec, _ in old_spec(cls):
            while isinstance(codec, (_Optional, _Tuple)):
                codec = codec.inner if isinstance(codec, _Optional) else codec.item
            if isinstance(codec, _Record):
                walk(codec.cls)

    for cls in MESSAGE_TYPES.values():
        walk(cls)
    return sorted(seen, key=lambda c: (c.__module__, c.__qualname__))


RECORDS = all_records()


def strict(value: Any) -> Any:
    """A comparable form that tells 1, 1.0 and True, tuples and lists, and record classes apart."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value), tuple((f.name, strict(getattr(value, f.name))) for f in dataclasses.fields(value)))
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(strict(v) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((strict(k), strict(v)) for k, v in value.items()))  # insertion order too
    if isinstance(value, float) and math.isnan(value):
        return (float, "nan")
    return (type(value), value)


def outcome(fn, *args) -> tuple:
    try:
        return ("ok", strict(fn(*args)))
    except Exception as exc:  # noqa: BLE001 - compared, type and message
        return ("error", type(exc), str(exc))


def same_decode(cls: type, value: Any) -> tuple:
    old = outcome(old_decode_fields, cls, value)
    assert outcome(decode_fields, cls, value) == old, (cls, value)
    assert outcome(decode_fields, cls, value, "txt") == outcome(old_decode_fields, cls, value, "txt")
    if old[0] == "ok" and cls in messages._DECODERS:
        # what is valid never needs the reference: the compiled decoder alone builds it
        assert strict(messages._DECODERS[cls](value)) == old[1], (cls, value)
    return old


def same_encode(obj: Any) -> tuple:
    old = outcome(old_encode_fields, obj)
    assert outcome(encode_fields, obj) == old, obj
    if old[0] == "ok":  # the same bytes (or msgpack refuses both: a float field holding 2**64)
        def pack(encode):
            return msgpack.packb(encode(obj), use_bin_type=True)
        assert outcome(pack, encode_fields) == outcome(pack, old_encode_fields)
    return old


# ------------------------------------------------------ generating wire values

PEERS = [SigningIdentity(bytes([i]) * 32).peer_id for i in range(1, 4)]
BAD_PEER_IDS = [PEERS[0].upper(), PEERS[0][:-1] + ("b" if PEERS[0][-1] == "a" else "a"),  # trailing bits
                PEERS[0][:51], PEERS[0] + "a", "", "!" * 52, b32(b"\x00" * 31)]
# Strings that __post_init__ rules accept somewhere (states, vote types, steps, kinds, ...).
WORDS = ["alive", "suspect", "dead", "left", "prevote", "precommit", "proposal", "default",
         "tcp://10.0.0.1:7420", "tcp://[::1]:1", "cpu", "gpu", "sha256", "a" * 64, "0" * 64]
# What the __post_init__ rules of some fields want (by field name), so valid maps are often valid.
FIELD_WORDS = {"state": ["alive", "suspect", "dead", "left"], "vote_type": ["prevote", "precommit"],
               "step": ["proposal", "prevote", "precommit"], "dtype": ["float32", "float64"],
               "status": ["ok", "error", "refused"], "rule": list(votes.RULES),
               "module_sha256": ["0" * 64, "ab" * 32], "addresses": ["tcp://10.0.0.1:7420", "tcp://[::1]:1"]}
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**53, 2**64, -(2**63), 2**70]),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.binary(max_size=4),
                 st.lists(st.integers(0, 2), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
                 st.tuples(st.integers()))


# values of the wrong type that pass some other test (a length, a comparison, a truth value)
CONFUSABLE = st.sampled_from([None, True, False, 0, 1, 1.0, "s", "x" * 52, b"b", [], ["s"], [b"b"], {}, {"a": 1}])


def wire_for(codec: Any, depth: int = 0, valid: bool = True, field: str = "") -> st.SearchStrategy:
    """Wire values for a field of the new module's ``__chimera_fields__``: with ``valid``
    within every bound of the field (what ``__post_init__`` wants is another matter),
    else also at and past the bounds, and about one in ten of a confusable wrong type."""
    if valid:
        return _wire_for(codec, depth, valid, field)
    return st.integers(0, 9).flatmap(lambda k: CONFUSABLE if k == 0 else _wire_for(codec, depth, valid, field))


def _wire_for(codec: Any, depth: int, valid: bool, field: str) -> st.SearchStrategy:
    name = type(codec).__name__
    if name == "_Int":
        lo, hi = codec.lo, codec.hi
        inside = st.one_of(st.integers(lo, min(hi, lo + 3)), st.integers(max(lo, hi - 2), hi), st.integers(lo, hi))
        return inside if valid else st.one_of(inside, st.sampled_from([lo - 1, hi + 1]))
    if name == "_Float":
        inside = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**53) + 1, 2**53 - 1))
        return inside if valid else st.one_of(inside, st.sampled_from([2**53, -(2**53), float("inf"), float("nan")]))
    if name == "_Bool":
        return st.booleans()
    if name == "_PeerId":
        return st.sampled_from(PEERS) if valid else st.one_of(st.sampled_from(PEERS), st.sampled_from(BAD_PEER_IDS))
    if name == "_Str":
        m = codec.max_len
        words = [w for w in FIELD_WORDS.get(field, WORDS) if len(w) <= m]
        inside = st.one_of(st.sampled_from(words or [""]), st.text(max_size=min(m, 8)))
        if valid:
            return st.sampled_from(words) if words else inside
        return st.one_of(inside, *edges(m, "x"))
    if name == "_Bytes":
        if codec.exact is not None:
            e = codec.exact
            inside = st.binary(min_size=e, max_size=e)
            return inside if valid else st.one_of(inside, st.sampled_from([b"\x01" * (e + 1), b"\x01" * max(e - 1, 0)]))
        m = codec.max_len
        inside = st.one_of(st.binary(max_size=min(m, 40)), st.sampled_from([b"\x00" * 32, b"\x01" * 32]))
        return inside if valid else st.one_of(inside, *edges(m, b"y"))
    if name == "_Optional":
        return st.one_of(st.none(), wire_for(codec.inner, depth, valid, field))
    if name == "_Tuple":
        n = codec.max_items
        items = wire_for(codec.item, depth + 1, valid, field)
        small = st.lists(items, max_size=min(n, 3 if depth == 0 else 1))
        if n <= 64 and depth == 0 and not valid:
            return st.one_of(small, st.lists(items, min_size=n, max_size=n + 1))
        return small
    if name == "_Record":
        return wire_map(codec.cls, depth + 1, valid)
    raise AssertionError(name)


def edges(max_len: int, unit: str | bytes) -> list[st.SearchStrategy]:
    """Values of exactly the maximum length and one more (bounds of up to 4096: some fields
    allow 256 MiB; the compiled test is the same comparison for any bound)."""
    return [st.just(unit * max_len), st.just(unit * (max_len + 1))] if max_len <= 4096 else []


def wire_map(cls: type, depth: int = 0, valid: bool = True) -> st.SearchStrategy:
    fields = {name: (wire_for(codec, depth, valid, name) if depth < 4 else st.none(), required)
              for name, codec, required in cls.__chimera_fields__}

    @st.composite
    def build(draw):
        out = {}
        for name, (strategy, required) in fields.items():
            if required or draw(st.integers(0, 4)):  # optional fields mostly present
                out[name] = draw(strategy)
        return out

    return build()


def samples() -> dict[type, list[Any]]:
    """Real instances of the records whose cross-field rules random maps seldom meet."""
    from fractions import Fraction

    ballot = votes.Ballot.create(epoch=3, purpose="task 17 result", rule=votes.MAJORITY,
                                 threshold=Fraction(2, 3), options=(b"yes", b"no"), deadline_ms=5)
    out = [ballot, votes.Ballot.create(epoch=0, purpose="", rule=votes.UNANIMOUS),
           wire.FabricVoteRequest(task_id="t1", ballot=ballot, digest=b"\x01" * 32),
           wire.FabricTaskResult(task_id="t1-ab", attempt=1, status="ok", stdout=b"1 a\n", digest=b"\x01" * 32),
           training.FlTensor(name="coef", dtype="float64", shape=(2, 3), data=bytes(48))]
    by_class: dict[type, list[Any]] = {}
    for obj in out:
        by_class.setdefault(type(obj), []).append(obj)
    return by_class


SAMPLES = samples()


def any_map(cls: type) -> st.SearchStrategy:
    """Valid maps (by the field rules), the same mutated, maps of anything at the bounds,
    and real instances (of ``SAMPLES``), as they are and mutated."""
    known = [st.sampled_from([encode_fields(obj) for obj in SAMPLES[cls]])] if cls in SAMPLES else []
    return st.one_of(wire_map(cls), mutated(wire_map(cls)), wire_map(cls, valid=False),
                     *known, *(mutated(k) for k in known))


@st.composite
def mutated(draw, strategy: st.SearchStrategy) -> Any:
    """A wire map, then at most a few mutations anywhere in it."""
    value = draw(strategy)
    for _ in range(draw(st.integers(0, 2))):
        value = mutate(draw, value)
    return value


def mutate(draw, value: Any) -> Any:
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value, key=repr)))
        what = draw(st.sampled_from(["drop", "junk", "deeper", "extra", "tuple"]))
        out = dict(value)
        if what == "drop":
            del out[key]
        elif what == "junk":
            out[key] = draw(JUNK)
        elif what == "deeper":
            out[key] = mutate(draw, out[key])
        elif what == "extra":
            out[draw(st.one_of(st.text(max_size=6), st.integers(), st.binary(max_size=2)))] = draw(JUNK)
        else:
            out[key] = tuple(out[key]) if isinstance(out[key], list) else out[key]
        return out
    if isinstance(value, list) and value:
        i = draw(st.integers(0, len(value) - 1))
        out = list(value)
        out[i] = mutate(draw, out[i]) if draw(st.booleans()) else draw(JUNK)
        return out
    return draw(JUNK)


# --------------------------------------------------------------------- tests

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def test_every_record_is_compiled_and_builds_objects_directly():
    assert len(RECORDS) > 40
    for cls in RECORDS:
        assert cls in messages._DECODERS and cls in messages._DECODERS_OR_NONE, cls
        assert messages._slot_setters(cls, own_init=False) is not None, cls


def test_the_compiled_codec_uses_the_same_rules_as_the_old_one():
    """The fields the compiled closures check are the old ones: same names, order, required."""
    for cls in RECORDS:
        assert [(n, r) for n, _, r in cls.__chimera_fields__] == [(n, r) for n, _, r in old_spec(cls)]


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__qualname__)
def test_decode_and_encode_agree_with_the_old_codec(cls):
    @FUZZ
    @given(any_map(cls))
    def run(value):
        result = same_decode(cls, value)
        if result[0] == "ok":
            obj = decode_fields(cls, value)
            assert old_decode_fields(cls, value) == obj
            same_encode(obj)
            # the round trip: what we encode decodes to the same object
            assert same_decode(cls, encode_fields(obj)) == result

    run()


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__qualname__)
def test_a_valid_body_survives_msgpack_and_both_codecs(cls):
    @FUZZ
    @given(wire_map(cls))
    def run(value):
        try:
            packed = msgpack.packb(value, use_bin_type=True)
        except (OverflowError, ValueError):  # 2**64 and the like: no msgpack for those
            return
        wire = msgpack.unpackb(packed, raw=False, object_pairs_hook=messages.reject_duplicate_keys)
        same_decode(cls, wire)

    run()


FAULTS = [None, True, False, 0, 1, -1, 1.0, 2**53, -(2**53), 2**64, float("nan"), float("inf"), "s", "x" * 53,
          PEERS[0], BAD_PEER_IDS[0], BAD_PEER_IDS[1], b"b", b"\x01" * 32, b"\x01" * 33, [], ["s"], [b"b"], [None],
          [{}], {}, {"a": 1}, ("t",)]


def single_faults(value: Any):
    """Each copy of ``value`` with one place in it replaced by one of ``FAULTS``, one key
    dropped or one unknown key added (into lists: through their first item)."""
    if isinstance(value, dict):
        for key in value:
            for fault in FAULTS:
                yield {**value, key: fault}
            for inner in single_faults(value[key]):
                yield {**value, key: inner}
            yield {k: v for k, v in value.items() if k != key}
        yield {**value, "zz": 1}
    elif isinstance(value, list) and value:
        for fault in FAULTS:
            yield [fault, *value[1:]]
        for inner in single_faults(value[0]):
            yield [inner, *value[1:]]


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__qualname__)
def test_every_single_fault_in_a_valid_body_is_judged_as_before(cls):
    """One thing wrong in an otherwise valid body: random maps seldom isolate one fault."""
    check_single_faults(cls)


def check_single_faults(cls: type) -> None:
    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(wire_map(cls), *([st.sampled_from([encode_fields(o) for o in SAMPLES[cls]])]
                                      if cls in SAMPLES else [])))
    def run(value):
        if same_decode(cls, value)[0] != "ok":
            return
        for faulty in single_faults(value):
            same_decode(cls, faulty)

    run()


def _bent(obj: Any, **changes: Any) -> Any:
    """``obj`` with fields set past its frozen __setattr__ (values the encoder must refuse)."""
    out = dataclasses.replace(obj)
    for name, value in changes.items():
        object.__setattr__(out, name, value)
    return out


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__qualname__)
def test_encoding_bad_field_values_raises_what_the_old_encoder_raised(cls):
    @FUZZ
    @given(wire_map(cls), st.data())
    def run(value, data):
        try:
            obj = old_decode_fields(cls, value)
        except MalformedError:
            return
        name = data.draw(st.sampled_from([n for n, _, _ in cls.__chimera_fields__]))
        junk = data.draw(st.one_of(JUNK, st.sampled_from(BAD_PEER_IDS),
                                   st.lists(JUNK, max_size=3), st.just(["x"] * 2000)))
        same_encode(_bent(obj, **{name: junk}))

    run()


def test_decode_errors_keep_their_exact_messages():
    from chimera.protocol.membership import MemberList, MemberUpdate, PeerContact

    contact = encode_fields(PeerContact(peer_id=PEERS[0], transport_key=b"k" * 32, addresses=("tcp://a:1",)))
    row = {"peer_id": PEERS[1], "state": "alive", "incarnation": 1, "contact": contact}
    cases = {
        "body: expected map": [],
        "body: unknown field 'zz'": {"members": [], "zz": 1},
        "body: missing field 'members'": {"reply_requested": True},
        "body.members: expected array": {"members": (row,)},
        "body.members[1].incarnation: expected int, got bool": {"members": [row, {**row, "incarnation": True}]},
        "body.members[0].contact.peer_id: a peer id is the canonical lowercase base32 of 32 bytes":
            {"members": [{**row, "contact": {**contact, "peer_id": BAD_PEER_IDS[1]}}]},
        "body.members[0].contact.addresses[0]: longer than 128 characters":
            {"members": [{**row, "contact": {**contact, "addresses": ["tcp://" + "a" * 123]}}]},
        "body.members[0]: unknown member state 'zombie'": {"members": [{**row, "state": "zombie"}]},
        "body.members[0].contact: address 'udp://x' is not a tcp://HOST:PORT endpoint":
            {"members": [{**row, "contact": {**contact, "addresses": ["udp://x"]}}]},
    }
    for message, value in cases.items():
        with pytest.raises(MalformedError) as info:
            decode_fields(MemberList, value)
        assert str(info.value) == message
        assert type(info.value) is MalformedError  # never the internal _Refused
        assert info.value.__context__ is None or not isinstance(info.value.__context__, messages._Refused)
        same_decode(MemberList, value)
    with pytest.raises(MalformedError, match=r"^txt.contact: expected map$"):
        decode_fields(MemberUpdate, {**row, "contact": 5}, "txt")


def test_non_records_and_misuse_behave_as_before():
    from chimera.protocol.membership import PeerContact

    # the original: a map is checked first, then cls.__chimera_fields__ (AttributeError)
    for value in ({}, {"a": 1}):
        with pytest.raises(AttributeError):
            decode_fields(int, value)
    for value in ([], None):
        with pytest.raises(MalformedError, match="^body: expected map$"):
            decode_fields(int, value)
    with pytest.raises(AttributeError):
        encode_fields(object())
    contact = PeerContact(peer_id=PEERS[0], transport_key=b"k" * 32, addresses=("tcp://a:1",))
    with pytest.raises(LocalProtocolError, match="not a peer id"):
        encode_fields(_bent(contact, peer_id=PEERS[0].upper()))
    same_encode(_bent(contact, addresses=["tcp://a:1", "tcp://b:2"]))  # a list encodes as before


# Records the protocol does not have, for the paths the compiled codec treats apart.


@record
class _WithOwnInit:
    a: int
    b: Annotated[str, MaxLen(3)] = "x"

    def __init__(self, *, a: int, b: str = "yy") -> None:  # not dataclass's: doubles a, b="yy"
        object.__setattr__(self, "a", a * 2)
        object.__setattr__(self, "b", b)


@record
class _WithFactory:
    items: tuple[int, ...] = dataclasses.field(default_factory=tuple)


@record
class _PostInitRaises:
    """__post_init__ errors: ValueError is malformed input, KeyError (a bug) goes up as it is."""

    word: Annotated[str, MaxLen(8)]
    inner: _WithOwnInit | None = None

    def __post_init__(self) -> None:
        {"ok": 1, "value": 2}[self.word]  # KeyError for anything else
        if self.word == "value":
            raise ValueError("no value")


@record
class _Floats:
    x: float
    xs: Annotated[tuple[float | None, ...], MaxItems(3)] = ()
    nested: Annotated[tuple[tuple[Annotated[bytes, Len(2)], ...], ...], MaxItems(2)] = ()


def test_own_init_default_factory_and_post_init_paths():
    assert messages._slot_setters(_WithOwnInit, own_init=True) is None
    assert _WithFactory not in messages._DECODERS  # default_factory: the reference only
    for cls, value in [(_WithOwnInit, {"a": 2}), (_WithOwnInit, {"a": 2, "b": "abcd"}), (_WithOwnInit, {"b": "a"}),
                       (_WithFactory, {}), (_WithFactory, {"items": [1, 2]}), (_WithFactory, {"items": [-1]}),
                       (_PostInitRaises, {"word": "ok"}), (_PostInitRaises, {"word": "value"}),
                       (_PostInitRaises, {"word": "ok", "inner": {"a": 1}}),
                       (_PostInitRaises, {"word": "ok", "inner": {"a": "1"}})]:
        same_decode(cls, value)
    assert decode_fields(_WithOwnInit, {"a": 2}) == old_decode_fields(_WithOwnInit, {"a": 2})
    assert (decode_fields(_WithOwnInit, {"a": 2}).a, decode_fields(_WithOwnInit, {"a": 2}).b) == (4, "yy")
    with pytest.raises(KeyError):
        decode_fields(_PostInitRaises, {"word": "other"})
    with pytest.raises(MalformedError, match="^body: no value$"):
        decode_fields(_PostInitRaises, {"word": "value"})
    same_encode(_WithOwnInit(a=1))
    same_encode(_WithFactory(items=(1, 2)))


@FUZZ
@given(any_map(_Floats))
def test_floats_optional_items_and_nested_tuples(value):
    result = same_decode(_Floats, value)
    if result[0] == "ok":
        same_encode(decode_fields(_Floats, value))


@pytest.mark.parametrize("cls", [_Floats, _PostInitRaises, _WithOwnInit], ids=lambda c: c.__qualname__)
def test_single_faults_in_floats_own_init_and_post_init(cls):
    check_single_faults(cls)
