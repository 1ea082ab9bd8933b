"""The replicated state machine on top of the BFT log (pure, deterministic).

The BFT core (:mod:`chimera.consensus.bft`) agrees on blocks of opaque values;
this module gives those values their meaning and turns committed blocks into
the network's shared state: the application decisions, the validator set and
the weight table of every epoch. Every honest peer applies the same committed
blocks in the same order and therefore holds the same :class:`Ledger` state
(no clock, no randomness, integers only).

Values (docs/PROTOCOL.md, "Consensus log values") are msgpack arrays whose
first element is a tag:

* ``["decision", author, nonce, data, signature]``: an application decision
  submitted by ``author`` (``chimera propose``). ``data`` is at most
  :data:`MAX_DECISION_BYTES` bytes; ``nonce`` (u64) makes equal data
  proposable twice. ``signature``: :func:`~chimera.consensus.quorum.sign_vote`
  by ``author``, purpose ``"decision"``, epoch 0, statement ``[nonce, data]``.
  The nonce's high 32 bits are the epoch in force when the decision was made
  (:func:`decision_nonce`; signed, since the nonce is in the statement). A
  decision is valid only while ``0 <= current epoch - nonce epoch <=``
  :func:`decision_window_epochs` (about :data:`DECISION_WINDOW_HEIGHTS`
  heights), so a signed decision cannot be replayed later: inside its window
  the BFT core's dedupe of committed values refuses a second commit (the node
  sizes ``dedupe_heights`` with :func:`dedupe_heights_for`), after it the
  ledger refuses it. A decision from a later epoch is "not yet" valid (None:
  this peer is behind), unless more than a window ahead (invalid).
* ``["join", peer_id, epoch, signature]``: ``peer_id`` asks to become a
  validator. Signature by ``peer_id``, purpose ``"validator_join"``, epoch
  ``epoch`` (the epoch in force when it asked), statement ``[peer_id]`` (proof of
  key possession: nobody can enrol someone else). Valid while ``0 <= current
  epoch - epoch <=`` :data:`JOIN_WINDOW_EPOCHS`; a join deferred by a full epoch
  is asked again with the new epoch, so its bytes differ and the BFT core's
  dedupe does not refuse it. The legacy form ``["join", peer_id, signature]``
  (signed for epoch 0, no window) is still applied, never made.
* ``["opinion", opinion]``: a signed :class:`~chimera.consensus.reputation.Opinion`
  (its ``encode_fields`` map) for the current epoch. An author whose scores do
  not fit one value (4096 bytes: about 48 peers) commits them in several
  *parts*, each signed on its own; a part is counted when it scores only
  peers the author's earlier parts of the epoch did not (else it is ignored),
  and the next table sees one opinion per author: the entries of its parts.
* ``["evidence", equivocation]``: an :class:`~chimera.consensus.bft.Equivocation`
  (its ``encode_fields`` map) against a validator of the current epoch.
* ``["fl_job" | "fl_include" | "fl_confirm", body]``: federated
  training values (:mod:`chimera.consensus.training`). They are valid only on a
  ledger built with an ``app_validator`` (the training service's check, which
  may depend on local state and is therefore never cached); when applied they
  are checked statelessly (strict decode, canonical encoding) and handed to the
  driver in :attr:`ApplyOutcome.app_values` in log order.

:meth:`Ledger.validate_value` is the BFT core's ``validate_value``: a value
that does not decode, is not in its canonical encoding (:func:`encode_item`:
msgpack's shortest forms, as the reference encoder writes them), or whose own
signature does not verify, is never proposed or prevoted. Checks that depend on state (an opinion for another
epoch, evidence against a non-validator, an opinion part about a peer the author already scored) are
made when the block is applied: such a value is committed but ignored, and the
outcome says so.

Epochs: epoch ``e`` covers heights ``e * epoch_length + 1 .. (e + 1) *
epoch_length``. When the last height of an epoch is applied, the next table is
:func:`~chimera.consensus.reputation.next_weight_table` of the current table,
the epoch's committed opinions and the members (current validators plus the
epoch's committed joins, at most
:func:`~chimera.consensus.reputation.max_joins_per_epoch` of them in commit order:
the rest are committed but ignored, and may join in a later epoch); a validator with equivocation evidence committed in
the epoch is then cut to weight 1 (the floor; removing a member is not a
reputation decision). The new table is in force from the next height.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from chimera.consensus.bft import CertifiedCommit, Equivocation, verify_equivocation
from chimera.consensus.quorum import SignedVote, WeightTable, sign_vote, verify_vote
from chimera.consensus.reputation import (
    MAX_OPINION_ENTRIES,
    Opinion,
    WeightPolicy,
    max_joins_per_epoch,
    next_weight_table,
    verify_opinion,
)
from chimera.protocol.errors import LocalProtocolError, MalformedError
from chimera.protocol.identity import SIGNATURE_BYTES, SigningIdentity, public_key_from_peer_id
from chimera.protocol.messages import U64_MAX, decode_fields, encode_fields, reject_duplicate_keys

DECISION_PURPOSE = "decision"
JOIN_PURPOSE = "validator_join"
MAX_DECISION_BYTES = 2048
"""Most bytes of application data in one decision."""
MAX_VALUE_DECODE_BYTES = 8192
VALID_CACHE_ENTRIES = 65_536
APP_TAG_PREFIX = "fl_"
"""Tags of values whose validity the ledger delegates to its ``app_validator``."""


@dataclass(frozen=True, slots=True)
class Decision:
    author: str
    nonce: int
    data: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class Join:
    peer_id: str
    signature: bytes
    epoch: int | None = None  # the epoch it was asked in; None: the legacy 3-element form


LedgerValue = Decision | Join | Opinion | Equivocation


def _unpack(value: bytes) -> list:
    if type(value) is not bytes or len(value) > MAX_VALUE_DECODE_BYTES:
        raise MalformedError("a log value is bytes of bounded size")
    try:
        out = msgpack.unpackb(value, raw=False, strict_map_key=True, use_list=True,
                              object_pairs_hook=reject_duplicate_keys,
                              ext_hook=_no_ext, max_bin_len=MAX_VALUE_DECODE_BYTES,
                              max_str_len=MAX_VALUE_DECODE_BYTES, max_array_len=4096, max_map_len=64)
    except MalformedError:
        raise
    except Exception as exc:
        raise MalformedError(f"log value is not msgpack: {type(exc).__name__}") from None
    if not isinstance(out, list) or not out or not isinstance(out[0], str):
        raise MalformedError("a log value is an array starting with its tag")
    return out


def _no_ext(code: int, data: bytes) -> None:
    raise MalformedError("msgpack extension types are not allowed")


def _peer_id(value: object) -> str:
    if not isinstance(value, str):
        raise MalformedError("peer id must be a string")
    public_key_from_peer_id(value)  # raises MalformedError
    return value


def _signature(value: object) -> bytes:
    if type(value) is not bytes or len(value) != SIGNATURE_BYTES:
        raise MalformedError("signature must be 64 bytes")
    return value


_INCLUSION_PREFIX = b"\x92\xaafl_include"  # msgpack [ "fl_include", ... ]: the canonical start


def has_app_tag(value: bytes) -> bool:
    """True when ``value`` starts like the canonical encoding of an ``fl_*`` value: a msgpack
    fixarray header, then a fixstr tag beginning with ``fl_`` (three byte compares: this runs
    for every value gossiped, proposed and applied). A non-canonical encoding of such a tag is
    not recognised here and so fails the ledger's own decode (unknown tag): invalid either way."""
    return (type(value) is bytes and len(value) >= 5 and 0x91 <= value[0] <= 0x9f
            and 0xa3 <= value[1] <= 0xbf and value[2:5] == b"fl_")


def app_value_ok(value: bytes) -> bool:
    """Stateless check of an ``fl_*`` value: a known training tag, strict decode, canonical bytes.

    Imports :mod:`chimera.consensus.training` (numpy) on first use only: a peer
    that never sees a training value never loads it.
    """
    from chimera.consensus.training import decode_log_value as decode_training_value
    from chimera.consensus.training import encode_log_value as encode_training_value

    try:
        return encode_training_value(decode_training_value(value)) == value
    except (MalformedError, LocalProtocolError):
        return False


def decode_value(value: bytes) -> LedgerValue:
    """Decode one committed or proposed log value (no signature check).

    Raises:
        MalformedError: not one of the tagged forms above, or a field out of bounds.
    """
    items = _unpack(value)
    tag = items[0]
    if tag == "decision" and len(items) == 5:
        _, author, nonce, data, sig = items
        if type(nonce) is not int or not 0 <= nonce <= U64_MAX:
            raise MalformedError("decision nonce must be a u64")
        if type(data) is not bytes or len(data) > MAX_DECISION_BYTES:
            raise MalformedError(f"decision data is bytes of <= {MAX_DECISION_BYTES}")
        return Decision(_peer_id(author), nonce, data, _signature(sig))
    if tag == "join" and len(items) == 4:
        epoch = items[2]
        if type(epoch) is not int or not 0 <= epoch < 1 << 32:
            raise MalformedError("join epoch must be in 0 .. 2**32 - 1")
        return Join(_peer_id(items[1]), _signature(items[3]), epoch)
    if tag == "join" and len(items) == 3:  # legacy: signed for epoch 0, no window
        return Join(_peer_id(items[1]), _signature(items[2]))
    if tag == "opinion" and len(items) == 2:
        return decode_fields(Opinion, items[1], "opinion")
    if tag == "evidence" and len(items) == 2:
        return decode_fields(Equivocation, items[1], "evidence")
    raise MalformedError(f"unknown log value tag {str(tag)[:20]!r} or wrong arity")


def encode_item(item: LedgerValue) -> bytes:
    """The canonical encoding of a decoded value (what :meth:`Ledger.validate_value` requires)."""
    if isinstance(item, Decision):
        return msgpack.packb(["decision", item.author, item.nonce, item.data, item.signature])
    if isinstance(item, Join):
        if item.epoch is None:
            return msgpack.packb(["join", item.peer_id, item.signature])
        return msgpack.packb(["join", item.peer_id, item.epoch, item.signature])
    if isinstance(item, Opinion):
        return encode_opinion(item)
    return encode_evidence(item)


JOIN_WINDOW_EPOCHS = 1
"""Epochs after its own in which a join is valid (asked late in an epoch, it commits in the next)."""

DECISION_WINDOW_HEIGHTS = 1000
"""About how many heights a decision stays valid after the epoch it names."""


def decision_window_epochs(epoch_length: int) -> int:
    """Epochs after its own in which a decision is valid: ``max(1, 1000 // epoch_length)``."""
    return max(1, DECISION_WINDOW_HEIGHTS // epoch_length)


def dedupe_heights_for(epoch_length: int) -> int:
    """Heights the BFT core must remember committed values for, so that no decision can commit
    twice inside its validity window (``(window + 1) * epoch_length + 1``, at least 1000)."""
    return max(1000, (decision_window_epochs(epoch_length) + 1) * epoch_length + 1)


def decision_nonce(epoch: int, random_bits: int) -> int:
    """A decision nonce: ``epoch`` (< 2**32) in the high 32 bits, ``random_bits`` (< 2**32) below.

    Raises:
        LocalProtocolError: either part out of range.
    """
    if type(epoch) is not int or not 0 <= epoch < 1 << 32 or type(random_bits) is not int \
            or not 0 <= random_bits < 1 << 32:
        raise LocalProtocolError("decision nonce parts: epoch and random_bits in 0 .. 2**32 - 1")
    return epoch << 32 | random_bits


def encode_decision(identity: SigningIdentity, network_id: bytes, nonce: int, data: bytes) -> bytes:
    """A signed decision value.

    Raises:
        LocalProtocolError: ``data`` longer than :data:`MAX_DECISION_BYTES` or ``nonce`` not a u64.
    """
    if type(data) is not bytes or len(data) > MAX_DECISION_BYTES:
        raise LocalProtocolError(f"decision data is bytes of <= {MAX_DECISION_BYTES}")
    if type(nonce) is not int or not 0 <= nonce <= U64_MAX:
        raise LocalProtocolError("nonce must be a u64")
    vote = sign_vote(identity, DECISION_PURPOSE, network_id, 0, [nonce, data])
    return msgpack.packb(["decision", identity.peer_id, nonce, data, vote.signature])


def encode_join(identity: SigningIdentity, network_id: bytes, epoch: int = 0) -> bytes:
    """The signed request of ``identity`` to become a validator, asked in ``epoch`` (the current
    epoch: the value is valid in it and the next :data:`JOIN_WINDOW_EPOCHS`).

    Raises:
        LocalProtocolError: ``epoch`` not in 0 .. 2**32 - 1.
    """
    if type(epoch) is not int or not 0 <= epoch < 1 << 32:
        raise LocalProtocolError("join epoch must be in 0 .. 2**32 - 1")
    vote = sign_vote(identity, JOIN_PURPOSE, network_id, epoch, [identity.peer_id])
    return msgpack.packb(["join", identity.peer_id, epoch, vote.signature])


def encode_opinion(opinion: Opinion) -> bytes:
    return msgpack.packb(["opinion", encode_fields(opinion)])


def encode_evidence(evidence: Equivocation) -> bytes:
    return msgpack.packb(["evidence", encode_fields(evidence)])


@dataclass(frozen=True, slots=True)
class CommittedDecision:
    height: int
    index: int  # position in the block
    author: str
    nonce: int
    data: bytes


@dataclass(slots=True)
class ApplyOutcome:
    """What applying one certified block changed (for the driver: events, store)."""

    height: int
    epoch: int
    decisions: list[CommittedDecision] = field(default_factory=list)
    joins: list[str] = field(default_factory=list)
    # joins over the epoch's limit (max_joins_per_epoch): committed, ignored; they may join later
    joins_deferred: list[str] = field(default_factory=list)
    opinions: list[str] = field(default_factory=list)  # authors
    evidence: list[str] = field(default_factory=list)  # offenders
    ignored: list[str] = field(default_factory=list)  # reasons, one per ignored value
    app_values: list[bytes] = field(default_factory=list)  # committed fl_* values, block order
    new_table: WeightTable | None = None  # in force from height + 1
    # with new_table: the ledger's snapshot right after this height (store it with this height;
    # taken here because a driver may store this height after later heights were applied)
    snapshot: bytes | None = None


class Ledger:
    """The shared state machine; one per peer, fed every committed block in order.

    Args:
        network_id: the network's id (bound into every signature checked here).
        genesis: the weight table of epoch 0 (from the network's genesis).
        epoch_length: heights per epoch (>= 1).
        policy: the network's :class:`WeightPolicy`.
        app_validator: validity of ``fl_*`` values (e.g. the training service's
            ``validate_value``; may depend on local state, so its answers are not
            cached). ``None``: ``fl_*`` values are invalid. May be set later
            through the attribute of the same name.
        app_proposable: block-building policy for training inclusions
            (``app_proposable(value, sender) -> bool``, see :meth:`proposable`); ``None``:
            every valid one may be proposed. May be set later like ``app_validator``.
    Raises:
        LocalProtocolError: ``epoch_length`` < 1 or ``genesis`` not of epoch 0.
    """

    def __init__(self, network_id: bytes, genesis: WeightTable, epoch_length: int,
                 policy: WeightPolicy | None = None,
                 app_validator: Callable[[bytes], bool] | None = None,
                 app_proposable: Callable[[bytes, str | None], bool] | None = None) -> None:
        if type(epoch_length) is not int or epoch_length < 1:
            raise LocalProtocolError("epoch_length must be an int >= 1")
        if genesis.epoch != 0:
            raise LocalProtocolError("the genesis table is the table of epoch 0")
        self.network_id = network_id
        self.epoch_length = epoch_length
        self.policy = policy or WeightPolicy()
        self.height = 0  # last applied height
        self.table = genesis
        self.table_height = 1
        # the last epoch's table and offenders: evidence of an equivocation at the end of an
        # epoch commits in the next one and must still count (once)
        self.previous_table: WeightTable | None = None
        self.previous_offenders: set[str] = set()
        self.joins: set[str] = set()
        self.opinions: dict[str, list[Opinion]] = {}  # author -> committed parts (disjoint peers)
        self.offenders: set[str] = set()
        self.outcomes: list[ApplyOutcome] = []  # filled by on_commit, drained by the driver
        self.app_validator = app_validator
        self.app_proposable = app_proposable
        self._max_joins_for: tuple[WeightTable | None, int] = (None, 0)
        self._valid: OrderedDict[bytes, tuple[bool, int | None, int]] = OrderedDict()  # hash -> (ok, epoch, window)

    # ------------------------------------------------------------- validation

    @staticmethod
    def choice_key(value: bytes) -> tuple[bytes, Any] | None:
        """The BFT core's ``choice_key`` (block-building policy): of the training inclusions
        of one (job, round) a block carries one
        (:func:`chimera.consensus.training.inclusion_choice`); other values are not grouped."""
        if not value.startswith(_INCLUSION_PREFIX):  # (training is imported only for these)
            return None
        from chimera.consensus.training import inclusion_choice

        return inclusion_choice(value)

    def proposable(self, value: bytes, sender: str | None) -> bool:
        """The BFT core's ``proposable`` (block-building policy): a training inclusion goes
        into a block we propose only where ``app_proposable`` allows it (a validator that is
        not a participant of the job cannot check an inclusion, so it takes only those a
        participant gossiped, PROTOCOL.md §17.4 step 3); every other valid value may."""
        if self.app_proposable is None or not value.startswith(_INCLUSION_PREFIX):
            return True
        return bool(self.app_proposable(value, sender))

    def validate_value(self, value: bytes) -> bool | None:
        """The BFT core's ``validate_value``: decodes and self-signature holds.

        Decode and signature results are cached by value hash (the same value is
        checked when it is gossiped, proposed and applied); a decision's or join's
        window (see the module docstring) is checked against the current epoch every
        time. ``fl_*``
        values go to the ``app_validator`` (never cached), which may answer
        None: "not yet" (see :class:`~chimera.consensus.bft.BftCore`).
        """
        if type(value) is not bytes:
            return False
        if has_app_tag(value):
            if self.app_validator is None or not app_value_ok(value):
                return False
            ok = self.app_validator(value)
            return None if ok is None else bool(ok)
        key = hashlib.sha256(value).digest()
        known = self._valid.get(key)
        if known is None:
            try:
                item = decode_value(value)
                # One encoding per value: the in-pool/commit dedupe is by the hash of the
                # exact bytes, so a re-encoded copy of a signed value must not pass.
                ok = encode_item(item) == value and self._signature_ok(item)
                if ok and isinstance(item, Decision):
                    known = (True, item.nonce >> 32, decision_window_epochs(self.epoch_length))
                elif ok and isinstance(item, Join) and item.epoch is not None:
                    known = (True, item.epoch, JOIN_WINDOW_EPOCHS)
                else:
                    known = (ok, None, 0)
            except MalformedError:
                known = (False, None, 0)
            self._valid[key] = known
            if len(self._valid) > VALID_CACHE_ENTRIES:
                self._valid.popitem(last=False)
        ok, value_epoch, window = known
        if not ok or value_epoch is None:
            return ok
        age = self.table.epoch - value_epoch  # the window moves with the epoch: checked every time
        if age < 0:
            return None if -age <= window else False
        return age <= window

    def _signature_ok(self, item: LedgerValue) -> bool:
        if isinstance(item, Decision):
            return verify_vote(SignedVote(voter=item.author, signature=item.signature), DECISION_PURPOSE,
                               self.network_id, 0, [item.nonce, item.data])
        if isinstance(item, Join):
            return verify_vote(SignedVote(voter=item.peer_id, signature=item.signature), JOIN_PURPOSE,
                               self.network_id, item.epoch or 0, [item.peer_id])
        if isinstance(item, Opinion):
            return verify_opinion(item, self.network_id)
        return item.first.voter == item.second.voter  # checked against the table when applied

    # ---------------------------------------------------------------- apply

    def epoch_of(self, height: int) -> int:
        return (height - 1) // self.epoch_length

    def apply(self, commit: CertifiedCommit) -> ApplyOutcome:
        """Apply the next certified block (heights must come in order).

        Raises:
            LocalProtocolError: ``commit`` is not the block at ``self.height + 1``.
        """
        height = commit.block.height
        if height != self.height + 1:
            raise LocalProtocolError(f"ledger at height {self.height} cannot apply height {height}")
        out = ApplyOutcome(height=height, epoch=self.table.epoch)
        for index, value in enumerate(commit.block.values):
            if has_app_tag(value):
                if app_value_ok(value):
                    out.app_values.append(value)
                else:
                    out.ignored.append("malformed application value")
                continue
            try:
                item = decode_value(value)
            except MalformedError as exc:
                out.ignored.append(f"malformed: {exc}")
                continue
            if not self.validate_value(value):
                out.ignored.append("invalid: bad signature, or outside its epoch window")
                continue
            if isinstance(item, Decision):
                out.decisions.append(CommittedDecision(height, index, item.author, item.nonce, item.data))
            elif isinstance(item, Join):
                if item.peer_id in self.table.weights or item.peer_id in self.joins:
                    out.ignored.append("already a validator or joining")
                elif len(self.joins) >= self._max_joins():
                    out.ignored.append("the epoch's joins are full (it may join in a later epoch)")
                    out.joins_deferred.append(item.peer_id)
                else:
                    self.joins.add(item.peer_id)
                    out.joins.append(item.peer_id)
            elif isinstance(item, Opinion):
                if item.epoch != self.table.epoch or item.author not in self.table.weights:
                    out.ignored.append("opinion for another epoch or by a non-validator")
                else:
                    parts = self.opinions.setdefault(item.author, [])
                    scored = {e.peer_id for part in parts for e in part.entries}
                    if any(e.peer_id in scored for e in item.entries):
                        out.ignored.append("opinion part about peers this author already scored this epoch")
                    elif len(scored) + len(item.entries) > MAX_OPINION_ENTRIES:
                        out.ignored.append("opinion parts of one author hold too many entries")
                    else:
                        parts.append(item)
                        out.opinions.append(item.author)
            else:
                offender = item.first.voter
                current = verify_equivocation(item, self.table, self.network_id)
                late = not current and self.previous_table is not None and \
                    verify_equivocation(item, self.previous_table, self.network_id)
                if offender in self.offenders or (late and offender in self.previous_offenders):
                    out.ignored.append("evidence already committed")
                elif not (current or late):
                    out.ignored.append("evidence does not hold under this epoch's or the last epoch's table")
                else:
                    self.offenders.add(offender)
                    out.evidence.append(offender)
        self.height = height
        if height % self.epoch_length == 0:
            out.new_table = self._next_table()
            out.snapshot = self.snapshot()
        return out

    def _max_joins(self) -> int:
        """Joins admitted in the current epoch, in commit order (PROTOCOL §15.3): the newcomer
        budget in newcomer weights, and room in the table's bound of ``MAX_VOTERS`` peers."""
        if self._max_joins_for[0] is not self.table:
            self._max_joins_for = (self.table, max_joins_per_epoch(self.table, self.policy))
        return self._max_joins_for[1]

    def _next_table(self) -> WeightTable:
        members = set(self.table.weights) | self.joins
        table = next_weight_table(self.table, self._merged_opinions(), members, self.policy)
        if self.offenders:
            weights = dict(table.weights)
            for peer_id in self.offenders:
                if peer_id in weights:
                    weights[peer_id] = 1
            table = WeightTable(epoch=table.epoch, weights=weights)
        self.previous_table, self.previous_offenders = self.table, set(self.offenders)
        self.table = table
        self.table_height = self.height + 1
        self.joins.clear()
        self.opinions.clear()
        self.offenders.clear()
        return table

    def on_commit(self, commit: CertifiedCommit) -> WeightTable | None:
        """The BFT core's ``on_commit`` hook; the outcome is queued in :attr:`outcomes`."""
        outcome = self.apply(commit)
        self.outcomes.append(outcome)
        return outcome.new_table

    def _merged_opinions(self) -> list[Opinion]:
        """One opinion per author: the entries of its committed parts whose signatures verify
        (each part was signed on its own; the merged record is internal and unsigned)."""
        merged = []
        for author in sorted(self.opinions):
            entries = [e for part in self.opinions[author] if verify_opinion(part, self.network_id)
                       for e in part.entries]
            if entries:
                merged.append(Opinion(epoch=self.table.epoch, author=author,
                                      entries=tuple(sorted(entries, key=lambda e: e.peer_id)),
                                      signature=bytes(64)))
        return merged

    # ------------------------------------------------------------ snapshots

    def snapshot(self) -> bytes:
        """Canonical msgpack of the whole state (store it with the block of ``self.height``).

        :meth:`apply` takes it at every epoch boundary (:attr:`ApplyOutcome.snapshot`): a
        driver that stores commits after the core applied them (a catch-up response is
        applied whole before its first commit is stored) must store that one, not a later
        state under an earlier height.
        """
        return msgpack.packb({
            "height": self.height, "epoch": self.table.epoch, "table": list(self.table.weights.items()),
            "table_height": self.table_height, "joins": sorted(self.joins),
            "opinions": [encode_fields(part) for a in sorted(self.opinions) for part in self.opinions[a]],
            "offenders": sorted(self.offenders),
            "previous_table": None if self.previous_table is None else
            [self.previous_table.epoch, list(self.previous_table.weights.items())],
            "previous_offenders": sorted(self.previous_offenders),
        })

    def restore(self, blob: bytes) -> None:
        """Load a :meth:`snapshot` (from our own store).

        Raises:
            MalformedError: the snapshot does not decode.
        """
        try:
            doc = msgpack.unpackb(blob, raw=False, strict_map_key=True)
            table = WeightTable(epoch=int(doc["epoch"]), weights={str(p): int(w) for p, w in doc["table"]})
            opinions: dict[str, list[Opinion]] = {}
            for x in doc["opinions"]:  # parts in commit order (one per author before 2026-12)
                part = decode_fields(Opinion, x, "opinion")
                opinions.setdefault(part.author, []).append(part)
            height, table_height = int(doc["height"]), int(doc["table_height"])
            joins, offenders = set(doc["joins"]), set(doc["offenders"])
            prev = doc.get("previous_table")  # absent in snapshots written before 2026-12-01
            previous = None if prev is None else WeightTable(
                epoch=int(prev[0]), weights={str(p): int(w) for p, w in prev[1]})
            previous_offenders = set(doc.get("previous_offenders", ()))
        except MalformedError:
            raise
        except Exception as exc:
            raise MalformedError(f"ledger snapshot does not decode: {type(exc).__name__}: {exc}") from None
        self.height, self.table, self.table_height = height, table, table_height
        self.joins, self.opinions, self.offenders = joins, opinions, offenders
        self.previous_table, self.previous_offenders = previous, previous_offenders
